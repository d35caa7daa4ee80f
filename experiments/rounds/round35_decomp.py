"""Round 35's diagnostic: where a learned optimizer's step falls, on the selection suite.

For each task of the six-task selection suite (never the held-out suite), runs the checkpoint
for the task's selection horizon on two seeds and prints, at six points, the mean log step
``log α + a_T + s_i`` split into its parts: ``log α`` (φ's base learning rate, the members'
mean), the per-tensor offset (the controller's bounded head and accumulated A_T, plus the
held-out step rule's H_T), and the per-coordinate log-magnitude s_i (the rest). An ensemble's
metrics are its members' means.

Run (from the repository root)::

    python -m experiments.rounds.round35_decomp selfref/net/pretrained/lopt.pt
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch.func import vmap

from benchmarks.lopt_select import SELECTION_SUITE
from selfref import checkpoints
from selfref.meta.family import TaskFamily
from selfref.net import SelfReferentialNet
from selfref.tasks.distribution import build_task

POINTS = 5  # intervals of the printed curve (POINTS + 1 rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ck = checkpoints.load_meta(args.checkpoint)
    phi_all = checkpoints.meta_params_of(ck, "best")
    log_lrs = [float(v) for k, v in phi_all.items() if k.endswith("log_lr")]
    log_alpha = sum(log_lrs) / len(log_lrs)
    print(f"log α per member: {', '.join(f'{x:.2f}' for x in log_lrs)}")
    for ht in SELECTION_SUITE:
        task = build_task(ht.spec)
        family = TaskFamily(task)
        net = SelfReferentialNet.from_description(task, ck["net"])
        phi = {k: v.to(task.dtype) for k, v in phi_all.items()}
        seeds, steps = [0, 1], 200 * ht.horizon_mult
        params = family.init_params(seeds)
        state = vmap(partial(net.init_state, phi, horizon=steps))(params)
        print(f"{ht.name} ({steps} steps)")
        with torch.no_grad():
            for t in range(steps):
                b = family.batch("train", t, seeds)
                if net.evaluation.reads_heldout(t):
                    b = {**b, "heldout": family.batch("val", t, seeds)}
                params, state, m = net.step_many(phi, params, state, b)
                if t % (steps // POINTS) and t != steps - 1:
                    continue
                mean = {k: float(v.mean()) for k, v in m.items() if k.startswith("lopt/")}
                step, offset = mean["lopt/log_step_mean"], mean["lopt/offset_mean"]
                held = mean.get("lopt/heldout_step_mean", 0.0)
                print(
                    f"  t={t:4d}: log step {step:6.2f} = log α {log_alpha:.2f} + offset "
                    f"{offset:5.2f} (H_T {held:5.2f}, A_T {mean['lopt/adapt_mean']:5.2f}) + "
                    f"s_i {step - log_alpha - offset:5.2f}"
                )


if __name__ == "__main__":
    main()
