"""`selfref compare` and `selfref methods`: outputs, TensorBoard files, bad input, plug-ins."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from selfref import methods
from selfref.compare import (
    CompareConfig,
    _step_values,
    plot_curves,
    resolve_budget,
    results_markdown,
    results_table,
    run_comparison,
)
from selfref.logging import MemoryLogger
from selfref.methods.base import CurvePoint, Result
from selfref.tasks import make

pytest.importorskip("method_smoke")  # tests/ is on sys.path: ConstantMethod lives there


def _events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


def _only_run_dir(logdir: Path) -> Path:
    runs = list((logdir / "compare").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_compare_on_a_tiny_budget_writes_every_output(tmp_path: Path, run_cli) -> None:
    logdir = tmp_path / "logs"
    names = ["grid", "random"] + (["tpe"] if "tpe" in methods.names() else [])
    r = run_cli(
        "compare", "--methods", ",".join(names), "--seeds", "0,1", "--budget", "60",
        "--steps-per-trial", "20", "--workers", "0", "--logdir", logdir,
    )  # fmt: skip
    assert r.code == 0, r.err
    run = _only_run_dir(logdir)
    assert run.name.endswith("-compare")
    for f in (
        "config.json",
        "argv.txt",
        "results.json",
        "results.md",
        "curves.png",
        "trials.jsonl",
    ):
        assert (run / f).is_file(), f
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())["compare"]
    assert config["methods"] == names and config["grad_evals"] == 60 and config["seeds"] == [0, 1]
    results = json.loads((run / "results.json").read_text())
    assert [(d["method"], d["seed"]) for d in results] == [(m, s) for m in names for s in (0, 1)]
    for d in results:
        assert d["status"] == "ok" and d["grad_evals"] == 60 and d["test_accuracy"] > 0
        assert [g for g, _ in d["curve"]] == [20, 40, 60]
    table = (run / "results.md").read_text()
    for m in names:
        assert f"| {m} | 2/2 |" in table
    assert "final val loss" in table and "test accuracy" in table and "wall s" in table
    assert table.strip() in r.out.replace("\r", "")
    assert f"tensorboard --logdir {run}" in r.out
    # TensorBoard: one run per method and seed with the curve at step = grad evals,
    # one hparams entry each, and the custom-scalars layout at the root
    for m in names:
        for s in (0, 1):
            ea = _events(run / "tb" / f"{m}-s{s}")
            curve = ea.Scalars("best/val_loss_vs_grad_evals")
            assert [e.step for e in curve] == [20, 40, 60]
            want = next(d for d in results if (d["method"], d["seed"]) == (m, s))["curve"]
            assert [e.value for e in curve] == pytest.approx([v for _, v in want], rel=1e-6)
            hp = ea.PluginTagToContent("hparams")
            assert "_hparams_/session_start_info" in hp and "_hparams_/experiment" in hp
            assert "final/val_loss" in ea.Tags()["scalars"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    root = _events(run / "tb")
    [event] = root.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert any(tags == [r"^best/val_loss_vs_grad_evals$"] for tags in charts.values()), charts


def test_a_failing_method_is_recorded_and_the_rest_continue(tmp_path: Path, run_cli) -> None:
    logdir = tmp_path / "logs"
    r = run_cli(
        "compare", "--methods", "grid,random", "--seeds", "0", "--budget", "40",
        "--steps-per-trial", "20", "--workers", "0", "--logdir", logdir,
        "--method-option", "grid.points=9",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "grid s0: FAILED: ValueError: a grid of 729 points" in r.err
    run = _only_run_dir(logdir)
    results = json.loads((run / "results.json").read_text())
    assert [d["status"] for d in results] == ["failed", "ok"]
    assert "Traceback" in results[0]["extra"]["traceback"]
    table = (run / "results.md").read_text()
    assert "| grid | 0/1 | — |" in table and "- grid: ValueError" in table


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--methods", "grid,sgdr"], "unknown method 'sgdr'; known methods: grid, random"),
        (["--task", "imagenet"], "unknown task 'imagenet'; known tasks:"),
        (["--budget", "50"], "budget of 50 gradient evaluations is smaller than one trial of 100"),
        (["--budget", "huge"], "unknown budget 'huge'; valid: quick, full"),
        (["--seeds", "a,b"], "--seeds 'a,b' must be comma-separated integers"),
        (["--seeds", "0,0"], r"repeated seeds in \[0, 0\]"),
        (["--method-option", "tpe.n_startup_trials=2", "--methods", "grid"], "names methods not"),
        (["--space", "SPACE:inverted"], "inverted range low=1 high=0.1"),
        (["--space", "SPACE:empty"], "empty range low=0.1 high=0.1"),
        (["--space", "SPACE:unknown"], r"unknown keys \['steps'\]"),
        (["--space", "SPACE:toplevel"], "unknown key 'sampler'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, run_cli, args, match) -> None:
    spaces = {
        "inverted": '[lr]\ntype = "float"\nlow = 1.0\nhigh = 0.1\n',
        "empty": '[lr]\ntype = "float"\nlow = 0.1\nhigh = 0.1\n',
        "unknown": '[lr]\ntype = "float"\nlow = 0.1\nhigh = 1.0\nsteps = 3\n',
        "toplevel": 'sampler = "tpe"\n[lr]\ntype = "float"\nlow = 0.1\nhigh = 1.0\n',
    }
    args = [
        str(_write(tmp_path, spaces[a.split(":")[1]])) if a.startswith("SPACE:") else a
        for a in args
    ]
    logdir = tmp_path / "logs"
    r = run_cli("compare", *args, "--workers", "0", "--logdir", logdir)
    assert r.code == 2
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("selfref: error: ")
    import re

    assert re.search(match, r.err_lines[0]), r.err_lines[0]
    assert not logdir.exists()  # nothing was started


def test_resume_refuses_new_configuration(tmp_path: Path, run_cli) -> None:
    r = run_cli("compare", "--resume", tmp_path / "nope")
    assert r.code == 2 and "does not exist" in r.err
    r = run_cli("compare", "--resume", tmp_path, "--methods", "grid")
    assert r.code == 2 and "drop --methods" in r.err
    r = run_cli("compare", "--resume", tmp_path)
    assert r.code == 2 and "no config.json" in r.err


def test_defaults_are_the_quick_comparison_of_every_installed_method() -> None:
    from selfref.cli import build_parser
    from selfref.commands.compare import _build_config

    args = build_parser().parse_args(["compare"])
    cfg = _build_config(args)
    assert cfg.task == "digits-mlp" and cfg.methods == tuple(methods.names())
    assert (cfg.grad_evals, cfg.steps_per_trial, cfg.seeds) == (2000, 100, (0, 1, 2))
    assert cfg.workers >= 1 and cfg.budget_name == "quick"
    assert resolve_budget("full") == (10_000, 200, (0, 1, 2, 3, 4))
    assert resolve_budget(500, 50) == (500, 50, (0, 1, 2))
    assert CompareConfig.from_dict(cfg.to_dict()) == cfg


def test_compare_on_quadratics_scores_the_trained_function() -> None:
    from selfref.cli import build_parser
    from selfref.commands.compare import _build_config

    cfg = _build_config(build_parser().parse_args(["compare", "--task", "quadratic"]))
    assert cfg.task_options == {"functions": "fixed"}  # val/test = the training objective
    given = ["compare", "--task", "quadratic", "--task-option", "functions=per_split"]
    assert _build_config(build_parser().parse_args(given)).task_options == {
        "functions": "per_split"
    }
    assert _build_config(build_parser().parse_args(["compare"])).task_options == {}


def test_later_methods_plug_in_by_name(monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    """A method registered later runs with no change to compare; it gets only the options
    its constructor takes; its own hparams entry is merged into the harness's one."""
    extra = {
        "constant": "method_smoke:ConstantMethod",
        "strict": "method_smoke:StrictOptionsMethod",
    }
    monkeypatch.setattr(methods, "REGISTRY", MappingProxyType({**methods.REGISTRY, **extra}))
    task = make("quadratic")
    loggers: dict[str, MemoryLogger] = {}

    def make_logger(name: str) -> MemoryLogger:
        loggers[name] = MemoryLogger()
        return loggers[name]

    cfg = CompareConfig(
        task="quadratic",
        methods=("constant", "strict", "random"),
        seeds=(0, 1),
        grad_evals=40,
        steps_per_trial=20,
        workers=0,
        method_options={"constant": {"value": 2.0}},
    )
    seen: list[str] = []
    results = run_comparison(
        cfg, task, make_logger=make_logger, on_result=lambda r, _: seen.append(r.method)
    )
    assert seen == ["constant", "constant", "strict", "strict", "random", "random"]
    assert [r.status for r in results] == ["ok"] * 6  # strict got no harness options
    const = results[0]
    assert const.status == "ok" and const.val_loss == 2.0 and const.meta_train_grad_evals == 5
    lg = loggers["constant-s0"]
    assert lg.scalars["best/val_loss_vs_grad_evals"] == [(10, 2.0)]  # written by the harness
    [(hp, metrics)] = lg.hparam_entries
    assert hp["value"] == 2.0 and hp["method"] == "constant" and hp["seed"] == 0
    assert metrics["own/metric"] == 2.0 and metrics["cost/meta_train_grad_evals"] == 5
    assert lg.closed
    # a method that raises is a failed Result; a resumed comparison keeps the finished pairs
    failing = CompareConfig(**{**cfg.__dict__, "method_options": {"constant": {"fail": True}}})
    again = run_comparison(failing, task, previous=results[2:])
    assert [r.status for r in again] == ["failed", "failed", "ok", "ok", "ok", "ok"]
    assert "RuntimeError: constant method asked to fail" in again[0].reason
    assert again[2] is results[2]


def test_results_table_statistics() -> None:
    def res(m: str, s: int, v: float, status: str = "ok") -> Result:
        return Result(
            method=m, task="t", seed=s, val_loss=v, test_loss=v + 1, test_accuracy=0.5,
            grad_evals=100, wall_s=2.0, status=status,  # type: ignore[arg-type]
            reason=None if status == "ok" else "boom",
        )  # fmt: skip

    rs = [res("a", 0, 1.0), res("a", 1, 3.0), res("b", 0, 5.0), res("b", 1, math.nan, "failed")]
    rows = results_table(rs)
    a, b = rows
    assert a["val_loss"] == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert a["test_loss"][0] == 3.0 and a["ok"] == 2 and a["runs"] == 2
    assert b["val_loss"] == (5.0, 0.0, 1) and b["ok"] == 1 and b["reasons"] == ["boom"]
    md = results_markdown(rs)
    assert "| a | 2/2 | 2.0000 ± 1.4142 | 3.0000 ± 1.4142 | 0.5000 ± 0.0000 | 100 ± 0 |" in md
    assert "- b: boom" in md


def test_plot_and_step_interpolation(tmp_path: Path) -> None:
    import numpy as np

    curve = [CurvePoint(10, 3.0), CurvePoint(30, 1.0)]
    got = _step_values(curve, np.array([5.0, 10.0, 20.0, 30.0, 40.0]))
    np.testing.assert_array_equal(got, [np.nan, 3.0, 3.0, 1.0, 1.0])
    rs = [
        Result(method="a", task="t", seed=0, curve=curve),
        Result(method="a", task="t", seed=1, curve=[CurvePoint(20, 2.0)]),
        Result(method="b", task="t", seed=0),  # no curve (failed): skipped
    ]
    p = plot_curves(rs, tmp_path / "c.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_methods_command_lists_installed_and_missing(
    monkeypatch: pytest.MonkeyPatch, run_cli
) -> None:
    r = run_cli("methods")
    assert r.code == 0
    lines = {ln.split()[0]: ln for ln in r.out.splitlines() if ln.strip()}
    assert "installed" in lines["grid"] and "Bergstra & Bengio 2012" in lines["grid"]
    assert "installed" in lines["random"]
    monkeypatch.setitem(sys.modules, "optuna", None)
    r = run_cli("methods")
    lines = {ln.split()[0]: ln for ln in r.out.splitlines() if ln.strip()}
    assert "missing" in lines["tpe"] and "pip install 'selfref[optuna]'" in lines["tpe"]
    assert "missing" in lines["gp"]
