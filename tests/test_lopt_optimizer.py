"""The shipped learned optimizer (pretrained/lopt.pt) as a torch optimizer and in `selfref`."""

from __future__ import annotations

import io

import pytest
import torch

from selfref import checkpoints
from selfref.budget import Budget
from selfref.meta.trainer import MetaTrainConfig
from selfref.methods.learned import SelfRefMethod
from selfref.net.optimizer import LearnedOptimizer, default_checkpoint
from selfref.tasks import make


@pytest.fixture(scope="module")
def t_meta() -> int:
    """The shipped optimizer's meta-training horizon."""
    return int(checkpoints.load_meta(default_checkpoint())["config"]["inner_steps"])


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(192, 6, generator=g)
    y = (x[:, :2].sum(1, keepdim=True) > 0).float() + 0.1 * torch.randn(192, 1, generator=g)
    return x[:128], y[:128], x[128:], y[128:]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _train(opt, model, data, steps, start=0, batch=32, heldout_grad=False):
    """Minibatch steps; every ``heldout_every`` steps a held-out loss (with ``heldout_grad``,
    a held-out closure: the loss of 32 val examples and its gradient)."""
    x, y, xv, yv = data
    mse = torch.nn.functional.mse_loss
    losses = []
    for t in range(start, start + steps):
        i = (t * batch) % len(x)
        xb, yb = x[i : i + batch], y[i : i + batch]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = mse(model(xb), yb)
            loss.backward()
            return loss

        if not (opt.heldout_every and t % opt.heldout_every == 0):
            losses.append(float(opt.step(closure).detach()))
        elif heldout_grad:
            held = lambda: mse(model(xv[:32]), yv[:32])  # noqa: E731
            losses.append(float(opt.step(closure, heldout_closure=held).detach()))
        else:
            with torch.no_grad():
                held = mse(model(xv), yv)
            losses.append(float(opt.step(closure, heldout_loss=held).detach()))
    return losses


def test_no_argument_loads_the_shipped_lopt(t_meta):
    w = torch.nn.Parameter(torch.zeros(3))
    opt = LearnedOptimizer([w])
    assert opt.core.name == "ensemble" and opt.core.member.name == "lopt"
    assert opt.core.config.members == 2 and opt.total_steps == t_meta and opt.heldout_every > 0


def test_lowers_a_small_modules_loss_for_ten_times_its_horizon(t_meta):
    model, data = _model(), _data()
    steps = 10 * t_meta
    opt = LearnedOptimizer(model.parameters(), total_steps=steps)
    losses = torch.tensor(_train(opt, model, data, steps))
    assert torch.isfinite(losses).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tenth = steps // 10
    assert losses[-tenth:].mean() < 0.1 * losses[:5].mean()
    assert losses[-tenth:].mean() <= losses[4 * tenth : 5 * tenth].mean() * 1.05  # no late blow-up
    x, y, xv, yv = data
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(model(xv), yv) < 0.5 * y.var()


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain data only


def test_state_dict_round_trip_continues_bit_for_bit():
    data = _data(1)
    ref_model = _model(1)
    ref = LearnedOptimizer(ref_model.parameters(), total_steps=60)
    ref_losses = _train(ref, ref_model, data, 60)
    model = _model(1)
    opt = LearnedOptimizer(model.parameters(), total_steps=60)
    first = _train(opt, model, data, 25)
    sd, weights = _roundtrip(opt.state_dict()), _roundtrip(model.state_dict())
    twin = _model(7)  # different init, overwritten by the saved weights
    twin.load_state_dict(weights)
    resumed = LearnedOptimizer(twin.parameters(), total_steps=60)
    resumed.load_state_dict(sd)
    rest = _train(resumed, twin, data, 35, start=25)
    assert first + rest == ref_losses
    for a, b in zip(ref_model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_packed_steps_match_per_tensor_steps_and_resume_bit_for_bit():
    """``packed=True`` takes the per-tensor updates to float rounding (the held-out gradient
    read too); its state_dict resumes bit for bit, and only into a packed optimizer."""
    data = _data(2)
    runs = {}
    for packed in (False, True):
        model = _model(2)
        opt = LearnedOptimizer(model.parameters(), total_steps=60, packed=packed)
        runs[packed] = (_train(opt, model, data, 60, heldout_grad=True), model)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-6)
    for a, b in zip(runs[False][1].parameters(), runs[True][1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    model = _model(2)
    opt = LearnedOptimizer(model.parameters(), total_steps=60, packed=True)
    first = _train(opt, model, data, 25, heldout_grad=True)
    sd, weights = _roundtrip(opt.state_dict()), _roundtrip(model.state_dict())
    twin = _model(7)
    twin.load_state_dict(weights)
    with pytest.raises(ValueError, match="packed=True"):
        LearnedOptimizer(twin.parameters(), total_steps=60, packed=False).load_state_dict(sd)
    for packed in (True, None):  # None, the default, takes the saved layout
        resumed = LearnedOptimizer(twin.parameters(), total_steps=60, packed=packed)
        twin.load_state_dict(weights)
        resumed.load_state_dict(sd)
        assert resumed.packed is True
        rest = _train(resumed, twin, data, 35, start=25, heldout_grad=True)
        assert first + rest == runs[True][0]
    other = _model(2)
    per_tensor = LearnedOptimizer(other.parameters(), total_steps=60, packed=False)
    _train(per_tensor, other, data, 3)
    default = LearnedOptimizer(twin.parameters(), total_steps=60)
    assert default.packed is True  # the shipped core packs
    default.load_state_dict(_roundtrip(per_tensor.state_dict()))
    assert default.packed is False  # a per-tensor state (or one saved before packing) stays so
    lstm = checkpoints.load_meta(default_checkpoint())["net"]
    lstm = {**lstm, "core": "lstm", "core_options": {}}
    with pytest.raises(ValueError, match="runs packed"):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], meta_params={}, net=lstm,
                         total_steps=10, packed=True)  # fmt: skip


def test_a_torch_lr_scheduler_scales_the_learned_update():
    """A ``torch.optim.lr_scheduler`` schedule multiplies the learned update through the
    groups' ``lr`` (1.0 by default): a constant factor of 0.5 trains exactly as
    ``update_scale=0.5``, and a factor of 0 leaves the parameters where they are."""
    data = _data(3)
    runs = []
    for factor, scale in ((0.5, 1.0), (1.0, 0.5), (0.0, 1.0)):
        model = _model(3)
        opt = LearnedOptimizer(model.parameters(), total_steps=20, update_scale=scale)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _, f=factor: f)
        before = [p.detach().clone() for p in model.parameters()]
        for t in range(20):
            _train(opt, model, data, 1, start=t)
            sched.step()
        runs.append((before, [p.detach().clone() for p in model.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not all(torch.equal(a, b) for a, b in zip(*runs[0]))  # it did move
    assert all(torch.equal(a, b) for a, b in zip(*runs[2]))
    with pytest.raises(ValueError, match="lr .* must be >= 0"):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], lr=-1.0)
    # a state saved before the groups carried lr loads and steps at factor 1
    model = _model(3)
    opt = LearnedOptimizer(model.parameters(), total_steps=20)
    _train(opt, model, data, 2)
    old = _roundtrip(opt.state_dict())
    for g in old["param_groups"]:
        del g["lr"]
    resumed = LearnedOptimizer(model.parameters(), total_steps=20)
    resumed.load_state_dict(old)
    assert all(g["lr"] == 1.0 for g in resumed.param_groups)
    _train(resumed, model, data, 1, start=2)


def test_training_progress_counts_across_a_resume():
    """Per tensor, so that the analyzer can be called on the saved state directly (the packed
    layout resumes bit for bit: test_packed_steps_match_per_tensor_steps_and_resume...)."""
    data = _data(2)
    model = _model(2)
    opt = LearnedOptimizer(model.parameters(), total_steps=40, packed=False)
    names = opt.analyzer.config.feature_names
    _train(opt, model, data, 15)
    st = opt.state_dict()["learned_net_state"]["analyzer"]
    assert int(st["t"]) == 15 and int(st["horizon"]) == 40
    resumed = LearnedOptimizer(model.parameters(), total_steps=40, packed=False)
    resumed.load_state_dict(_roundtrip(opt.state_dict()))
    theta = {f"p{i}": p.detach() for i, p in enumerate(model.parameters())}
    grads = {k: torch.zeros_like(v) for k, v in theta.items()}
    feats, _ = resumed.analyzer(theta, grads, resumed.state_dict()["learned_net_state"]["analyzer"])
    assert float(feats["p0"][0, 0, names.index("progress")]) == pytest.approx(15 / 40)
    _train(resumed, model, data, 10, start=15)
    assert int(resumed.state_dict()["learned_net_state"]["analyzer"]["t"]) == 25
    fresh = LearnedOptimizer(model.parameters(), total_steps=40, packed=False)  # starts at 0
    _train(fresh, model, data, 1)
    assert int(fresh.state_dict()["learned_net_state"]["analyzer"]["t"]) == 1


def test_selfref_method_spends_the_whole_budget_with_lopt():
    method_smoke = pytest.importorskip("method_smoke")
    task = make("digits-mlp")
    budget = Budget(300, 50)
    res = method_smoke.check_method(SelfRefMethod(), task, budget, seed=1)
    assert res.grad_evals == 300  # the whole budget, not one trial of 50 steps
    # 1 per step + 1 per held-out read with its gradient (every 5 steps): 300 / 1.2 steps
    assert res.extra["steps"] == 250
    assert res.meta_train_grad_evals > 0 and res.meta_weights.endswith("lopt.pt")
    init = task.evaluate(task.init_params(torch.Generator().manual_seed(1)), "val")["loss"]
    assert res.val_loss < 0.3 * init
    with pytest.raises(ValueError, match="preset lopt"):
        SelfRefMethod(checkpoint=None).run(task, budget)
    per_tensor = SelfRefMethod(packed=False).run(task, budget, seed=1)  # the default packs
    assert per_tensor.extra["steps"] == 250 and per_tensor.grad_evals == 300
    assert per_tensor.val_loss == pytest.approx(res.val_loss, rel=1e-3)
    with pytest.raises(ValueError, match="packed runs the lopt core"):
        SelfRefMethod(core="lstm", packed=True)


def test_selfref_run_logs_what_the_learned_optimizer_did_to_tensorboard(tmp_path):
    """The `selfref` method's run writes the modifier's own measurements beside its loss
    curves: the shipped optimizer's log step size and its held-out step rule's offset H_T,
    read back from the real event files by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selfref.logging import TensorBoardLogger

    task = make("quadratic")
    logger = TensorBoardLogger(tmp_path)
    res = SelfRefMethod().run(task, Budget(120, 50), logger=logger, seed=0)
    logger.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"lopt/log_step_mean", "lopt/heldout_step_mean", "modify/grad_norm"} <= tags
    steps = [e.step for e in ea.Scalars("lopt/log_step_mean")]
    assert steps == list(range(res.extra["steps"]))  # a short run: every step
    reads = ea.Scalars("modify/heldout_loss")
    assert reads and all(e.step % 5 == 0 for e in reads)  # only the steps that read val
    assert any(e.value != 0 for e in ea.Scalars("lopt/heldout_step_mean"))  # the rule moved


def test_the_lopt_ensemble_preset_made_the_shipped_checkpoint():
    """pretrained/lopt.pt is what `selfref meta-train --preset lopt-ensemble` writes: the
    ensemble of the lopt preset's restarts at the preset's seeds, v2 (pretrained/lopt_v2.pt,
    seed 1) one of them, bit for bit, with the preset's config edit recorded."""
    from selfref.commands.meta_train import load_spec_file

    ck = checkpoints.load_meta(default_checkpoint())
    v2 = checkpoints.load_meta(default_checkpoint().with_name("lopt_v2.pt"))
    presets = default_checkpoint().parents[2] / "presets"
    table = load_spec_file(presets / "lopt-ensemble.toml")["ensemble"]
    assert [m["seed"] for m in ck["members"]] == table["seeds"] == [0, 1]
    edit = table["core_options"]  # round 22's config edit of the composed optimizer
    assert ck["edits"] == [{"source": "[ensemble] core_options", "core_options": edit}]
    assert ck["net"]["core_options"]["member_options"] == {**v2["net"]["core_options"], **edit}
    assert {k: v for k, v in ck["net"].items() if not k.startswith("core")} == {
        k: v for k, v in v2["net"].items() if not k.startswith("core")
    }
    assert ck["config"] == {**v2["config"], "seed": 0}  # member 0's run
    for k, v in checkpoints.meta_params_of(v2).items():
        assert torch.equal(ck["best_meta_params"][f"core.m1.{k[len('core.') :]}"], v)


def test_the_lopt_preset_made_the_shipped_checkpoint():
    """`selfref meta-train --preset lopt` (experiments/lopt_meta_train.py) reproduces the
    configuration of pretrained/lopt_v2.pt (each member of the shipped ensemble): the same
    problem, net and meta-training settings."""
    from dataclasses import asdict

    from experiments.lopt_meta_train import build, load_preset
    from selfref.net.analyzing import AnalyzerConfig
    from selfref.net.cores.lopt import LoptConfig
    from selfref.net.evaluation import EvaluationConfig
    from selfref.tasks.distribution import DistributionConfig

    ck = checkpoints.load_meta(default_checkpoint().with_name("lopt_v2.pt"))
    cfg, problem = build(load_preset("lopt"), "cpu")
    # A setting added after the checkpoint was made is absent from it and must be at its
    # default (the behaviour the run had): meta-training settings and core options.
    defaults = MetaTrainConfig().to_dict()
    assert {k: ck["config"].get(k, defaults[k]) for k in defaults} == cfg.to_dict()
    defaults_of = {
        "core_options": asdict(LoptConfig()),
        "analyzer": asdict(AnalyzerConfig()),
        "evaluation": asdict(EvaluationConfig()),
    }
    dist_defaults = DistributionConfig().to_dict()

    def filled(net: dict) -> dict:
        return {
            **net,
            **{part: {k: net[part].get(k, d[k]) for k in d} for part, d in defaults_of.items()},
        }

    def filled_problem(prob: dict) -> dict:
        dist = prob["distribution"]
        return {
            **prob,
            "net": filled(prob["net"]),
            "distribution": {k: dist.get(k, dist_defaults[k]) for k in dist_defaults},
        }

    assert filled(ck["net"]) == filled(problem.net.describe())
    # packed steps (how the step is computed, not what it is: the same step to float rounding)
    # came after the shipped members, which meta-trained per tensor; the preset now packs
    run = problem.describe()
    assert run.pop("packed") is True and "packed" not in ck["problem"]
    assert filled_problem(ck["problem"]) == filled_problem(run)
