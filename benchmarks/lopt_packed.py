"""How much faster is a packed meta-step? Per-tensor against packed steps, side by side.

Meta-training the ``lopt`` recipe spends most of a meta-step dispatching the analyzer's and
the core's small ops once per parameter tensor (fifteenth session's profile on issue 14).
``SelfReferentialNet(packed=True)`` (:mod:`selfref.net.packing`; the task distribution's
``packed`` option) takes each op once over all tensors packed into one vector, and runs a
meta-batch's instances as one batch in place of ``torch.func.vmap``. This benchmark
measures, in one process and on the same draws:

1. meta-steps: for ``--tasks`` tasks drawn as meta-training draws them (the ``lopt`` preset's
   distribution, ``meta_batch`` instances, its horizon), one truncation of ``unroll`` steps
   and the meta-gradient of its loss, per tensor and packed in turn (after one warm-up draw
   each, not counted; interleaved, so drift
   in the machine's speed falls on both); the seconds of each, and how far the packed
   meta-gradient and per-step losses lie from the per-tensor ones;
2. keep-best rollouts: ``--eval-tasks`` meta-validation rollouts (forward only), timed both
   ways;
3. end to end: ``selfref meta-train`` on the preset for ``--meta-steps`` meta-steps (its
   keep-best evaluation cut to one short task), once per way, each run's own ``wall_s``;
4. scoring: the shipped optimizer (an ensemble of two ``lopt`` cores) as the selection
   benchmark runs it (``benchmarks.lopt_heldout.run_learned``, 3 seeds, ``--score-steps``
   steps, ``lopt_select --packed``), on each task of the selection suite, per tensor and
   packed in turn; the seconds of each and how far the packed final test losses lie from
   the per-tensor ones.

φ is the preset's initialization with its output layers perturbed (so that the learned
parts of the step are not zero). Targets: the packed meta-step at least 1.3× as fast, and
its meta-gradient within 1e-3 of the per-tensor one, ‖g_packed − g‖ / ‖g‖ over all of φ, on
every draw (far below the spread of meta-gradients between draws). Reported beside them: the
largest difference of any one tensor's gradient relative to its largest entry, and of any
per-step loss: a hundred steps amplify float rounding, so these run near 1e-4–1e-3.

Usage: python -m benchmarks.lopt_packed [--quick] [--tasks 12] [--meta-steps 40]
[--score-steps 300]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref.commands.meta_train import _load_preset
from selfref.meta.problems.task_distribution import EVAL_TASK_SEED_BASE, TaskDistributionProblem


def problems(spec: dict[str, Any]) -> dict[str, TaskDistributionProblem]:
    """The preset's problem, per tensor and packed."""
    out = {}
    for name, packed in (("per_tensor", False), ("packed", True)):
        s = {**spec, "problem": {**spec["problem"], "packed": packed}}
        out[name] = TaskDistributionProblem.from_spec(s)
    return out


def meta_step(
    problem: TaskDistributionProblem, phi: dict[str, torch.Tensor], draw: int, meta: dict
) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """One truncation and its meta-gradient on draw ``draw``: (seconds, per-step losses,
    gradients)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    start = time.perf_counter()
    inner = problem.init_inner(
        leaves, torch.Generator().manual_seed(draw), meta["meta_batch"], meta["inner_steps"], 0
    )
    tr = problem.unroll(leaves, inner, min(meta["unroll"], inner.horizon))
    grads = torch.autograd.grad(tr.loss.mean(), list(leaves.values()))
    return time.perf_counter() - start, tr.per_step, list(grads)


def end_to_end(spec_path: Path, packed: bool, meta_steps: int, workdir: Path) -> float:
    """``selfref meta-train`` for ``meta_steps`` meta-steps: the run's own ``wall_s``."""
    config = workdir / f"{'packed' if packed else 'per_tensor'}.toml"
    config.write_text(
        f'extends = "lopt"\n[meta]\nmeta_steps = {meta_steps}\neval_every = 100000\n'
        f"checkpoint_every = 100000\n[problem]\neval_tasks = 1\neval_steps = 10\n"
        f"packed = {'true' if packed else 'false'}\n"
    )
    cmd = [sys.executable, "-m", "selfref", "meta-train", "--config", str(config),
           "--threads", "1", "--logdir", str(workdir / config.stem)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in reversed(out.splitlines()):  # the run's summary: its last JSON line
        if line.startswith('{"task"'):
            return float(json.loads(line)["wall_s"])
    raise RuntimeError(f"no summary line in the output of {' '.join(cmd)}")


def scoring(steps: int, n_tasks: int | None = None) -> tuple[dict[str, float], float]:
    """Part 4: the shipped optimizer on the selection suite's tasks (the first ``n_tasks``),
    per tensor and packed: (seconds of each way, the largest relative difference of a final
    mean test loss)."""
    from benchmarks.lopt_heldout import run_learned
    from benchmarks.lopt_select import SELECTION_SUITE
    from selfref import checkpoints
    from selfref.meta.family import TaskFamily
    from selfref.net.optimizer import default_checkpoint
    from selfref.tasks.distribution import build_task

    ck = checkpoints.load_meta(default_checkpoint())
    seconds = {"per_tensor": 0.0, "packed": 0.0}
    diff = 0.0
    for ht in list(SELECTION_SUITE)[:n_tasks]:
        family = TaskFamily(build_task(ht.spec))
        run_learned(ck, family, 2, (0,), packed=True)  # warm-up (first-call costs)
        finals = {}
        for name in ("per_tensor", "packed"):
            start = time.perf_counter()
            out = run_learned(ck, family, steps, (0, 1, 2), packed=name == "packed")
            seconds[name] += time.perf_counter() - start
            finals[name] = out["test"]["mean"]
        diff = max(diff, abs(finals["packed"] - finals["per_tensor"]) / finals["per_tensor"])
        print(f"scoring {ht.name}: final test per tensor {finals['per_tensor']:.6g}, packed "
              f"{finals['packed']:.6g}", flush=True)  # fmt: skip
    return seconds, diff


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=12, help="meta-training draws (default: 12)")
    p.add_argument("--eval-tasks", type=int, default=4, help="keep-best rollouts (default: 4)")
    p.add_argument("--meta-steps", type=int, default=40, help="end-to-end meta-steps (40)")
    p.add_argument("--score-steps", type=int, default=300, help="scoring steps per task (300)")
    args = p.parse_args()
    if min(args.tasks, args.eval_tasks, args.meta_steps, args.score_steps) < 1:
        p.error("--tasks, --eval-tasks, --meta-steps and --score-steps must be at least 1")
    if args.device != "cpu":
        p.error("this benchmark runs on the CPU (one thread, as meta-training's members do)")
    torch.set_num_threads(1)
    tasks, eval_tasks, meta_steps, score_steps = (2, 1, 4, 20) if args.quick else (
        args.tasks, args.eval_tasks, args.meta_steps, args.score_steps)  # fmt: skip
    spec = _load_preset("lopt")
    meta = spec["meta"]
    probs = problems(spec)
    g = torch.Generator().manual_seed(0)
    phi = probs["per_tensor"].init_meta_params(g)
    phi = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in phi.items()}

    for prob in probs.values():  # warm-up (first-call costs), not counted
        meta_step(prob, phi, -1 % 2**31, meta)
    seconds = {"per_tensor": 0.0, "packed": 0.0}
    grad_diff = loss_diff = norm_diff = 0.0
    for draw in range(tasks):
        runs = {name: meta_step(prob, phi, draw, meta) for name, prob in probs.items()}
        for name, (s, _, _) in runs.items():
            seconds[name] += s
        (_, la, ga), (_, lb, gb) = runs["per_tensor"], runs["packed"]
        loss_diff = max(loss_diff, float(((lb - la).abs() / la.abs().clamp_min(1e-12)).max()))
        for a, b in zip(ga, gb):
            grad_diff = max(grad_diff, float((b - a).abs().max() / (a.abs().max() + 1e-12)))
        fa, fb = torch.cat([x.reshape(-1) for x in ga]), torch.cat([x.reshape(-1) for x in gb])
        norm_diff = max(norm_diff, float((fb - fa).norm() / fa.norm()))
        print(f"draw {draw}: per tensor {runs['per_tensor'][0]:.2f}s, packed "
              f"{runs['packed'][0]:.2f}s", flush=True)  # fmt: skip

    rollout_s = {"per_tensor": 0.0, "packed": 0.0}
    rollout_diff = 0.0
    for i in range(eval_tasks):
        finals = {}
        for name, prob in probs.items():
            start = time.perf_counter()
            finals[name] = prob.rollout(phi, EVAL_TASK_SEED_BASE + i, steps=150)
            rollout_s[name] += time.perf_counter() - start
        a, b = finals["per_tensor"], finals["packed"]
        rollout_diff = max(rollout_diff, float(((b - a).abs() / a.abs()).max()))

    with tempfile.TemporaryDirectory() as tmp:
        e2e = {
            name: end_to_end(Path(tmp), name == "packed", meta_steps, Path(tmp))
            for name in ("per_tensor", "packed")
        }

    score_s, score_diff = scoring(score_steps, 1 if args.quick else None)

    speedup = seconds["per_tensor"] / seconds["packed"]
    metrics = {
        "meta_step/per_tensor_s": seconds["per_tensor"] / tasks,
        "meta_step/packed_s": seconds["packed"] / tasks,
        "meta_step/speedup": speedup,
        "meta_step/max_rel_grad_diff": grad_diff,
        "meta_step/max_rel_grad_norm_diff": norm_diff,
        "meta_step/max_rel_loss_diff": loss_diff,
        "rollout/per_tensor_ms_per_step": rollout_s["per_tensor"] / (150 * eval_tasks) * 1e3,
        "rollout/packed_ms_per_step": rollout_s["packed"] / (150 * eval_tasks) * 1e3,
        "rollout/speedup": rollout_s["per_tensor"] / rollout_s["packed"],
        "rollout/max_rel_final_loss_diff": rollout_diff,
        "end_to_end/per_tensor_s_per_meta_step": e2e["per_tensor"] / meta_steps,
        "end_to_end/packed_s_per_meta_step": e2e["packed"] / meta_steps,
        "end_to_end/speedup": e2e["per_tensor"] / e2e["packed"],
        "scoring/per_tensor_s": score_s["per_tensor"],
        "scoring/packed_s": score_s["packed"],
        "scoring/speedup": score_s["per_tensor"] / score_s["packed"],
        "scoring/max_rel_final_test_diff": score_diff,
    }
    targets = {
        "meta_step_speedup": target(speedup, ">= 1.3"),
        "meta_grad_rel_norm_diff": target(norm_diff, "<= 1e-3"),
    }
    config = {
        "preset": "lopt",
        "tasks": tasks,
        "eval_tasks": eval_tasks,
        "rollout_steps": 150,
        "end_to_end_meta_steps": meta_steps,
        "scoring_steps": score_steps,
        "scoring_checkpoint": "selfref/net/pretrained/lopt.pt",
        "meta_batch": meta["meta_batch"],
        "unroll": meta["unroll"],
        "threads": 1,
        "torch": torch.__version__,
        "quick": args.quick,
    }
    out = args.out or (RESULTS_DIR / "lopt_packed.quick.json" if args.quick else None)
    write_result("lopt_packed", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
