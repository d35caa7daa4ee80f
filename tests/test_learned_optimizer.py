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
    """A briefly meta-trained LSTM on quadratics (a few seconds)."""
    net = SelfReferentialNet.from_task(make("quadratic"))
    cfg = MetaTrainConfig(meta_steps=40, meta_batch=16, meta_lr=1e-2, eval_every=20, eval_tasks=16)
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


def test_trains_a_small_module_and_lowers_its_loss(checkpoint):
    model, x, y = _regression()
    opt = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    losses = _train(opt, model, x, y)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_packaged_pretrained_lowers_loss():
    try:
        pretrained_checkpoint("digits-mlp", "lstm")
    except ValueError:
        pytest.skip("no packaged checkpoint")
    model, x, y = _regression(1)
    losses = _train(LearnedOptimizer(model.parameters()), model, x, y)
    assert losses[-1] < 0.5 * losses[0]


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
