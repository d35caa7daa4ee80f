"""selfref.train: determinism, divergence as a status, cost accounting, logging, L2."""

from __future__ import annotations

import math

import pytest
import torch

from selfref.budget import Budget, BudgetExceeded, CostCounter
from selfref.logging import MemoryLogger
from selfref.optim import make_optimizer
from selfref.tasks import make
from selfref.train import l2_coefficients, train


@pytest.fixture(scope="module")
def digits():
    return make("digits-mlp")


def test_same_seed_is_bitwise_identical(digits):
    a = train(digits, "adam", {"lr": 0.01}, steps=30, seed=5, eval_every=10)
    b = train(digits, "adam", {"lr": 0.01}, steps=30, seed=5, eval_every=10)
    assert a.losses == b.losses
    assert a.val_losses == b.val_losses
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])


def test_different_seeds_differ(digits):
    a = train(digits, "adam", {"lr": 0.01}, steps=5, seed=0)
    b = train(digits, "adam", {"lr": 0.01}, steps=5, seed=1)
    assert a.losses != b.losses
    assert not torch.equal(a.params["l0.weight"], b.params["l0.weight"])


def test_it_learns(digits):
    out = train(digits, "adam", {"lr": 0.01}, steps=150, seed=0)
    assert out.status == "ok" and out.steps == 150 == len(out.losses)
    assert sum(out.losses[-10:]) / 10 < 0.5 * out.losses[0]
    assert digits.evaluate(out.params, "test")["accuracy"] > 0.85


def test_matches_a_hand_written_torch_optim_loop():
    task = make("digits-logreg", dtype=torch.float64, init_scale=1.0)
    out = train(task, "momentum", {"lr": 0.1, "momentum": 0.9}, steps=10, seed=2)
    params = task.init_params(torch.Generator().manual_seed(2))
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(ref.values(), lr=0.1, momentum=0.9, foreach=False)
    losses = []
    for t in range(10):
        opt.zero_grad()
        loss = task.loss(ref, task.batch("train", t, 2))
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    assert out.losses == pytest.approx(losses, abs=1e-12)
    for k in ref:
        assert float((out.params[k] - ref[k].detach()).abs().max()) < 1e-12


def test_divergence_is_recorded_with_its_step():
    task = make("quadratic")
    logger = MemoryLogger()
    out = train(task, "sgd", {"lr": 1.0}, steps=100, seed=0, logger=logger)
    assert out.status == "diverged"
    assert out.diverged_step is not None and 0 < out.diverged_step < 100
    assert out.steps == out.grad_evals == out.diverged_step + 1 == len(out.losses)
    assert not math.isfinite(out.losses[-1])
    assert all(math.isfinite(x) for x in out.losses[:-1])
    assert len(logger.values("inner/loss")) == out.diverged_step  # the non-finite one is not logged


def test_counter_is_charged_exactly_steps(digits):
    counter = CostCounter(Budget(grad_evals=100))
    out = train(digits, "sgd", {"lr": 0.1}, steps=17, seed=0, counter=counter, eval_every=5)
    assert counter.grad_evals == 17 == out.grad_evals


def test_budget_exceeded_propagates(digits):
    counter = CostCounter(Budget(grad_evals=10))
    with pytest.raises(BudgetExceeded):
        train(digits, "sgd", {"lr": 0.1}, steps=11, seed=0, counter=counter)
    assert counter.grad_evals == 10


def test_logger_receives_loss_and_val_metrics(digits):
    logger = MemoryLogger()
    out = train(
        digits, "adam", {"lr": 0.01}, steps=12, seed=0, logger=logger, log_every=3, eval_every=4
    )
    assert [s for s, _ in logger.scalars["inner/loss"]] == [0, 3, 6, 9]
    assert logger.values("inner/loss") == [out.losses[i] for i in (0, 3, 6, 9)]
    assert [s for s, _ in logger.scalars["val/loss"]] == [4, 8, 12]
    assert [s for s, _ in logger.scalars["val/accuracy"]] == [4, 8, 12]
    assert [s for s, _ in out.val_losses] == [4, 8, 12]
    assert out.val_losses[-1][1] == pytest.approx(digits.evaluate(out.params, "val")["loss"])


def test_given_params_are_used_and_not_modified(digits):
    p0 = {
        k: torch.zeros_like(v)
        for k, v in digits.init_params(torch.Generator().manual_seed(0)).items()
    }
    out = train(digits, "sgd", {"lr": 0.5}, steps=3, seed=0, params=p0)
    assert out.losses[0] == pytest.approx(math.log(10), abs=1e-5)  # zero weights: uniform logits
    assert all(float(v.abs().max()) == 0 for v in p0.values())


def test_l2_penalty_gradient_is_added_to_weights_only():
    task = make("digits-logreg", dtype=torch.float64, init_scale=1.0)
    p0 = task.init_params(torch.Generator().manual_seed(0))
    plain = train(task, "sgd", {"lr": 0.1}, steps=1, seed=0, params=p0)
    reg = train(task, "sgd", {"lr": 0.1}, steps=1, seed=0, params=p0, l2=0.3)
    # one SGD step: the penalty 0.5*l2*||w||^2 adds -lr*l2*w to the weight, nothing to the bias
    expected_w = plain.params["l0.weight"] - 0.1 * 0.3 * p0["l0.weight"]
    assert torch.allclose(reg.params["l0.weight"], expected_w, atol=1e-14)
    assert torch.equal(reg.params["l0.bias"], plain.params["l0.bias"])
    assert reg.losses == plain.losses  # losses are the data term


def test_l2_per_tensor_dict():
    params = {"l0.weight": torch.ones(2, 2), "l0.bias": torch.ones(2)}
    assert l2_coefficients(params, {"l0.bias": 0.5}) == {"l0.bias": 0.5}
    assert l2_coefficients(params, 0.1) == {"l0.weight": 0.1}
    with pytest.raises(ValueError, match="unknown parameters"):
        l2_coefficients(params, {"l9.weight": 1.0})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        l2_coefficients(params, -1.0)


def test_custom_functional_optimizer_object(digits):
    out = train(digits, make_optimizer("nesterov"), {"lr": 0.05}, steps=3, seed=0)
    assert out.steps == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"hparams": {"lr": -0.1}}, "lr=-0.1"),
        ({"hparams": {"lr": 0.0}}, "lr=0.0"),
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"eval_every": 0}, "eval_every must be >= 1"),
        ({"l2": -1.0}, "l2 coefficient"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {"optimizer": "sgd", "hparams": {"lr": 0.1}, "steps": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        train(
            make("quadratic"), args.pop("optimizer"), args.pop("hparams"), args.pop("steps"), **args
        )


def test_progress_bar_runs(digits, capsys):
    out = train(digits, "sgd", {"lr": 0.1}, steps=3, seed=0, progress=True)
    assert out.steps == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_in_float64():
    cpu = make("digits-mlp", dtype=torch.float64, device="cpu")
    gpu = make("digits-mlp", dtype=torch.float64, device="cuda")
    a = train(cpu, "adam", {"lr": 0.01}, steps=20, seed=0, eval_every=10)
    b = train(gpu, "adam", {"lr": 0.01}, steps=20, seed=0, eval_every=10)
    assert b.params["l0.weight"].device.type == "cuda"
    assert b.losses == pytest.approx(a.losses, abs=1e-9)
    for k in a.params:
        assert float((a.params[k] - b.params[k].cpu()).abs().max()) < 1e-9
