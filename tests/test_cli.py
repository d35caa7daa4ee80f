"""The `selfref` CLI: `train` and `tasks`, bad input (exit 2, one line), --help everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from selfref import tasks
from selfref.cli import build_parser


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def _assert_one_line_error(r, *needles: str) -> None:
    assert r.code == 2, (r.code, r.out, r.err)
    assert "Traceback" not in r.err
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("selfref: error: ")
    for n in needles:
        assert n in line, (n, line)


def test_tasks_lists_every_task(run_cli):
    r = run_cli("tasks")
    assert r.code == 0 and r.err == ""
    lines = r.out.splitlines()
    assert len(lines) == len(tasks.names())
    for line, (name, description) in zip(lines, tasks.available().items()):
        assert line.split()[0] == name and line.endswith(description)


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_works_for_every_command(run_cli, command):
    r = run_cli("--help") if command is None else run_cli(command, "--help")
    assert r.code == 0
    assert "usage: selfref" in r.out


def test_no_command_prints_help(run_cli):
    r = run_cli()
    assert r.code == 2 and "usage: selfref" in r.out


def test_tiny_train_run_writes_everything(run_cli, tmp_logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    r = run_cli(
        "train", "--task", "digits-logreg", "--optimizer", "momentum", "--lr", "0.05",
        "--momentum", "0.8", "--steps", "12", "--seed", "3", "--eval-every", "4",
        "--batch-size", "32", "--logdir", tmp_logdir, "--experiment", "cli", "--no-progress",
    )  # fmt: skip
    assert r.code == 0, r.err
    (run,) = (tmp_logdir / "cli").iterdir()
    assert run.name.endswith("-momentum-s3")
    assert f"tensorboard --logdir {run}" in r.out
    assert "test_accuracy=" in r.out

    argv = (run / "argv.txt").read_text()
    assert argv.startswith("selfref train --task digits-logreg") and "--momentum 0.8" in argv
    config = json.loads((run / "config.json").read_text())
    assert config["hparams"] == {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.0}
    assert config["task"] == "digits-logreg" and config["batch_size"] == 32
    assert config["task_options"]["batch_size"] == 32 and config["args"]["seed"] == 3

    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "momentum" and res["task"] == "digits-logreg" and res["seed"] == 3
    assert res["status"] == "ok" and res["reason"] is None and res["grad_evals"] == 12
    assert [g for g, _ in res["curve"]] == [4, 8, 12]
    bests = [v for _, v in res["curve"]]
    assert bests == sorted(bests, reverse=True)
    assert 0 <= res["test_accuracy"] <= 1

    ckpt = torch.load(run / "checkpoints" / "final.pt")
    assert set(ckpt["params"]) == {"l0.weight", "l0.bias"}

    assert list(run.glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(run))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    expected = {"inner/loss", "val/loss", "val/accuracy", "best/val_loss_vs_grad_evals"}
    assert expected | {"final/val_loss", "final/test_loss", "final/test_accuracy"} <= scalars
    assert [e.step for e in ea.Scalars("val/loss")] == [4, 8, 12]
    assert ea.Scalars("val/loss")[-1].value == pytest.approx(res["val_loss"], rel=1e-6)
    assert ea.Scalars("final/test_loss")[0].value == pytest.approx(res["test_loss"], rel=1e-6)
    assert metadata.SESSION_START_INFO_TAG in ea.PluginTagToContent(metadata.PLUGIN_NAME)


def test_same_command_twice_makes_two_runs(run_cli, tmp_logdir):
    args = ("train", "--task", "quadratic", "--optimizer", "sgd", "--lr", "0.01", "--steps", "3")
    for _ in range(2):
        assert run_cli(*args, "--logdir", tmp_logdir, "--no-progress").code == 0
    assert len(list((tmp_logdir / "train").iterdir())) == 2


def test_diverged_run_is_recorded_and_exits_zero(run_cli, tmp_logdir):
    r = run_cli(
        "train", "--task", "quadratic", "--optimizer", "sgd", "--lr", "5", "--steps", "100",
        "--logdir", tmp_logdir, "--no-progress",
    )  # fmt: skip
    assert r.code == 0
    assert "warning: training diverged at step" in r.err
    (run,) = (tmp_logdir / "train").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "diverged"
    step = res["extra"]["diverged_step"]
    assert isinstance(step, int) and f"step {step}" in res["reason"]
    assert res["grad_evals"] == step + 1


def test_done_when_digits_adam_reaches_85_percent(run_cli, tmp_logdir):
    """The issue's acceptance check: 200 Adam steps on digits-mlp, test accuracy > 0.85."""
    r = run_cli(
        "train", "--task", "digits-mlp", "--optimizer", "adam", "--lr", "0.01", "--steps", "200",
        "--logdir", tmp_logdir, "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert r.code == 0, r.err
    (run,) = (tmp_logdir / "train").iterdir()
    assert json.loads((run / "results.json").read_text())["test_accuracy"] > 0.85


def test_mnist_train_with_data_dir(run_cli, tmp_logdir, tiny_mnist_dir):
    r = run_cli(
        "train", "--task", "mnist-mlp", "--data-dir", tiny_mnist_dir,
        "--task-option", "val_size=10", "--batch-size", "8", "--steps", "2",
        "--logdir", tmp_logdir, "--no-progress",
    )  # fmt: skip
    assert r.code == 0, r.err


def test_task_option_dtype(run_cli, tmp_logdir):
    r = run_cli(
        "train", "--task", "quadratic", "--task-option", "dtype=float64", "--task-option", "dim=3",
        "--steps", "2", "--logdir", tmp_logdir, "--no-progress",
    )  # fmt: skip
    assert r.code == 0, r.err
    (run,) = (tmp_logdir / "train").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["task_options"]["dtype"] == "torch.float64" and config["task_options"]["dim"] == 3


BAD_INPUTS = [
    (["--task", "cifar"], ["unknown task 'cifar'", "digits-mlp", "quadratic"]),
    (
        ["--optimizer", "adamw"],
        ["unknown optimizer 'adamw'", "sgd, momentum, nesterov, rmsprop, adam"],
    ),
    (["--steps", "0"], ["--steps must be a positive integer, got 0"]),
    (["--steps", "-5"], ["--steps must be a positive integer, got -5"]),
    (["--lr", "0"], ["--lr must be a positive number, got 0.0"]),
    (["--lr", "-0.1"], ["--lr must be a positive number, got -0.1"]),
    (["--eval-every", "0"], ["--eval-every must be a positive integer, got 0"]),
    (["--batch-size", "0"], ["--batch-size must be a positive integer, got 0"]),
    (["--optimizer", "adam", "--momentum", "0.9"], ["no hyperparameter 'momentum'", "lr, beta1"]),
    (["--optimizer", "momentum", "--momentum", "1.5"], ["momentum=1.5", "[0, 1)"]),
    (["--hparam", "beta2=fast"], ["--hparam beta2='fast' is not a number"]),
    (["--task-option", "hidden"], ["task option 'hidden' must look like key=value"]),
    (["--task-option", "device=cpu"], ["task option 'device' is set with --device"]),
    (["--hparam", "beta2"], ["--hparam 'beta2' must look like key=value"]),
    (["--task-option", "widht=3"], ["unknown option 'widht' for task 'digits-mlp'", "hidden"]),
    (["--task-option", "activation=swish"], ["unknown activation 'swish'", "relu"]),
    (["--task-option", "dtype=float16"], ["dtype='float16'", "float32, float64"]),
    (
        ["--task", "quadratic", "--batch-size", "8"],
        ["--batch-size does not apply to task 'quadratic'"],
    ),
    (["--data-dir", "/tmp"], ["--data-dir does not apply to task 'digits-mlp'", "mnist-mlp"]),
]


@pytest.mark.parametrize("extra, needles", BAD_INPUTS, ids=[" ".join(e) for e, _ in BAD_INPUTS])
def test_bad_train_input_is_one_line_and_exit_2(run_cli, tmp_logdir, extra, needles):
    r = run_cli("train", "--steps", "2", "--logdir", tmp_logdir, "--no-progress", *extra)
    _assert_one_line_error(r, *needles)
    assert not tmp_logdir.exists()  # nothing is written for bad input


def test_logdir_that_is_a_file(run_cli, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    r = run_cli("train", "--steps", "2", "--logdir", f, "--no-progress")
    _assert_one_line_error(r, f"--logdir '{f}' is a file")


def test_mnist_without_data_dir(run_cli, tmp_logdir, monkeypatch):
    monkeypatch.delenv("SELFREF_DATA", raising=False)
    r = run_cli("train", "--task", "mnist-mlp", "--steps", "2", "--logdir", tmp_logdir)
    _assert_one_line_error(r, "no MNIST directory", "--data-dir", "SELFREF_DATA")


def test_mnist_with_missing_data_dir(run_cli, tmp_logdir, tmp_path):
    r = run_cli(
        "train", "--task", "mnist-mlp", "--data-dir", tmp_path / "none", "--logdir", tmp_logdir
    )
    _assert_one_line_error(r, "MNIST directory not found", "none")


def test_unknown_device_names_choices(run_cli, tmp_logdir):
    r = run_cli("train", "--device", "tpu", "--logdir", tmp_logdir)
    assert r.code == 2 and "Traceback" not in r.err
    last = r.err_lines[-1]
    assert "invalid choice: 'tpu'" in last and all(c in last for c in ("auto", "cpu", "cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_requested_without_cuda(run_cli, tmp_logdir):
    r = run_cli("train", "--device", "cuda", "--steps", "2", "--logdir", tmp_logdir)
    _assert_one_line_error(r, "'cuda' requested but CUDA is not available", "cpu or auto")


def test_non_numeric_steps_is_an_argparse_error(run_cli):
    r = run_cli("train", "--steps", "many")
    assert r.code == 2 and "Traceback" not in r.err
    assert "--steps: invalid int value: 'many'" in r.err_lines[-1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_on_cuda(run_cli, tmp_logdir):
    r = run_cli(
        "train", "--device", "cuda", "--steps", "20", "--logdir", tmp_logdir, "--no-progress"
    )
    assert r.code == 0, r.err
    (run,) = (tmp_logdir / "train").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["task_options"]["device"].startswith("cuda")
