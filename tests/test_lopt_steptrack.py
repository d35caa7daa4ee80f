"""benchmarks/lopt_steptrack.py: the step-tracking diagnostic's arithmetic, tasks and a run."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.lopt_steptrack import (
    XOR_TASKS,
    design_specs,
    fit_line,
    main,
    mean_log_step,
    xor_spec,
)
from selfref.tasks.distribution import DistributionConfig, TaskDistribution


def test_mean_log_step_is_the_time_average_over_uneven_points():
    assert mean_log_step([(0, -3.0), (10, -5.0)]) == pytest.approx(-4.0)
    # −3 held for 10 steps, then a fall to −7 over the next 30: (−30 − 150) / 40
    assert mean_log_step([(0, -3.0), (10, -3.0), (40, -7.0)]) == pytest.approx(-4.5)
    assert mean_log_step([(0, -2.0)]) == -2.0


def test_fit_line_recovers_slope_intercept_and_correlation():
    got = fit_line([0.0, 1.0, 2.0, 3.0], [1.0, 0.5, 0.0, -0.5])
    assert got["slope"] == pytest.approx(-0.5) and got["intercept"] == pytest.approx(1.0)
    assert got["r"] == pytest.approx(-1.0)
    assert fit_line([0.0, 1.0], [2.0, 2.0])["r"] == 0.0  # a flat line: no correlation
    with pytest.raises(ValueError, match="two distinct"):
        fit_line([1.0, 1.0], [0.0, 1.0])


def test_tasks_lie_outside_both_evaluation_suites():
    """The design tasks are the meta-training distribution's (the rounds' design seeds); the
    xor tasks use a generator that neither suite uses."""
    dist = TaskDistribution(DistributionConfig(label_noise_prob=0.6))
    assert all(dist.contains(s) for s in design_specs(5))
    specs = [xor_spec(*t) for t in XOR_TASKS]
    assert {s.data for s in specs} == {"xor"} and len(specs) == 8
    from benchmarks.lopt_heldout import SUITE
    from benchmarks.lopt_select import SELECTION_SUITE

    used = {t.spec.data for t in SUITE} | {t.spec.data for t in SELECTION_SUITE}
    assert "xor" not in used


@pytest.mark.slow
def test_quick_run_writes_rows_metrics_and_a_plot(tmp_path, monkeypatch):
    out = tmp_path / "steptrack.json"
    monkeypatch.setattr(sys, "argv", ["lopt_steptrack", "--quick", "--workers", "1",
                                      "--out", str(out)])  # fmt: skip
    main()
    record = json.loads(out.read_text())
    rows = record["config"]["per_task"]
    assert [r["kind"] for r in rows] == ["design", "design", "xor", "xor"]
    for r in rows:
        (run,) = r["learned"].values()
        assert run["ratio"] == pytest.approx(run["test"] / r["adam_test"])
        assert -12 < run["mean_log_step"] < 0 and not run["diverged"]
    assert record["metrics"]["tasks"] == 4 and "c0/all/slope" in record["metrics"]
    assert out.with_suffix(".png").stat().st_size > 1000
