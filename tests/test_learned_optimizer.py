"""LearnedOptimizer: a meta-trained modifier in an ordinary PyTorch training loop."""

from __future__ import annotations

import pytest
import torch

from selfref.logging import MemoryLogger
from selfref.meta import MetaTrainConfig, MetaTrainer
from selfref.net import SelfReferentialNet
from selfref.net.optimizer import LearnedOptimizer, pretrained_checkpoint
from selfref.tasks import make


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A barely meta-trained LSTM on quadratics (plumbing only; about a second)."""
    net = SelfReferentialNet.from_task(make("quadratic"))
    cfg = MetaTrainConfig(
        meta_steps=6,
        meta_batch=4,
        unroll=5,
        inner_steps=10,
        meta_lr=1e-2,
        eval_every=3,
        eval_tasks=4,
    )
    tr = MetaTrainer(net, cfg, MemoryLogger())
    tr.train()
    return tr.export(tmp_path_factory.mktemp("ck") / "lstm.pt")


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, x, y


def _train(opt, model, x, y, steps=60):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("seed", [0, 1])
def test_trains_a_small_module_and_lowers_its_loss(seed):
    """The packaged LSTM (meta-trained on digits-mlp) trains an unrelated regression MLP."""
    path = pretrained_checkpoint("digits-mlp", "lstm")
    model, x, y = _regression(seed)
    opt = LearnedOptimizer(model.parameters(), checkpoint=path)
    losses = _train(opt, model, x, y)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_freshly_meta_trained_checkpoint_loads_and_steps(checkpoint):
    model, x, y = _regression()
    losses = _train(LearnedOptimizer(model.parameters(), checkpoint=checkpoint), model, x, y, 5)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_closure_state_dict_and_determinism(checkpoint):
    model, x, y = _regression()
    opt = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    assert sd["learned_net_state"] is not None
    twin, _, _ = _regression()
    twin.load_state_dict(model.state_dict())
    opt2 = LearnedOptimizer(twin.parameters(), checkpoint=checkpoint)
    opt2.load_state_dict(sd)
    for o, m in ((opt, model), (opt2, twin)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_missing_grad_counts_as_zero_and_bad_args(checkpoint, tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([w], checkpoint=checkpoint)
    opt.step()  # no grad: update from zero-gradient features, finite
    assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match="which"):
        LearnedOptimizer([w], checkpoint=checkpoint, which="middle")
    with pytest.raises(ValueError, match="does not exist"):
        LearnedOptimizer([w], checkpoint=tmp_path / "nope.pt")


def test_selfref_method_with_packaged_checkpoint():
    method_smoke = pytest.importorskip("method_smoke")
    from selfref.budget import Budget
    from selfref.methods import make as make_method

    task = make("digits-mlp")
    res = method_smoke.check_method(
        make_method("selfref", core="lstm"), task, Budget(200, 50), seed=1
    )
    assert res.grad_evals == 200 and res.meta_train_grad_evals > 0  # the whole budget
    assert res.meta_weights is not None and res.meta_weights.endswith("lstm_digits-mlp.pt")
    init = task.evaluate(task.init_params(torch.Generator().manual_seed(1)), "val")["loss"]
    assert res.val_loss < 0.5 * init


def test_selfref_method_meta_trains_when_no_checkpoint(checkpoint):
    method_smoke = pytest.importorskip("method_smoke")
    from selfref.budget import Budget
    from selfref.methods.learned import SelfRefMethod

    task = make("quadratic")
    m = SelfRefMethod(
        core="lstm", checkpoint=None, meta_steps=3, meta_batch=4, eval_tasks=2, eval_every=0
    )
    res = method_smoke.check_method(m, task, Budget(30, 30), seed=0)
    assert res.grad_evals == 30
    assert res.meta_train_grad_evals >= 3 * 4 * 20  # spent on its own account
    assert res.extra["source"] == "meta-trained here"
    loaded = SelfRefMethod(core="lstm", checkpoint=checkpoint).run(task, Budget(30, 30), seed=0)
    assert loaded.status == "ok" and loaded.meta_weights == str(checkpoint)
    with pytest.raises(ValueError, match="core"):
        SelfRefMethod(core="nope")
