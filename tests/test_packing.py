"""Packed steps (selfref/net/packing.py): the analyzer and the lopt core run once on all
parameter tensors packed into one vector, and agree with the per-tensor step."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from selfref import checkpoints
from selfref.commands.meta_train import _load_preset
from selfref.meta.family import TaskFamily
from selfref.meta.problems import TaskDistributionProblem
from selfref.net import AnalyzerConfig, EvaluationConfig, SelfReferentialNet
from selfref.net.cores.lopt import lopt_analyzer
from selfref.net.optimizer import default_checkpoint
from selfref.net.packing import segments_of
from selfref.tasks import make

# every option of the lopt core that changes what a step computes, on at once
ALL_OPTIONS = {
    "step_scale": "mup",
    "hyper_feature": True,
    "hyper_rate": 0.01,
    "backoff_rate": 0.01,
    "dir_gate": True,
    "heldout_step_rate": 0.3,
    "heldout_step_gate": "gap",
    "heldout_step_horizon": 200,
    "heldout_dir_rate": 0.2,
    "decay_gate": "overfit",
    "decay_horizon": 200,
    "out_init": 0.5,  # learned parts large enough to matter
}


def _params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g),
            "v": torch.randn(2, 3, generator=g)}  # fmt: skip


def test_segments_pack_reduce_and_spread_as_the_per_tensor_loops_do():
    p = _params()
    seg = segments_of(p, batched=False)
    assert seg is segments_of({k: v[None] for k, v in p.items()})  # cached by layout
    assert seg.sizes == (12, 3, 6) and seg.n == 21 and seg.t == 3
    q = {k: torch.randn_like(v) for k, v in p.items()}
    both = {k: torch.stack([p[k], q[k]]) for k in p}  # two instances, (2, *shape)
    flat = seg.pack(both)
    assert flat.shape == (2, 21)
    assert torch.equal(flat[1], torch.cat([v.reshape(-1) for v in q.values()]))
    back = seg.unpack(flat)
    assert all(torch.equal(back[k], both[k]) for k in p)
    for i, inst in enumerate((p, q)):  # every instance reduced on its own
        torch.testing.assert_close(
            seg.mean(flat)[i], torch.stack([v.mean() for v in inst.values()])
        )
        torch.testing.assert_close(
            seg.sum(torch.stack([flat, 2 * flat], -1))[i],
            torch.stack([torch.stack([v.sum(), 2 * v.sum()]) for v in inst.values()]),
        )
        assert torch.equal(
            seg.first(flat)[i], torch.stack([v.reshape(-1)[0] for v in inst.values()])
        )
    cos = torch.stack([(p[k] * q[k]).sum() / (p[k].norm() * q[k].norm() + 1e-12) for k in p])
    torch.testing.assert_close(seg.cosine(flat[:1], flat[1:])[0], cos)
    assert float(seg.cosine(flat, torch.zeros_like(flat)).abs().max()) == 0.0
    spread = seg.spread(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(spread[0], torch.tensor([1.0] * 12 + [2.0] * 3 + [3.0] * 6))
    # under vmap the ids stay constants
    torch.testing.assert_close(vmap(seg.mean)(flat[:, None]), seg.mean(flat)[:, None])


def _nets(options):
    spec = _load_preset("lopt")
    task = make("digits-mlp", hidden=12)
    an = dict(spec["analyzer"])
    an["momentum_decays"] = tuple(an["momentum_decays"])
    opts = {**spec["core_options"], **options}
    return [
        SelfReferentialNet.from_task(
            task,
            core="lopt",
            analyzer=AnalyzerConfig(**an),
            evaluation=EvaluationConfig(**spec["evaluation"]),
            packed=packed,
            **opts,
        )
        for packed in (False, True)
    ], task


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["preset", "all_options"])
def test_packed_steps_and_meta_gradients_match_the_per_tensor_step(options):
    (ref, packed), task = _nets(options)
    g = torch.Generator().manual_seed(1)
    phi0 = ref.init_meta_params(g)
    phi0 = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in phi0.items()}
    seeds = [3, 4, 5]
    theta = {k: torch.stack([task.init_params(torch.Generator().manual_seed(s))[k]
                             for s in seeds]) for k in task.init_params(g)}  # fmt: skip
    out = []
    for net in (ref, packed):
        phi = {k: v.clone().requires_grad_(True) for k, v in phi0.items()}
        params = dict(theta)
        state = vmap(lambda p, net=net, phi=phi: net.init_state(phi, p, horizon=40))(params)
        losses = []
        for t in range(12):
            batch = {"x": [], "y": []}
            for s in seeds:
                b = task.batch("train", t, seed=s)
                batch["x"].append(b["x"])
                batch["y"].append(b["y"])
            batch = {k: torch.stack(v) for k, v in batch.items()}
            if net.evaluation.reads_heldout(t):
                hb = [task.batch("val", t, seed=s) for s in seeds]
                batch["heldout"] = {k: torch.stack([b[k] for b in hb]) for k in ("x", "y")}
            params, state, metrics = net.step_many(phi, params, state, batch)
            losses.append(metrics["loss"])
        meta_loss = torch.stack(losses).log().sum()
        grads = torch.autograd.grad(meta_loss, list(phi.values()))
        out.append((params, state, metrics, grads))
    (p_ref, s_ref, m_ref, g_ref), (p_pk, s_pk, m_pk, g_pk) = out
    for k in p_ref:
        torch.testing.assert_close(p_pk[k], p_ref[k], rtol=1e-5, atol=1e-6)
    # the core's state: the same, its scalars (m, 1) where the per-tensor net's are (m,)
    assert s_pk["core"]["progress"].shape == (3, 1)
    core = {k: v.reshape(s_ref["core"][k].shape) for k, v in s_pk["core"].items()}
    torch.testing.assert_close(core, s_ref["core"], rtol=1e-4, atol=1e-5)
    for k in ("update_norm", "grad_norm", "lopt/log_step_mean", "lopt/step_abs_mean"):
        torch.testing.assert_close(m_pk[k], m_ref[k], rtol=1e-4, atol=1e-6)
    # the analyzer's state holds the same averages, packed
    seg = segments_of(theta)
    m0 = seg.pack({k: s_ref["analyzer"][f"m0|{k}"] for k in theta})  # (m, n)
    torch.testing.assert_close(s_pk["analyzer"]["m0|*"], m0, rtol=1e-5, atol=1e-7)
    for gr, gp in zip(g_ref, g_pk):
        scale = float(gr.abs().max()) + 1e-12
        assert float((gp - gr).abs().max()) <= 1e-3 * scale
    assert any(float(g.abs().max()) > 0 for g in g_pk)


def test_packed_single_step_matches_the_packed_many_step():
    (_, packed), task = _nets({})
    phi = packed.init_meta_params(torch.Generator().manual_seed(0))
    theta = task.init_params(torch.Generator().manual_seed(1))
    state = packed.init_state(phi, theta, horizon=20)
    assert set(state["analyzer"]) >= {"m0|*", "v|*"}
    batch = task.batch("train", 0, seed=1)
    one, _, _ = packed.step(phi, theta, state, batch)
    many, _, _ = packed.step_many(
        phi,
        {k: v[None] for k, v in theta.items()},
        vmap(lambda p: packed.init_state(phi, p, horizon=20))(
            {k: v[None] for k, v in theta.items()}
        ),  # fmt: skip
        {k: v[None] for k, v in batch.items()},
    )
    for k in theta:
        torch.testing.assert_close(many[k][0], one[k])


def test_packed_needs_a_core_that_packs_and_no_core_stats():
    task = make("quadratic")
    with pytest.raises(ValueError, match="packed=True needs a core that runs packed"):
        SelfReferentialNet.from_task(task, core="lstm", packed=True)
    with pytest.raises(ValueError, match="packed=True"):
        SelfReferentialNet.from_task(
            task, core="srwm", analyzer=AnalyzerConfig(core_stats=4), packed=True
        )


def test_problem_packed_option_builds_packed_nets_and_is_described():
    spec = _load_preset("lopt")
    spec["problem"] = {**spec["problem"], "eval_tasks": 1, "eval_steps": 4, "packed": True}
    prob = TaskDistributionProblem.from_spec(spec)
    assert prob.net.packed and prob.describe()["packed"] is True
    assert prob.task(7)[1].packed
    plain = dict(spec["problem"])
    del plain["packed"]
    assert "packed" not in TaskDistributionProblem.from_spec({**spec, "problem": plain}).describe()


def test_packed_problem_runs_per_instance_meta_params_and_matches_the_per_tensor_problem():
    def problem(packed):
        return TaskDistributionProblem.from_config(
            {"eval_tasks": 1, "eval_instances": 2, "eval_steps": 6, "packed": packed},
            {
                "core": "lopt",
                "core_options": {"hidden": 4, "ctrl_hidden": 3},
                "analyzer": lopt_analyzer().__dict__,
                "evaluation": {"heldout_every": 2, "heldout_grad": True},
            },
        )

    plain, packed = problem(False), problem(True)
    phi = plain.init_meta_params(torch.Generator().manual_seed(0))
    runs = {}
    for name, prob in (("plain", plain), ("packed", packed)):
        inner = prob.init_inner(phi, torch.Generator().manual_seed(5), 2, 10, 0)
        shared = prob.unroll(phi, inner, 3)
        stacked = {k: torch.stack([v, v]) for k, v in phi.items()}  # ES/PES particles: vmap
        per = prob.unroll(stacked, inner, 3, per_instance=True)
        torch.testing.assert_close(per.loss, shared.loss)
        runs[name] = shared.loss
    torch.testing.assert_close(runs["packed"], runs["plain"], rtol=1e-5, atol=1e-6)
    ev = packed.evaluate(phi)  # the keep-best rollout, forward only
    assert abs(ev["score"] - plain.evaluate(phi)["score"]) < 1e-4


def test_the_shipped_ensemble_runs_packed_as_it_runs_per_tensor():
    """The shipped optimizer (an ensemble of two lopt cores, with the held-out rules) built
    packed takes the steps it takes per tensor, to float rounding, over 25 steps of three
    instances, held-out reads among them; an ensemble of cores that do not pack refuses."""
    ck = checkpoints.load_meta(default_checkpoint())
    assert ck["net"]["core"] == "ensemble"
    task = make("digits-mlp", hidden=12)
    phi = {k: v.to(task.dtype) for k, v in checkpoints.meta_params_of(ck, "best").items()}
    family = TaskFamily(task)
    seeds = [0, 1, 2]
    runs = []
    for packed in (False, True):
        net = SelfReferentialNet.from_description(task, ck["net"], packed=packed)
        assert net.packed is packed
        params = family.init_params(seeds)
        state = vmap(lambda p, net=net: net.init_state(phi, p, horizon=25))(params)
        with torch.no_grad():
            for t in range(25):
                b = family.batch("train", t, seeds)
                if net.evaluation.reads_heldout(t):
                    b = {**b, "heldout": family.batch("val", t, seeds)}
                params, state, metrics = net.step_many(phi, params, state, b)
        runs.append((params, metrics))
    (p_ref, m_ref), (p_pk, m_pk) = runs
    for k in p_ref:
        torch.testing.assert_close(p_pk[k], p_ref[k], rtol=1e-4, atol=1e-6)
    for k in ("lopt/log_step_mean", "lopt/heldout_step_mean", "update_norm"):
        torch.testing.assert_close(m_pk[k], m_ref[k], rtol=1e-4, atol=1e-6)
    lstm = {"core": "ensemble", "core_options": {"member": "lstm", "members": 2}}
    with pytest.raises(ValueError, match="packed=True needs a core that runs packed"):
        SelfReferentialNet.from_description(make("quadratic"), lstm, packed=True)
