"""Print the README's benchmark table from ``benchmarks/results/*.json`` (default settings).

Every target of every committed result becomes one row: benchmark, target name, measured
value, target, met, machine. Device results (``<name>.cuda*.json``, default settings run with
``--device cuda``) are listed beside the CPU ones; ``--all`` also lists quick results.
Run: ``python -m benchmarks.table``.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import RESULTS_DIR


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def rows(include_all: bool = False) -> list[str]:
    out = [
        "| benchmark | target | measured | goal | met | machine |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS_DIR.glob("*.json")):
        variant = path.name[: -len(".json")].split(".", 1)
        if len(variant) > 1 and "quick" in variant[1] and not include_all:
            continue
        rec = json.loads(path.read_text())
        m = rec.get("machine", {})
        cpu = f"{m.get('cores')}-core CPU"
        on_cpu = rec.get("config", {}).get("device", "cpu") == "cpu"
        where = (f"{cpu} of the {m['gpu']} host" if on_cpu else m["gpu"]) if m.get("gpu") else cpu
        name = rec.get("benchmark", path.stem) + (f" ({variant[1]})" if len(variant) > 1 else "")
        for tname, t in rec.get("targets", {}).items():
            met = "yes" if t.get("met") else "**no**"
            cells = [name, tname, _fmt(t.get("value")), str(t.get("target")), met, where]
            out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--all", action="store_true", help="include quick and device results")
    args = p.parse_args()
    print("\n".join(rows(args.all)))


if __name__ == "__main__":
    main()
