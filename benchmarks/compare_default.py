"""The default ``selfref compare`` (digits-mlp, quick budget, seeds 0–2, every installed method).

Runs the command exactly as a user types it (``selfref compare``, in a subprocess, with
``--logdir`` in a temporary directory), reads the run's ``results.json`` and writes the
table: per method the final test loss as mean ± sample sd over the seeds, the best seed
and every seed's, the
val loss, test accuracy, gradient evaluations spent from the budget and the meta-training
gradient evaluations reported beside it. Target: ``selfref`` has the lowest mean test loss
of all methods (``selfref_minus_best_other_test_loss <= 0``).

Run: ``python -m benchmarks.compare_default`` (``--quick``: one seed, a 300-evaluation
budget, three methods — a smoke run, written to ``compare_default.quick.json``; ``--seeds
0,1,...,9 --out F``: the same run over more seeds, a diagnostic of how far the default's three
seeds separate the methods).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import base_parser, target, write_result


def _table(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        row = out.setdefault(r["method"], {"runs": 0, "ok": 0, "test": [], "val": [], "acc": []})
        row["runs"] += 1
        if r["status"] == "ok":
            row["ok"] += 1
            row["test"].append(r["test_loss"])
            row["val"].append(r["val_loss"])
            if r.get("test_accuracy") is not None:
                row["acc"].append(r["test_accuracy"])
        row.setdefault("grad_evals", []).append(r["grad_evals"])
        row.setdefault("meta_train_grad_evals", []).append(r["meta_train_grad_evals"])
        row.setdefault("wall_s", []).append(r["wall_s"])
    table = {}
    for m, row in out.items():
        t = row["test"] or [float("inf")]
        table[m] = {
            "ok_runs": f"{row['ok']}/{row['runs']}",
            "test_loss_mean": statistics.fmean(t),
            "test_loss_sd": statistics.stdev(t) if len(t) > 1 else 0.0,  # sample sd, as the table
            "test_loss_per_seed": list(row["test"]),
            "test_loss_best": min(t),
            "val_loss_mean": statistics.fmean(row["val"]) if row["val"] else None,
            "test_accuracy_mean": statistics.fmean(row["acc"]) if row["acc"] else None,
            "grad_evals_mean": statistics.fmean(row["grad_evals"]),
            "meta_train_grad_evals": statistics.fmean(row["meta_train_grad_evals"]),
            "wall_s_mean": statistics.fmean(row["wall_s"]),
        }
    return table


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default=None, metavar="0,1,...",
                   help="other seeds than the default's 0-2 (a diagnostic: the target is "
                        "the default's; write it with --out)")  # fmt: skip
    args = p.parse_args()
    if args.quick and args.seeds:
        raise SystemExit("--quick runs its own one seed; drop --seeds")
    argv = ["compare"]
    if args.quick:
        argv += ["--methods", "grid,hypernet,selfref", "--seeds", "0", "--budget", "300"]
    elif args.seeds:
        if not args.out:
            raise SystemExit("--seeds is a diagnostic: name its file with --out")
        argv += ["--seeds", args.seeds]
    if args.device != "cpu":
        argv += ["--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "selfref.cli", *argv, "--logdir", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"selfref compare failed ({proc.returncode}):\n{proc.stderr}")
        (run,) = list(Path(tmp, "compare").iterdir())
        results = json.loads((run / "results.json").read_text())
        markdown = (run / "results.md").read_text().splitlines()
    table = _table(results)
    others = {m: v["test_loss_mean"] for m, v in table.items() if m != "selfref"}
    best_other = min(others, key=others.__getitem__)
    gap = table["selfref"]["test_loss_mean"] - others[best_other]
    metrics: dict[str, Any] = {f"{m}/{k}": v for m, row in table.items() for k, v in row.items()}
    metrics.update({"best_other_method": best_other, "wall_s": wall})
    targets = {"selfref_minus_best_other_test_loss": target(gap, "<= 0")}
    markdown = [line for line in markdown if not line.startswith("- run directory")]  # a tmp dir
    config = {"argv": ["selfref", *argv], "table_markdown": markdown, "quick": args.quick}
    out = args.out or ("benchmarks/results/compare_default.quick.json" if args.quick else None)
    write_result("compare_default", config, metrics, targets, out)


if __name__ == "__main__":
    main()
