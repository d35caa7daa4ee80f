"""Quality of the L2L LSTM on 10-d quadratics (Andrychowicz et al. 2016, section 3.1).

Metric: mean log10 f(θ_100) over 100 held-out *test* functions for the learned LSTM and for
SGD, NAG, RMSprop and Adam, each at the learning rate that a grid chose on training
functions, all measured side by side in this run. Two meta-training settings run: ``paper``
(constant meta-lr 1e-3, Σ f(θ_t), 1000 meta-steps × 128 functions) and ``recipe`` (log
meta-loss, cosine meta-lr with warmup, a horizon curriculum; experiments/configs/
l2l_quadratic.json). The reported learned number is the setting with the better *val* score
(checkpoint choice never looks at test functions). Target: learned at least 0.3 below the
best tuned baseline (stretch 0.5).

Usage: python -m benchmarks.l2l_quadratic [--quick] [--device cuda] [--variants paper,recipe]
"""

from __future__ import annotations

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from experiments.l2l_quadratic import load_config, run


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="paper,recipe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="processes for meta-training runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v for v in args.variants.split(",") if v]
    res = run(variants, args.quick, device, workers=args.workers)
    base = {k: v["test_log10"] for k, v in res["baselines"].items()}
    best_base = min(base, key=base.__getitem__)
    chosen = min(res["learned"], key=lambda k: res["learned"][k]["val_log10"])
    learned = res["learned"][chosen]["test_log10"]
    metrics = {f"{k}_log10": v for k, v in base.items()}
    metrics.update({f"{k}_lr": v["lr"] for k, v in res["baselines"].items()})
    for v, r in res["learned"].items():
        metrics[f"learned_{v}_log10"] = r["test_log10"]
        metrics[f"learned_{v}_val_log10"] = r["val_log10"]
        metrics[f"learned_{v}_log10_at_200"] = r["test_log10_at_200"]
        metrics[f"learned_{v}_meta_train_s"] = r["meta_train_s"]
        metrics[f"learned_{v}_best_step"] = r["best_step"]
        for rr in r["restarts"]:
            metrics[f"learned_{v}_seed{rr['seed']}_val_log10"] = rr["val_log10"]
            metrics[f"learned_{v}_seed{rr['seed']}_log10"] = rr["test_log10"]
    metrics["learned_log10"] = learned
    metrics["margin_vs_best_baseline"] = base[best_base] - learned
    cfg = load_config(args.quick)
    config = {
        "device": device,
        "quick": args.quick,
        "steps": cfg["steps"],
        "test_functions": cfg["test_seeds"],
        "tune_functions": cfg["tune_seeds"],
        "variants": {v: cfg["variants"][v] for v in variants},
        "chosen_variant": chosen,
        "best_baseline": best_base,
        "threads": args.threads,
        "workers": args.workers,
    }
    targets = {
        "margin_vs_best_baseline": target(metrics["margin_vs_best_baseline"], ">= 0.3"),
        "margin_vs_best_baseline_stretch": target(metrics["margin_vs_best_baseline"], ">= 0.5"),
    }
    out = args.out or (RESULTS_DIR / "l2l_quadratic.quick.json" if args.quick else None)
    write_result("l2l_quadratic", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
