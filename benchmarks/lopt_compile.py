"""Would ``torch.compile`` speed up the shipped learned optimizer's steps? Eager against compiled.

A probe for a later speed issue (fifteenth session's note on issue 14). A meta-step of the
``lopt`` recipe costs about 1.5 s on one thread of the 2-core CPU, most of it Python and
dispatch overhead on tiny tensors, so a faster step would fit more ensemble members in the
90-minute budget. This benchmark runs the shipped optimizer (``pretrained/lopt.pt``) on the
first ``--tasks`` meta-validation tasks of its meta-training distribution (the ``lopt``
preset's, ``label_noise_prob = 0.6``; never the selection or held-out suites), forward only
(``torch.no_grad``, as the keep-best evaluation runs them), twice side by side in one process:

- eager: :meth:`SelfReferentialNet.step_many` as it is;
- compiled: the same step with its vmapped analyzer-plus-core half
  (:meth:`SelfReferentialNet.modify_many`) under ``torch.compile`` (one compiled function for
  all tasks, as a meta-training run would need), the state made contiguous before each call,
  and the gradient (the evaluation model's reverse pass) left eager.

Per task it reports the seconds of the whole rollout, the seconds of its first ten steps (the
compile, when the task's shapes are new) and the milliseconds per step after them, and the
largest difference between the two rollouts' final outer-split losses. The totals include
compiling, as a run would pay it. No target: it measures, and the result JSON says what it
found.

Usage: python -m benchmarks.lopt_compile [--quick] [--tasks 4] [--steps 150] [--dynamic]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from benchmarks.common import RESULTS_DIR, base_parser, write_result
from selfref import checkpoints
from selfref.meta.problems.task_distribution import EVAL_TASK_SEED_BASE, TaskDistributionProblem
from selfref.net import network
from selfref.net.optimizer import default_checkpoint
from selfref.tasks.distribution import DistributionConfig

WARM = 10  # steps counted as warm-up (the compile happens in the first)


def install_compiled(net: network.SelfReferentialNet, compiled: Callable) -> None:
    """Make ``net.step_many`` run ``compiled`` (``SelfReferentialNet.modify_many`` under
    ``torch.compile``) for its analyzer-plus-core half, the state made contiguous first;
    ``del net.modify_many`` undoes it."""

    def contiguous(tree: Any) -> Any:
        return tree_map(lambda x: x.contiguous(), tree)

    def modify_many(phi: Any, ps: Any, grads: Any, an: Any, core: Any, *rest: Any) -> Any:
        return compiled(net, phi, ps, grads, contiguous(an), contiguous(core), *rest)

    net.modify_many = modify_many  # type: ignore[method-assign]


def rollout(
    problem: TaskDistributionProblem, phi: Any, seed: int, steps: int, compiled: Callable | None
) -> tuple[torch.Tensor, float, float]:
    """Final outer losses, seconds of the first ``WARM`` steps, and seconds in all; with
    ``compiled``, the net's analyzer-plus-core half runs it (:func:`install_compiled`)."""
    _, net, family = problem.task(seed)
    seeds = problem._instances()
    inner = problem._start(net, family, phi, seed, seeds, steps)
    params, state = inner.data["params"], inner.data["state"]
    if compiled is not None:
        install_compiled(net, compiled)
    warm = 0.0
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for t in range(steps):
                batch = problem.batch(net, family, t, seeds)
                params, state, _ = net.step_many(phi, params, state, batch)
                if t + 1 == WARM:
                    warm = time.perf_counter() - t0
    finally:
        if compiled is not None:
            del net.modify_many  # the problem keeps its nets: leave this one eager again
    total = time.perf_counter() - t0
    return family.final_loss(params, problem.outer_split, steps, seeds), warm, total


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=4, help="meta-validation tasks (default: 4)")
    p.add_argument("--steps", type=int, default=150, help="steps per rollout (default: 150)")
    p.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.tasks < 1 or args.steps <= WARM:
        p.error(f"--tasks must be at least 1 and --steps above {WARM}")
    if args.device != "cpu":
        p.error("this probe runs on the CPU only")
    torch.set_num_threads(args.threads)
    tasks, steps = (1, 40) if args.quick else (args.tasks, args.steps)
    ck = checkpoints.load_meta(default_checkpoint())
    problem = TaskDistributionProblem(
        net=ck["net"],
        distribution=DistributionConfig(label_noise_prob=0.6),
        eval_tasks=tasks,
        eval_instances=2,
        eval_steps=steps,
    )
    phi = {k: v.detach() for k, v in ck["best_meta_params"].items()}
    compiled = torch.compile(network.SelfReferentialNet.modify_many, dynamic=args.dynamic)
    metrics: dict[str, float] = {}
    eager_s = compiled_s = 0.0
    for i in range(tasks):
        seed = EVAL_TASK_SEED_BASE + i
        a, _, ta = rollout(problem, phi, seed, steps, None)
        b, warm, tb = rollout(problem, phi, seed, steps, compiled)
        metrics[f"task{i}/eager_ms_per_step"] = ta / steps * 1e3
        metrics[f"task{i}/compiled_first_steps_s"] = warm
        metrics[f"task{i}/compiled_ms_per_step_after_warmup"] = (tb - warm) / (steps - WARM) * 1e3
        metrics[f"task{i}/max_abs_loss_diff"] = float((a - b).abs().max())
        eager_s += ta
        compiled_s += tb
        print(
            f"task {i}: eager {ta:.2f}s, compiled {tb:.2f}s (first {WARM} steps {warm:.1f}s), "
            f"loss diff {metrics[f'task{i}/max_abs_loss_diff']:.1e}",
            flush=True,
        )
    metrics["eager_total_s"] = eager_s
    metrics["compiled_total_s"] = compiled_s
    metrics["compiled_over_eager_total"] = compiled_s / eager_s
    config = {
        "checkpoint": f"selfref/net/pretrained/{default_checkpoint().name}",
        "tasks": tasks,
        "steps": steps,
        "dynamic": bool(args.dynamic),
        "threads": args.threads,
        "warm_steps": WARM,
        "torch": torch.__version__,
        "quick": args.quick,
    }
    out = args.out or (RESULTS_DIR / "lopt_compile.quick.json" if args.quick else None)
    write_result("lopt_compile", config, metrics, {}, out=out)


if __name__ == "__main__":
    main()
