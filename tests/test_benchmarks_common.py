"""benchmarks/common.py: the grid-edge check every benchmark that tunes a baseline uses."""

from __future__ import annotations

import math

import pytest

from benchmarks.common import check_not_on_edge, grid_edge, target

GRID = tuple(10 ** (k / 4) for k in range(-8, 3))  # 1e-2 ... 10^0.5, not exact decimals


def test_grid_edge_names_the_end_a_value_lies_on() -> None:
    assert grid_edge(GRID, GRID[0]) == "low"
    assert grid_edge(GRID, GRID[-1]) == "high"
    assert all(grid_edge(GRID, g) is None for g in GRID[1:-1])
    # the order of the grid does not matter, only its ends
    assert grid_edge(tuple(reversed(GRID)), GRID[-1]) == "high"
    # a value recomputed in floating point (as a JSON round trip would) still matches
    assert grid_edge(GRID, float(repr(10**0.5))) == "high"


def test_check_not_on_edge_raises_on_either_end_and_passes_inside() -> None:
    check_not_on_edge(GRID, GRID[1], "adam lr")
    check_not_on_edge(GRID, GRID[-2], "adam lr")
    with pytest.raises(ValueError, match=r"sgd lr = 3\.16228 lies on the high edge"):
        check_not_on_edge(GRID, GRID[-1], "sgd lr")
    with pytest.raises(ValueError, match="low edge"):
        check_not_on_edge(GRID, GRID[0], "sgd lr")


def test_grid_edge_rejects_values_off_the_grid_and_grids_without_interior() -> None:
    with pytest.raises(ValueError, match="not a point of the grid"):
        grid_edge(GRID, 0.5)
    with pytest.raises(ValueError, match="at least 3 points"):
        grid_edge((0.1, 1.0), 0.1)


def test_target_is_computed_from_the_value() -> None:
    assert target(0.3, ">= 0.25")["met"] is True
    assert target(0.2, ">= 0.25")["met"] is False
    assert target(math.nan, "<= 1")["met"] is False
    assert target(math.inf, "<= 1")["met"] is False


def test_heldout_plot_draws_the_committed_result_and_reads_the_step_curve(tmp_path):
    """The held-out figure is drawn from a lopt_heldout JSON alone; its step panel places a
    task at (log10 tuned-Adam lr, log10 of the mean natural-log step)."""
    import json
    import math

    from benchmarks.common import RESULTS_DIR
    from benchmarks.heldout_plot import fit_points, plot_heldout, step_points

    row = {"task": "t", "adam": {"setting": {"lr": 1e-2}}, "ratio_vs_adam": 0.5,
           "learned": {"log_step_curve": [[0, math.log(1e-3)], [10, math.log(1e-1)]]}}  # fmt: skip
    [(name, lr, step, ratio)] = step_points([row, {**row, "learned": {}}])
    assert name == "t" and lr == -2.0 and abs(step + 2.0) < 1e-12 and ratio == 0.5
    fit = {**row, "adam": {**row["adam"], "train": {"mean": 0.2}},
           "learned": {"train": {"mean": 0.4}}}  # fmt: skip
    [(name, tr, te)] = fit_points([fit, row])  # the row without the train column is left out
    assert abs(tr - math.log10(2.0)) < 1e-12 and abs(te - math.log10(0.5)) < 1e-12
    result = json.loads((RESULTS_DIR / "lopt_heldout.json").read_text())
    assert len(fit_points(result["config"]["per_task"])) == len(result["config"]["per_task"])
    out = plot_heldout(result, tmp_path / "h.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    old = {**result, "config": {**result["config"], "per_task": [
        {**r, "learned": {k: v for k, v in r["learned"].items() if k != "train"}}
        for r in result["config"]["per_task"]]}}  # fmt: skip
    assert plot_heldout(old, tmp_path / "o.png").stat().st_size > 10_000  # two panels
