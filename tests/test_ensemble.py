"""The ensemble core (the mean update of several learned optimizers) and the checkpoint that
composes it from finished meta-training runs."""

from __future__ import annotations

import io

import pytest
import torch

from selfref import checkpoints
from selfref.meta.ensemble import ensemble_checkpoint, parallel_wall_s
from selfref.net.cores import make_core
from selfref.net.cores.ensemble import EnsembleCore
from selfref.net.optimizer import LearnedOptimizer, default_checkpoint


def _single():
    """One meta-trained lopt core: v2, a member of the shipped ensemble."""
    return default_checkpoint().with_name("lopt_v2.pt")


LOPT = dict(feature_dim=5, base_index=1, param_index=2, hidden=6, ctrl_hidden=4)


class _Perturbed(EnsembleCore):
    """Members' output layers moved off their zero start, so every weight gets a gradient."""

    def init_meta_params(self, generator):
        phi = super().init_meta_params(generator)
        for k in phi:
            if k.split(".", 1)[1] in ("ctrl.w_out", "mlp.w_out", "ctrl.b_out", "mlp.b_out"):
                phi[k] = 0.1 * torch.randn(phi[k].shape, generator=generator)
        return phi


def test_ensemble_core_contract():
    from core_smoke import check_core

    check_core(_Perturbed(member="lopt", members=3, member_options=LOPT))
    core = make_core("ensemble", member="lopt", members=2, member_options=LOPT, feature_dim=5)
    assert core.feature_dim == 5
    for bad, match in (
        (dict(members=0), "members >= 1"),
        (dict(member="ensemble"), "cannot be ensembles"),
        (dict(feature_dim=4), "differs from its members"),
        (dict(member="nope"), "unknown core"),
    ):
        with pytest.raises(ValueError, match=match):
            EnsembleCore(**{"member": "lopt", "members": 2, "member_options": LOPT, **bad})


def test_the_update_is_the_mean_of_the_members_each_with_its_own_state():
    """Two members with different φ: the ensemble's update is the mean of what each member
    emits from the same features and its own state, step after step, and each member's state
    is the one it would keep alone on that trajectory."""
    ens = _Perturbed(member="lopt", members=2, member_options={**LOPT, "adapt_rate": 0.05})
    lone = make_core("lopt", **{**LOPT, "adapt_rate": 0.05})
    phi = ens.init_meta_params(torch.Generator().manual_seed(0))
    phis = [ens._split(phi, m) for m in range(2)]
    assert not torch.equal(phis[0]["mlp.w_out"], phis[1]["mlp.w_out"])
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 4, generator=gen, dtype=torch.float64)}
    phi = {k: v.double() for k, v in phi.items()}
    phis = [{k: v.double() for k, v in p.items()} for p in phis]
    state = ens.init_state(phi, params)
    alone = [lone.init_state(p, params) for p in phis]
    for _ in range(3):
        feats = {"w": torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)}
        upd, state, metrics = ens(phi, feats, state)
        outs = [lone(p, feats, s) for p, s in zip(phis, alone)]
        torch.testing.assert_close(upd["w"], (outs[0][0]["w"] + outs[1][0]["w"]) / 2)
        alone = [o[1] for o in outs]
        for m in range(2):
            for k, v in alone[m].items():
                torch.testing.assert_close(state[f"m{m}.{k}"], v)
        mean_step = (outs[0][2]["lopt/log_step_mean"] + outs[1][2]["lopt/log_step_mean"]) / 2
        torch.testing.assert_close(metrics["lopt/log_step_mean"], mean_step)
    with pytest.raises(ValueError, match="exactly 2 members"):
        ens({k: v for k, v in phi.items() if k.startswith("m0.")}, feats, state)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


_G = torch.Generator().manual_seed(0)
_X, _XV = torch.randn(64, 5, generator=_G), torch.randn(32, 5, generator=_G)


def _steps(opt: LearnedOptimizer, model: torch.nn.Module, start: int, stop: int) -> list[float]:
    """Steps ``start`` … ``stop``-1 on a small regression, reading a held-out loss (and, for
    an optimizer with the held-out decay, its gradient) every ``heldout_every`` steps."""
    mse = torch.nn.functional.mse_loss
    losses = []
    for t in range(start, stop):
        opt.zero_grad()
        loss = mse(model(_X), _X.sum(1, keepdim=True))
        loss.backward()
        held = None
        if opt.heldout_every and t % opt.heldout_every == 0:

            def held():
                return mse(model(_XV), _XV.sum(1, keepdim=True))

        opt.step(loss=loss.detach(), heldout_closure=held)
        losses.append(float(loss.detach()))
    return losses


def _run(path, steps: int = 30) -> tuple[list[float], list[torch.Tensor]]:
    model = _model()
    opt = LearnedOptimizer(model.parameters(), path, total_steps=steps)
    losses = _steps(opt, model, 0, steps)
    return losses, [p.detach().clone() for p in model.parameters()]


def test_an_ensemble_of_one_optimizer_twice_is_that_optimizer(tmp_path):
    """The checkpoint composer and the core together: two copies of v2's φ give its
    updates bit for bit ((u + u) / 2 = u in floating point), through LearnedOptimizer."""
    path = checkpoints.save(ensemble_checkpoint([_single()] * 2), tmp_path / "e.pt")
    ck = checkpoints.load_meta(path)
    assert ck["net"]["core"] == "ensemble" and ck["net"]["core_options"]["members"] == 2
    single = checkpoints.load_meta(_single())
    assert ck["grad_evals"] == pytest.approx(2 * single["grad_evals"])
    assert [m["seed"] for m in ck["members"]] == [single["config"]["seed"]] * 2
    a, b = _run(_single()), _run(path)
    assert a[0] == b[0]
    for p, q in zip(a[1], b[1]):
        assert torch.equal(p, q)


def test_ensemble_state_dict_round_trip_continues_bit_for_bit(tmp_path):
    single = checkpoints.load_meta(_single())
    noise = torch.Generator().manual_seed(3)
    other = {  # a second member: v2's φ, perturbed
        **single,
        "best_meta_params": {
            k: v + 0.05 * torch.randn(v.shape, generator=noise)
            for k, v in single["best_meta_params"].items()
        },
    }
    other_path = checkpoints.save(other, tmp_path / "other.pt")
    path = checkpoints.save(ensemble_checkpoint([_single(), other_path]), tmp_path / "e.pt")
    ref_losses, ref_params = _run(path)
    assert ref_losses != _run(_single())[0]  # the members differ
    model = _model()
    opt = LearnedOptimizer(model.parameters(), path, total_steps=30)
    first = _steps(opt, model, 0, 12)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = LearnedOptimizer(model.parameters(), path, total_steps=30)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert first + _steps(resumed, model, 12, 30) == ref_losses
    for p, q in zip(model.parameters(), ref_params):
        assert torch.equal(p.detach(), q)


def test_ensemble_checkpoint_refuses_what_is_not_one_recipe(tmp_path):
    single = checkpoints.load_meta(_single())
    with pytest.raises(ValueError, match="at least two"):
        ensemble_checkpoint([_single()])
    changed = {**single, "net": {**single["net"], "analyzer": {**single["net"]["analyzer"]}}}
    changed["net"]["analyzer"]["momentum_decays"] = [0.9]
    bad = checkpoints.save(changed, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="differs .* in its analyzer"):
        ensemble_checkpoint([_single(), bad])
    ens = checkpoints.save(ensemble_checkpoint([_single()] * 2), tmp_path / "e.pt")
    with pytest.raises(ValueError, match="already an ensemble"):
        ensemble_checkpoint([ens, _single()])


def test_the_shipped_ensemble_and_one_built_by_name():
    """pretrained/lopt.pt is an ensemble of two lopt members; an ensemble core named in
    from_task gets its lopt members' feature columns from the analyzer, as lopt does."""
    from selfref.net import AnalyzerConfig, SelfReferentialNet
    from selfref.net.cores.lopt import lopt_analyzer
    from selfref.tasks import make

    ck = checkpoints.load_meta(default_checkpoint())
    assert ck["net"]["core"] == "ensemble" and ck["net"]["core_options"]["members"] == 2
    task = make("quadratic")
    an = lopt_analyzer()
    lone = SelfReferentialNet.from_task(task, core="lopt", analyzer=an).core.config
    net = SelfReferentialNet.from_task(task, core="ensemble", analyzer=an, members=3)
    assert net.core.member.config == lone and net.core.config.members == 3
    assert net.core.member.config.base_index == an.feature_names.index("momentum0.9.value")
    plain = SelfReferentialNet.from_task(task, core="ensemble", analyzer=AnalyzerConfig())
    assert plain.core.member.config.base_index == -1  # no momentum there: no base direction


def test_parallel_wall_s_schedules_members_in_order_on_free_slots():
    """As the ensemble command starts its members: in order, each as soon as a slot frees."""
    assert parallel_wall_s([10.0, 20.0, 5.0], 2) == 20.0  # the third takes the first's slot
    assert parallel_wall_s([20.0, 10.0, 5.0, 30.0], 2) == 45.0  # 10 -> 5 -> 30 on one slot
    assert parallel_wall_s([10.0, 20.0, 5.0], 1) == 35.0  # one at a time: the sum
    assert parallel_wall_s([10.0, 20.0], 8) == 20.0  # more slots than members: the longest
    with pytest.raises(ValueError, match="parallel"):
        parallel_wall_s([1.0], 0)


def test_heldout_suite_reports_the_commands_time_where_the_checkpoint_records_it(tmp_path):
    """lopt_heldout's meta-training minutes: the members' clocks on their slots when the
    ensemble records how many ran at once, else its summed wall_s (an upper bound)."""
    from benchmarks.lopt_heldout import meta_train_minutes

    single = checkpoints.load_meta(_single())
    other = checkpoints.save({**single, "wall_s": 2 * float(single["wall_s"])}, tmp_path / "o.pt")
    w = float(single["wall_s"])
    old = ensemble_checkpoint([_single(), other])
    assert "parallel_wall_s" not in old
    assert meta_train_minutes(old) == {
        "meta_train_minutes": pytest.approx(3 * w / 60),
        "meta_train_minutes_basis": "sum of the members' clocks",
    }
    new = ensemble_checkpoint([_single(), other], parallel=2)
    assert new["parallel_wall_s"] == pytest.approx(2 * w)
    got = meta_train_minutes(new)
    assert got["meta_train_minutes"] == pytest.approx(2 * w / 60)
    assert got["meta_train_member_minutes"] == pytest.approx(3 * w / 60)
    assert meta_train_minutes(single)["meta_train_minutes_basis"] == "the run's clock"


def test_a_kept_subset_costs_every_member_trained(tmp_path):
    """``trained``: the members that ran, in order; the ensemble of the kept ones counts them
    all in its cost and records which were kept; a kept path must be among them."""
    single = checkpoints.load_meta(_single())
    w, g = float(single["wall_s"]), checkpoints.grad_evals_of(single)
    paths = []
    for i, mult in enumerate((1, 2, 3)):
        ck = {**single, "wall_s": mult * w, "config": {**single.get("config", {}), "seed": i}}
        paths.append(str(checkpoints.save(ck, tmp_path / f"m{i}.pt")))
    kept = ensemble_checkpoint([paths[0], paths[2]], parallel=2, trained=paths)
    assert kept["net"]["core_options"]["members"] == 2
    assert kept["wall_s"] == pytest.approx(6 * w)  # 1 + 2 + 3, the dropped one included
    assert kept["grad_evals"] == pytest.approx(3 * g)
    assert kept["parallel_wall_s"] == pytest.approx(4 * w)  # m2 takes m0's slot at 1w
    assert [(m["seed"], m["kept"]) for m in kept["trained_members"]] == [
        (0, True),
        (1, False),
        (2, True),
    ]
    assert [m["path"] for m in kept["members"]] == [paths[0], paths[2]]
    alone = ensemble_checkpoint([paths[0], paths[2]], parallel=2)
    assert alone["wall_s"] == pytest.approx(4 * w) and "trained_members" not in alone
    with pytest.raises(ValueError, match="not among the trained"):
        ensemble_checkpoint([paths[0], _single()], trained=paths[:2])
