"""Loggers: TensorBoard files read back by TensorBoard itself (and a real server), the rest."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from selfref.logging import (
    Logger,
    MemoryLogger,
    MultiLogger,
    NullLogger,
    PrintLogger,
    TensorBoardLogger,
)


def _write_run(logdir: Path) -> None:
    lg = TensorBoardLogger(logdir)
    for step in range(5):
        lg.scalar("inner/loss", 1.0 / (step + 1), step)
        lg.scalar("val/loss", torch.tensor(2.0 - step * 0.1), step)
    lg.histogram("modify/update", torch.tensor([0.1, 0.2, float("nan"), 0.3]), 0)
    lg.text("config", "lr = 0.1", 0)
    lg.hparams(
        {"lr": 0.1, "optimizer": "adam", "hidden": (20,), "t": torch.tensor(3.0)},
        {"final/val_loss": 0.5, "final/bad": float("nan")},
    )
    lg.close()


def _accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_tensorboard_files_hold_scalars_text_histograms(tmp_path):
    _write_run(tmp_path)
    ea = _accumulator(tmp_path)
    tags = ea.Tags()
    assert {"inner/loss", "val/loss", "final/val_loss"} <= set(tags["scalars"])
    assert "final/bad" not in tags["scalars"]  # non-finite metrics are dropped
    assert [e.step for e in ea.Scalars("inner/loss")] == [0, 1, 2, 3, 4]
    assert [e.value for e in ea.Scalars("inner/loss")] == pytest.approx(
        [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]
    )
    assert ea.Scalars("val/loss")[-1].value == pytest.approx(1.6)
    assert "modify/update" in tags["histograms"]
    assert ea.Histograms("modify/update")[0].histogram_value.num == 3  # the NaN is dropped
    assert any(t.startswith("config") for t in tags["tensors"])


def test_tensorboard_hparams_plugin_data(tmp_path):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    _write_run(tmp_path)
    ea = _accumulator(tmp_path)
    content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
    assert {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == pytest.approx(0.1)
    assert hp["optimizer"].string_value == "adam"
    assert hp["hidden"].string_value == "(20,)"  # non-scalar values are stringified
    assert hp["t"].number_value == pytest.approx(3.0)
    exp = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in exp.experiment.metric_infos] == ["final/val_loss"]


def test_memory_logger_keeps_everything():
    lg = MemoryLogger()
    assert isinstance(lg, Logger)
    lg.scalar("a", 1, 0)
    lg.scalar("a", torch.tensor(2.5, requires_grad=True) * 1, 3)
    lg.histogram("h", torch.arange(3.0), 1)
    lg.text("t", "hello", 2)
    lg.hparams({"lr": 0.1}, {"m": 1.0})
    assert lg.scalars["a"] == [(0, 1.0), (3, 2.5)]
    assert lg.values("a") == [1.0, 2.5]
    assert torch.equal(lg.histograms["h"][0][1], torch.arange(3.0))
    assert lg.texts["t"] == [(2, "hello")]
    assert lg.hparam_entries == [({"lr": 0.1}, {"m": 1.0})]
    lg.close()
    assert lg.closed


def test_multi_logger_fans_out_and_null_logger_discards():
    a, b, null = MemoryLogger(), MemoryLogger(), NullLogger()
    multi = MultiLogger([a, b, null])
    assert isinstance(multi, Logger)
    multi.scalar("x", 1.0, 0)
    multi.text("t", "s")
    multi.histogram("h", torch.ones(2), 0)
    multi.hparams({"k": 1}, {"m": 2.0})
    multi.flush()
    multi.close()
    for lg in (a, b):
        assert lg.scalars["x"] == [(0, 1.0)] and lg.texts["t"] == [(0, "s")]
        assert lg.hparam_entries == [({"k": 1}, {"m": 2.0})] and lg.closed
    assert not null.scalars and not null.texts and not null.hparam_entries


def test_print_logger_every():
    buf = io.StringIO()
    lg = PrintLogger(every=2, stream=buf)
    for s in range(4):
        lg.scalar("inner/loss", 0.5, s)
    lg.text("note", "hi", 1)
    lines = buf.getvalue().splitlines()
    assert lines == ["[     0] inner/loss = 0.5", "[     2] inner/loss = 0.5", "[     1] note: hi"]
    with pytest.raises(ValueError, match="every must be >= 1"):
        PrintLogger(every=0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


@pytest.mark.slow
def test_real_tensorboard_server_serves_the_run(tmp_path):
    """Start `tensorboard` on a loopback port, read the run and its tags over HTTP, stop it."""
    run = tmp_path / "exp" / "run-a"
    _write_run(run)
    exe = Path(sys.executable).with_name("tensorboard")
    cmd = [str(exe)] if exe.exists() else [shutil.which("tensorboard") or "tensorboard"]
    port = _free_port()
    log = (tmp_path / "tb.log").open("w")
    proc = subprocess.Popen(
        [
            *cmd,
            "--logdir",
            str(tmp_path / "exp"),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--reload_interval",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        runs: list = []
        tags: dict = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                runs = _get_json(f"{base}/data/runs")
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if "run-a" in runs and "inner/loss" in tags.get("run-a", {}):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert proc.poll() is None, (
            f"tensorboard exited: {(tmp_path / 'tb.log').read_text()[-2000:]}"
        )
        assert "run-a" in runs
        assert {"inner/loss", "val/loss", "final/val_loss"} <= set(tags["run-a"])
        series = _get_json(f"{base}/data/plugin/scalars/scalars?run=run-a&tag=inner/loss")
        assert [row[1] for row in series] == [0, 1, 2, 3, 4]  # [wall_time, step, value]
        assert series[0][2] == pytest.approx(1.0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


def test_print_logger_prefix_filter_and_period():
    import io

    from selfref.logging import PrintLogger

    buf = io.StringIO()
    lg = PrintLogger(every=2, stream=buf, prefixes=("meta/",))
    for step in range(4):
        lg.scalar("meta/loss", float(step), step)
        lg.scalar("curve/adam", 1.0, step)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and all("meta/loss" in ln for ln in lines)
