"""Config edits of a meta-trained learned optimizer: ``with_core_options``,
``LearnedOptimizer(core_options=...)`` and ``benchmarks.lopt_edit`` (the selection rounds'
candidates, made reproducibly)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lopt_edit import edit
from selfref import checkpoints
from selfref.net.optimizer import LearnedOptimizer, default_checkpoint, with_core_options


@pytest.fixture(scope="module")
def shipped():
    return checkpoints.load_meta(default_checkpoint())


def test_with_core_options_edits_every_member_and_keeps_phi(shipped):
    net = shipped["net"]
    before = repr(net)
    out = with_core_options(net, {"decay_gate": "gap", "decay_max": 1.0, "step_scale": "mup"})
    assert out["core_options"]["member_options"]["decay_gate"] == "gap"
    assert out["core_options"]["member_options"]["step_scale"] == "mup"
    assert out["core_options"]["member_options"]["decay_max"] == 1.0
    assert repr(net) == before  # the source is not touched
    for bad, match in (
        ({"hidden": 8}, "change the meta-parameters"),  # φ's shapes
        ({"hyper_rate": 0.1}, "change the meta-parameters"),  # a new meta-parameter
        ({"nosuch": 1}, "unknown lopt core option"),
        ({"decay_gate": "early"}, "decay_gate must be one of"),
        ({"step_scale": "ntk"}, "step_scale must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            with_core_options(net, bad)


def _run(opt_kwargs, steps=40):
    """``steps`` steps of a small classifier with a held-out read every step; its weights."""
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(64, 6, generator=g), torch.randn(64, 6, generator=g)
    y, yv = (x[:, 0] > 0).long(), (xv[:, 0] > 0).long()
    y[:16] = 1 - y[:16]  # label noise to overfit
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    opt = LearnedOptimizer(model.parameters(), total_steps=steps, **opt_kwargs)
    loss_fn = torch.nn.functional.cross_entropy
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        held = (lambda: loss_fn(model(xv), yv)) if t % opt.heldout_every == 0 else None
        opt.step(loss=loss.detach(), heldout_closure=held)
    return [p.detach().clone() for p in model.parameters()]


def test_learned_optimizer_core_options_apply_the_edit(tmp_path):
    """``core_options`` with the default value changes nothing bit for bit; a gate changes
    the run; and the file ``lopt_edit`` writes runs exactly as the same ``core_options``."""
    plain = _run({})
    same = _run({"core_options": {"decay_gate": "none"}})
    assert all(torch.equal(a, b) for a, b in zip(plain, same))
    gated = _run({"core_options": {"decay_gate": "overfit"}})
    assert not all(torch.equal(a, b) for a, b in zip(plain, gated))
    path = tmp_path / "a_overfit.pt"
    edit(default_checkpoint(), path, {"decay_gate": "overfit"})
    from_file = _run({"checkpoint": path})
    assert all(torch.equal(a, b) for a, b in zip(gated, from_file))


def test_lopt_edit_records_its_edits_and_never_overwrites_its_source(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    edit(default_checkpoint(), first, {"decay_gate": "gap"})
    ck = edit(first, second, {"decay_max": 1.0})
    shipped = checkpoints.load_meta(default_checkpoint()).get("edits", [])  # kept, in order
    assert ck["edits"][: len(shipped)] == shipped
    new = ck["edits"][len(shipped) :]
    assert [e["core_options"] for e in new] == [{"decay_gate": "gap"}, {"decay_max": 1.0}]
    assert new[1]["source"] == str(first)
    loaded = checkpoints.load_meta(second)  # weights_only, as every read
    opts = loaded["net"]["core_options"]["member_options"]
    assert (opts["decay_gate"], opts["decay_max"]) == ("gap", 1.0)
    with pytest.raises(ValueError, match="new file"):
        edit(first, first, {"decay_max": 2.0})
    with pytest.raises(ValueError, match="no option"):
        edit(first, tmp_path / "c.pt", {})


def test_mup_edit_scales_the_shipped_optimizers_first_step_by_layer_role():
    """On a real ``nn.Sequential`` the shipped optimizer with ``step_scale="mup"`` takes, at its
    first step (same state, same features), the plain step on the input layer and the biases,
    and base_fan_in / fan_in times it on the later weights: the layers' roles come from the
    parameter order LearnedOptimizer hands the core."""

    def first_step(core_options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 64), torch.nn.Tanh(),
            torch.nn.Linear(64, 3),
        )  # fmt: skip
        before = [p.detach().clone() for p in model.parameters()]
        opt = LearnedOptimizer(model.parameters(), total_steps=10, core_options=core_options)
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
        y = torch.arange(32) % 3
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        held = lambda: torch.nn.functional.cross_entropy(model(x[:16]), y[:16])  # noqa: E731
        opt.step(loss=loss.detach(), heldout_closure=held)
        return [p.detach() - b for p, b in zip(model.parameters(), before)]

    plain, scaled = first_step({}), first_step({"step_scale": "mup"})
    base = 22.6
    factors = [1.0, 1.0, base / 4, 1.0, base / 64, 1.0]  # input W, b, hidden W, b, output W, b
    for p, s, f in zip(plain, scaled, factors):
        assert p.abs().sum() > 0
        torch.testing.assert_close(s, f * p, rtol=1e-5, atol=1e-9)
