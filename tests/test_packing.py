"""Packed steps (selfref/net/packing.py): the analyzer and the lopt core run once on all
parameter tensors packed into one vector, and agree with the per-tensor step."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from selfref.commands.meta_train import _load_preset
from selfref.meta.problems import TaskDistributionProblem
from selfref.net import AnalyzerConfig, EvaluationConfig, SelfReferentialNet
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
    seg = segments_of(p)
    assert seg is segments_of({k: v + 1 for k, v in p.items()})  # cached by layout
    assert seg.sizes == (12, 3, 6) and seg.n == 21 and seg.t == 3
    flat = seg.pack(p)
    assert torch.equal(flat, torch.cat([v.reshape(-1) for v in p.values()]))
    back = seg.unpack(flat)
    assert all(torch.equal(back[k], p[k]) for k in p)
    q = {k: torch.randn_like(v) for k, v in p.items()}
    qf = seg.pack(q)
    torch.testing.assert_close(seg.mean(flat), torch.stack([v.mean() for v in p.values()]))
    torch.testing.assert_close(
        seg.sum(torch.stack([flat, qf], -1)),
        torch.stack([torch.stack([p[k].sum(), q[k].sum()]) for k in p]),
    )
    cos = torch.stack([(p[k] * q[k]).sum() / (p[k].norm() * q[k].norm() + 1e-12) for k in p])
    torch.testing.assert_close(seg.cosine(flat, qf), cos)
    assert float(seg.cosine(flat, torch.zeros_like(flat)).abs().max()) == 0.0
    assert torch.equal(seg.spread(torch.tensor([1.0, 2.0, 3.0])),
                       torch.tensor([1.0] * 12 + [2.0] * 3 + [3.0] * 6))  # fmt: skip
    assert torch.equal(seg.first(flat), torch.stack([v.reshape(-1)[0] for v in p.values()]))
    # under vmap the ids stay constants and every instance is reduced on its own
    batch = torch.stack([flat, 2 * flat])
    expected = torch.stack([seg.mean(flat), 2 * seg.mean(flat)])
    torch.testing.assert_close(vmap(seg.mean)(batch), expected)


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
    torch.testing.assert_close(s_pk["core"], s_ref["core"], rtol=1e-4, atol=1e-5)
    for k in ("update_norm", "grad_norm", "lopt/log_step_mean", "lopt/step_abs_mean"):
        torch.testing.assert_close(m_pk[k], m_ref[k], rtol=1e-4, atol=1e-6)
    # the analyzer's state holds the same averages, packed
    seg = segments_of({k: v[0] for k, v in theta.items()})
    m0 = torch.stack([seg.pack({k: s_ref["analyzer"][f"m0|{k}"][i] for k in theta})
                      for i in range(len(seeds))])  # fmt: skip
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
