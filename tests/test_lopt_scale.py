"""benchmarks/lopt_scale.py: the learned update times a factor, and the choice of the factor."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.lopt_scale import choose, scaled
from selfref import checkpoints
from selfref.net.optimizer import LearnedOptimizer, default_checkpoint


def _first_update(ck: dict) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    before = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(
        model.parameters(),
        meta_params=checkpoints.meta_params_of(ck, "best"),
        net=ck["net"],
        total_steps=50,
    )
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step(loss=loss)
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def test_scaled_multiplies_the_shipped_update_and_keeps_the_rest_of_phi():
    ck = checkpoints.load_meta(default_checkpoint())
    twice = scaled(ck, 2.0)
    phi, phi2 = ck["best_meta_params"], twice["best_meta_params"]
    shifted = [k for k in phi if not torch.equal(phi[k], phi2[k])]
    assert shifted and all(k.endswith(".log_lr") for k in shifted)  # every member's, only
    assert all(torch.allclose(phi2[k] - phi[k], torch.tensor(math.log(2.0))) for k in shifted)
    one, two = _first_update(ck), _first_update(twice)
    assert any(u.abs().max() > 0 for u in one)
    for u1, u2 in zip(one, two):  # step and decay alike, far from the ±1 clip
        assert torch.allclose(u2, 2 * u1, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="no log_lr"):
        scaled({"best_meta_params": {"core.w": torch.zeros(1)}}, 2.0)


def test_choose_takes_the_lowest_loss_and_the_smaller_factor_on_a_tie():
    runs = {
        -1: {"val": 0.5, "test": 0.2},
        0: {"val": 0.3, "test": 0.3},
        1: {"val": 0.3, "test": 0.4},
    }
    assert choose(runs, "val") == 0
    assert choose(runs, "test") == -1
    runs[0]["val"] = math.inf  # a diverged factor is never chosen
    assert choose(runs, "val") == 1
