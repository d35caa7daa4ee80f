"""``selfref meta-train``: run directory, checkpoints, resume, bad input."""

from __future__ import annotations

import json

import torch

from selfref.meta import load_checkpoint

TINY = (
    "--meta-steps",
    4,
    "--unroll",
    2,
    "--inner-steps",
    4,
    "--meta-batch",
    4,
    "--eval-tasks",
    4,
    "--eval-every",
    2,
    "--checkpoint-every",
    2,
    "--device",
    "cpu",
)


def _run_dir(logdir):
    (d,) = list((logdir / "meta-train").iterdir())
    return d


def test_meta_train_writes_run_and_checkpoints(run_cli, tmp_logdir):
    r = run_cli(
        "meta-train", "--task", "quadratic", "--core", "lstm", *TINY, "--logdir", tmp_logdir
    )
    assert r.code == 0, r.err
    d = _run_dir(tmp_logdir)
    assert {"config.json", "argv.txt", "results.json", "checkpoints"} <= {
        p.name for p in d.iterdir()
    }
    assert any(p.name.startswith("events.out.tfevents") for p in d.iterdir())
    res = json.loads((d / "results.json").read_text())
    assert res["task"] == "quadratic" and res["meta_steps"] == 4
    best = load_checkpoint(d / "checkpoints" / "best.pt")
    assert best["step"] == res["best_step"]
    assert load_checkpoint(d / "checkpoints" / "last.pt")["step"] == 4
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["meta"]["unroll"] == 2 and cfg["net"]["core"] == "lstm"


def test_resume_continues_to_the_same_result(run_cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [x for x in TINY]
    assert run_cli("meta-train", *args, "--logdir", a).code == 0
    short = list(args)
    short[1] = 2  # --meta-steps 2 … then extend the saved config to 4 and resume
    assert run_cli("meta-train", *short, "--logdir", b).code == 0
    d = _run_dir(b)
    cfg = json.loads((d / "config.json").read_text())
    cfg["meta"]["meta_steps"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("meta-train", "--resume", d)
    assert r.code == 0, r.err
    full = load_checkpoint(_run_dir(a) / "checkpoints" / "last.pt")
    resumed = load_checkpoint(d / "checkpoints" / "last.pt")
    assert resumed["step"] == 4
    for k, v in full["meta_params"].items():
        assert torch.equal(v, resumed["meta_params"][k]), k


def test_bad_input_is_one_line_and_exit_2(run_cli, tmp_logdir, tmp_path):
    r = run_cli("meta-train", "--core", "nope", "--logdir", tmp_logdir)
    assert r.code == 2 and "lstm" in r.err
    r = run_cli("meta-train", "--task", "nope", "--logdir", tmp_logdir)
    assert r.code == 2 and "quadratic" in r.err
    r = run_cli("meta-train", "--resume", tmp_path / "missing")
    assert r.code == 2 and len(r.err_lines) == 1 and "does not exist" in r.err
    r = run_cli("meta-train", "--meta-steps", 0)
    assert r.code == 2
    r = run_cli("meta-train", "--task", "quadratic", "-o", "dim", *TINY, "--logdir", tmp_logdir)
    assert r.code == 2 and len(r.err_lines) == 1 and "key=value" in r.err


def test_help_lists_installed_cores(run_cli):
    from selfref.net.cores import core_names

    r = run_cli("meta-train", "--help")
    assert r.code == 0
    for name in core_names():
        assert name in r.out
