"""Tests of selfref.methods.hypernet (Lorraine & Duvenaud 2018 hyper-training).

- The MLP hypernetwork's weights at fixed λ match a float64 L-BFGS solution of the convex
  digits-logreg problem at that λ, across the trained λ range.
- λ moves to the known best value on a problem built so that it is known in closed form.
- The scoped L2 penalties equal direct computations; the budget is spent exactly, never
  overspent; runs are deterministic; every family × scope × variant works on digits-mlp.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch

from selfref.budget import Budget
from selfref.logging import MemoryLogger
from selfref.methods import make as make_method
from selfref.methods.hypernet import (
    FAMILIES,
    SCOPES,
    HypernetConfig,
    HypernetHPO,
    L2Scope,
    LinearHypernet,
    MLPHypernet,
    make_hypernet,
)
from selfref.params import Params
from selfref.tasks import make


def _converged_logreg(task, l2w: float) -> Params:
    """argmin CE(train) + l2w·‖W‖² (biases free) by full-batch float64 L-BFGS."""
    x, y = task.data["train"]
    w = torch.zeros(10, 64, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2w * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"l0.weight": w.detach(), "l0.bias": b.detach()}


@pytest.mark.slow
def test_hypernet_matches_converged_logreg_across_lambda_range() -> None:
    # Full-batch float64 digits-logreg: the only noise is the λ draw. The hypernetwork is an
    # amortized, finitely trained approximation (1,500 Adam steps over a two-decade range),
    # so we ask for 15% relative error of the weight matrix (the best responses at the two
    # ends of the range differ by ~75%), a val-loss gap under 0.04 nats (the val losses
    # range over 0.11-0.45 across λ), and that w_φ(λ) is nearer to w*(λ) than to w*(λ')
    # for every other λ' of the grid.
    task = make("digits-logreg", dtype=torch.float64, batch_size=1078)
    method = HypernetHPO(
        variant="global",
        family="mlp",
        l2_low=1e-3,
        l2_high=1e-1,
        global_phi_frac=0.999,
        phi_lr=0.003,
        eval_every=10**6,
    )
    fit = method.fit(task, Budget(grad_evals=1500), seed=0)
    grid = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    exact = [_converged_logreg(task, l2w) for l2w in grid]
    for i, l2w in enumerate(grid):
        w_hat = fit.weights(math.log(l2w))["l0.weight"]
        dists = [float((w_hat - e["l0.weight"]).norm() / e["l0.weight"].norm()) for e in exact]
        assert dists[i] < 0.15, (l2w, dists)
        assert min(range(len(grid)), key=dists.__getitem__) == i, (l2w, dists)
        gap = task.evaluate(fit.weights(math.log(l2w)), "val")["loss"]
        gap -= task.evaluate(exact[i], "val")["loss"]
        assert abs(gap) < 0.04, (l2w, gap)


class _RidgeToy:
    """Train loss ½‖w − a‖², val loss ½‖w − a/3‖²: w*(λ) = a / (1 + 2e^λ), best λ = 0.

    With the penalty e^λ‖w‖², the best response is a/(1 + 2e^λ); the val loss is lowest
    where that equals a/3, i.e. at e^λ = 1.
    """

    name: ClassVar[str] = "ridge-toy"
    description: ClassVar[str] = "closed-form ridge problem with best λ = 0"
    batch_size = 1

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float64
        g = torch.Generator().manual_seed(1)
        self.a = torch.randn(1, 5, generator=g, dtype=torch.float64) + 2.0

    def init_params(self, generator: torch.Generator) -> Params:
        return {"l0.weight": torch.zeros(1, 5, dtype=torch.float64)}

    def loss(self, params: Params, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((params["l0.weight"] - batch["target"]) ** 2).sum()

    def batch(self, split: str, step: int, seed: int) -> dict[str, torch.Tensor]:
        return {"target": self.a if split == "train" else self.a / 3}

    def evaluate(self, params: Params, split: str) -> dict[str, float]:
        return {"loss": float(self.loss(params, self.batch(split, 0, 0)))}

    def num_examples(self, split: str) -> int:
        return 1


@pytest.mark.parametrize("variant", ["local", "global"])
@pytest.mark.parametrize("init_l2", [0.01, 30.0])
def test_lambda_moves_to_known_best(variant: str, init_l2: float) -> None:
    task = _RidgeToy()
    method = HypernetHPO(
        variant=variant,
        family="linear",
        l2_low=1e-3,
        l2_high=1e2,
        init_l2=init_l2,
        phi_lr=0.05,
        lam_lr=0.05,
        sigma=0.3,
        eval_every=10,
    )
    logger = MemoryLogger()
    fit = method.fit(task, Budget(grad_evals=1200), logger=logger, seed=0)
    start = math.log(init_l2)
    final = float(fit.result.extra["final_log_l2"][0])
    assert abs(final) < abs(start) - 1.0  # moved toward λ* = 0 by more than a nat
    assert abs(final) < 0.6, final
    lam_trace = logger.values("hparams/l2")
    assert len(lam_trace) > 10  # logged as l2 = 2·e^λ in train()'s convention
    assert fit.result.best_hparams["l2"] == pytest.approx(2 * math.exp(float(fit.lam[0])))


@pytest.mark.parametrize("kind", SCOPES)
def test_scope_penalty_matches_direct_sum(kind: str) -> None:
    task = make("digits-mlp", hidden=(7,), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    w = {
        k: v + torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in task.init_params(g).items()
    }
    scope = L2Scope(kind, tuple(w), 10)
    lam = torch.randn(scope.dim, generator=g, dtype=torch.float64)
    e = torch.exp(lam)
    w0, w1 = w["l0.weight"], w["l1.weight"]
    if kind == "single":
        direct = e[0] * ((w0**2).sum() + (w1**2).sum())
    elif kind == "layer":
        direct = e[0] * (w0**2).sum() + e[1] * (w1**2).sum()
    else:
        direct = sum(e[c] * (w1[c] ** 2).sum() for c in range(10)) + e[10] * (w0**2).sum()
    assert scope.dim == {"single": 1, "layer": 2, "class": 11}[kind]
    assert len(scope.labels()) == scope.dim
    torch.testing.assert_close(scope.penalty(w, lam), direct)
    with_bias = L2Scope(kind, tuple(w), 10, penalize_biases=True)
    assert with_bias.penalty(w, lam) > scope.penalty(w, lam)


def test_hypernet_families_shapes_and_gradients() -> None:
    task = make("digits-logreg", dtype=torch.float64)
    base = task.init_params(torch.Generator().manual_seed(0))
    cfg = HypernetConfig()
    for family, cls in (("linear", LinearHypernet), ("mlp", MLPHypernet)):
        hnet = make_hypernet(family, base, 3, cfg)
        assert isinstance(hnet, cls)
        phi = hnet.init(base, torch.Generator().manual_seed(0))
        lam = torch.tensor([-3.0, -5.0, -7.0], dtype=torch.float64, requires_grad=True)
        w = hnet.weights(phi, lam)
        assert {k: v.shape for k, v in w.items()} == {k: v.shape for k, v in base.items()}
        for k in base:  # starts from the task's initialization
            torch.testing.assert_close(w[k], base[k])
    # linear family: exactly affine in the normalized λ
    hnet = make_hypernet("linear", base, 1, cfg)
    g = torch.Generator().manual_seed(3)
    phi = {
        k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in hnet.init(base, g).items()
    }
    w_a, w_b, w_c = (
        hnet.weights(phi, torch.tensor([x], dtype=torch.float64)) for x in (-8.0, -6.0, -4.0)
    )
    torch.testing.assert_close(w_b["l0.weight"], 0.5 * (w_a["l0.weight"] + w_c["l0.weight"]))
    # float64 gradient check of the MLP hypernet in λ through the task loss
    hnet = make_hypernet("mlp", base, 1, HypernetConfig(mlp_hidden=4))
    phi = {
        k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.1
        for k, v in hnet.init(base, g).items()
    }
    batch = task.batch("val", 0, 0)
    lam = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda lm: task.loss(hnet.weights(phi, lm), batch), (lam,))


@pytest.mark.parametrize("variant", ["global", "local"])
def test_budget_spent_exactly_and_counted(variant: str) -> None:
    task = make("digits-logreg")
    budget = Budget(grad_evals=101)
    res = HypernetHPO(variant=variant, eval_every=20).run(task, budget, seed=0)
    assert res.status == "ok"
    assert res.grad_evals == 101
    assert res.extra["phi_steps"] + res.extra["lam_steps"] == 101
    if variant == "local":
        assert res.extra["phi_steps"] == 51 and res.extra["lam_steps"] == 50
    else:
        assert res.extra["phi_steps"] == round(0.8 * 101)
    gs = [p.grad_evals for p in res.curve]
    assert gs == sorted(gs) and gs[-1] == 101
    bests = [p.best_val_loss for p in res.curve]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))
    assert res.val_loss == pytest.approx(min(bests))
    assert res.val_accuracy is not None and res.test_accuracy is not None


def test_deterministic_for_a_seed() -> None:
    task = make("digits-logreg")
    a = HypernetHPO(family="mlp").run(task, Budget(grad_evals=60), seed=3)
    b = HypernetHPO(family="mlp").run(task, Budget(grad_evals=60), seed=3)
    c = HypernetHPO(family="mlp").run(task, Budget(grad_evals=60), seed=4)
    assert a.best_hparams == b.best_hparams and a.val_loss == b.val_loss
    assert a.extra["final_log_l2"] != c.extra["final_log_l2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", SCOPES)
def test_every_family_and_scope_runs_on_digits_mlp(family: str, scope: str) -> None:
    task = make("digits-mlp", hidden=(16,))
    res = make_method("hypernet", family=family, scope=scope, eval_every=10).run(
        task, Budget(grad_evals=40), seed=0
    )
    assert res.status == "ok", res.reason
    assert res.grad_evals == 40
    n = {"single": 1, "layer": 2, "class": 11}[scope]
    assert len(res.best_hparams) == n
    assert all(v > 0 and math.isfinite(v) for v in res.best_hparams.values())
    assert math.isfinite(res.val_loss)


def test_bad_options_raise_value_error_naming_choices() -> None:
    with pytest.raises(ValueError, match="variant 'bogus'.*global, local"):
        HypernetHPO(variant="bogus")
    with pytest.raises(ValueError, match="family 'rnn'.*linear, mlp"):
        HypernetConfig(family="rnn")
    with pytest.raises(ValueError, match="scope 'neuron'.*single, layer, class"):
        HypernetConfig(scope="neuron")
    with pytest.raises(ValueError, match="l2_low"):
        HypernetConfig(l2_low=1.0, l2_high=0.1)
    with pytest.raises(ValueError, match="unknown option .colour. for method .hypernet.; valid: "):
        make_method("hypernet", colour="red")


def test_divergence_is_a_status() -> None:
    task = make("digits-logreg")
    res = HypernetHPO(phi_lr=1e30, l2_high=1e30, l2_low=1e20, init_l2=1e25).run(
        task, Budget(grad_evals=30), seed=0
    )
    assert res.status == "diverged"
    assert "non-finite" in (res.reason or "")
    assert res.grad_evals <= 30


@pytest.mark.parametrize("variant", ["local", "global"])
def test_method_contract(variant: str) -> None:
    smoke = pytest.importorskip("method_smoke")
    res = smoke.check_method(
        HypernetHPO(variant=variant, eval_every=7), make("digits-logreg"), Budget(120, 20), seed=1
    )
    assert res.method == "hypernet" and set(res.best_hparams) == {"l2"}


def test_runs_on_a_task_without_layers() -> None:
    task = make("quadratic")
    res = HypernetHPO(eval_every=10).run(task, Budget(grad_evals=40), seed=0)
    assert res.status == "ok" and res.grad_evals == 40 and math.isfinite(res.val_loss)
    w = task.init_params(torch.Generator().manual_seed(0))
    scope = L2Scope("single", tuple(w), 0)
    lam = torch.tensor([0.5])
    torch.testing.assert_close(scope.penalty(w, lam), math.exp(0.5) * (w["theta"] ** 2).sum())


@pytest.mark.parametrize("log_l2", [-3.0, 0.0, 1.5])
def test_retraining_at_best_hparams_solves_the_hypernets_objective(log_l2: float) -> None:
    # benchmarks/hypernet_hpo retrains λ̂ with selfref.train at best_hparams["l2"]; that
    # must minimize the objective the hypernetwork was fit to at λ̂:
    # ½‖w − a‖² + e^λ‖w‖², whose minimizer is a / (1 + 2e^λ).
    from selfref.methods.trial import TrialRequest, run_trial
    from selfref.train import train

    toy = _RidgeToy()
    scope = L2Scope("single", ("l0.weight",), 0)
    lam = torch.tensor([log_l2], dtype=torch.float64)
    hp = scope.hparams(lam)
    w = {"l0.weight": torch.randn(1, 5, dtype=torch.float64)}
    direct = 0.5 * hp["l2"] * float((w["l0.weight"] ** 2).sum())
    assert float(scope.penalty(w, lam)) == pytest.approx(direct, rel=1e-12)
    out = train(toy, "sgd", {"lr": 0.1}, 2000, 0, l2=hp["l2"])
    best = toy.a / (1 + 2 * math.exp(log_l2))
    assert torch.allclose(out.params["l0.weight"], best, rtol=1e-9, atol=1e-12)
    rec = run_trial(toy, TrialRequest("sgd", {"lr": 0.1, **hp}, 2000, 0))
    assert rec["status"] == "ok"
    assert rec["val_loss"] == pytest.approx(toy.evaluate(out.params, "val")["loss"], rel=1e-12)
