"""Run directories: never overwritten, atomic writes, torn trials.jsonl, checkpoints."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from selfref.methods.base import CurvePoint, Result
from selfref.runs import RunDir, atomic_torch_save, atomic_write_text, check_logdir


def test_create_layout_and_argv(tmp_logdir):
    run = RunDir.create(tmp_logdir, "exp", "adam", seed=3, argv=["selfref", "train", "--lr", "0.1"])
    assert run.path.parent == tmp_logdir / "exp"
    assert run.path.name.endswith("-adam-s3")
    assert (run.path / "argv.txt").read_text() == "selfref train --lr 0.1\n"


def test_never_overwritten(tmp_logdir):
    runs = [RunDir.create(tmp_logdir, "exp", "sgd", seed=0, argv=["x"]) for _ in range(4)]
    assert len({r.path for r in runs}) == 4
    runs[0].write_config({"first": True})
    again = RunDir.create(tmp_logdir, "exp", "sgd", seed=0, argv=["x"])
    assert again.path not in {r.path for r in runs}
    assert runs[0].read_config() == {"first": True}


def test_logdir_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_logdir(f)
    with pytest.raises(ValueError, match="is a file"):
        RunDir.create(f, "exp", "sgd")


def test_open_missing_run_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RunDir.open(tmp_path / "nope")


def test_config_and_results_round_trip(tmp_logdir):
    run = RunDir.create(tmp_logdir, "exp", "m", argv=["x"])
    run.write_config({"dtype": torch.float64, "t": torch.tensor([1.0, 2.0]), "p": tmp_logdir})
    cfg = run.read_config()
    assert (
        cfg["dtype"] == "torch.float64" and cfg["t"] == [1.0, 2.0] and cfg["p"] == str(tmp_logdir)
    )
    res = Result(method="m", task="t", seed=1, val_loss=math.nan, curve=[CurvePoint(5, 0.5)])
    run.write_results(res.to_dict())
    back = Result.from_dict(run.read_results())
    assert math.isnan(back.val_loss) and back.curve == [CurvePoint(5, 0.5)]
    # strict JSON: NaN never reaches the file
    assert "NaN" not in (run.path / "results.json").read_text()
    assert RunDir.open(run.path).read_results() == run.read_results()


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp file left


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write_text(path, "a" * 1000)
    atomic_write_text(path, "b")
    assert path.read_text() == "b"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_unserializable_results_do_not_clobber(tmp_logdir):
    run = RunDir.create(tmp_logdir, "exp", "m", argv=["x"])
    run.write_results({"ok": 1})
    with pytest.raises(ValueError):
        run.write_results({"bad": float("nan")})  # strict JSON refuses NaN
    assert run.read_results() == {"ok": 1}


def test_trials_jsonl_append_and_torn_last_line(tmp_logdir):
    run = RunDir.create(tmp_logdir, "exp", "grid", argv=["x"])
    assert run.read_trials() == []
    run.append_trial({"trial": 0, "lr": 0.1, "val_loss": 1.5})
    run.append_trial({"trial": 1, "lr": torch.tensor(0.01), "val_loss": 1.2})
    with open(run.path / "trials.jsonl", "a") as f:
        f.write('{"trial": 2, "lr": 0.0')  # a crash mid-write
    trials = run.read_trials()
    assert [t["trial"] for t in trials] == [0, 1]
    assert trials[1]["lr"] == pytest.approx(0.01)
    lines = (run.path / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["lr"] == 0.1


def test_checkpoint_round_trip(tmp_logdir):
    run = RunDir.create(tmp_logdir, "exp", "m", argv=["x"])
    g = torch.Generator().manual_seed(0)
    state = {"params": {"w": torch.randn(3, 4, generator=g)}, "step": 7, "rng": g.get_state()}
    p = run.save_checkpoint(state)
    assert p == run.checkpoints / "last.pt"
    back = run.load_checkpoint()
    assert torch.equal(back["params"]["w"], state["params"]["w"]) and back["step"] == 7
    g2 = torch.Generator()
    g2.set_state(back["rng"])
    assert torch.equal(torch.rand(2, generator=g2), torch.rand(2, generator=g))
    with pytest.raises(ValueError, match="no checkpoint"):
        run.load_checkpoint("missing.pt")


def test_atomic_torch_save_failure_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"v": 1}, path)

    def boom(obj, f):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="serialization failed"):
        atomic_torch_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
