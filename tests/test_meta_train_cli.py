"""``selfref meta-train``: run directory, checkpoints, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    assert cfg["spec"]["meta"]["unroll"] == 2 and cfg["spec"]["core"] == "lstm"


def test_resume_continues_to_the_same_result(run_cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [x for x in TINY]
    assert run_cli("meta-train", *args, "--logdir", a).code == 0
    short = list(args)
    short[1] = 2  # --meta-steps 2 … then extend the saved config to 4 and resume
    assert run_cli("meta-train", *short, "--logdir", b).code == 0
    d = _run_dir(b)
    cfg = json.loads((d / "config.json").read_text())
    cfg["spec"]["meta"]["meta_steps"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    threads = torch.get_num_threads()
    try:
        r = run_cli("meta-train", "--resume", d, "--threads", 1)  # not a spec flag: allowed
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
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


def test_config_file_and_flags_build_the_spec(run_cli, tmp_logdir, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'task = "quadratic"\ncore = "lstm"\n[core_options]\nhidden = 6\n'
        "[meta]\nmeta_steps = 3\nunroll = 2\ninner_steps = 4\nmeta_batch = 4\n"
        'eval_tasks = 4\nlr_schedule = "cosine"\nwarmup_steps = 1\nmin_lr_ratio = 0.5\n'
        "curriculum = [[0, 2], [2, 4]]\n"
    )
    r = run_cli("meta-train", "--config", spec, "--meta-lr", 0.02, "--logdir", tmp_logdir)
    assert r.code == 0, r.err
    saved = json.loads((_run_dir(tmp_logdir) / "config.json").read_text())["spec"]
    assert saved["core_options"] == {"hidden": 6}
    assert saved["meta"]["curriculum"] == [[0, 2], [2, 4]] and saved["meta"]["meta_lr"] == 0.02
    bad = tmp_path / "bad.toml"
    for text, word in (
        ("[meta]\nmeta_stepz = 3\n", "meta_stepz"),
        ("colour = 1\n", "colour"),
        ("[meta\n", "TOML"),
        ("[meta]\nestimator = 'nope'\n", "nope"),
    ):
        bad.write_text(text)
        r = run_cli("meta-train", "--config", bad, "--logdir", tmp_path / "never")
        assert r.code == 2 and len(r.err_lines) == 1 and word in r.err, (text, r.err)
    assert not (tmp_path / "never").exists()  # nothing was written for bad input
    r = run_cli("meta-train", "--preset", "nope", "--logdir", tmp_logdir)
    assert r.code == 2 and "l2l-quadratic-recipe" in r.err


def test_preset_through_the_cli_equals_the_experiments_own_path(run_cli, tmp_path):
    """The L2L recipe is runnable from the CLI: --preset gives the same meta-parameters as
    experiments.l2l_quadratic's own meta-training for a few steps."""
    from experiments.l2l_quadratic import load_config, meta_train
    from selfref.logging import NullLogger
    from selfref.tasks import make

    few = {"meta_steps": 3, "meta_batch": 8, "eval_tasks": 4, "eval_every": 2}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in few.items()]
    r = run_cli("meta-train", "--preset", "l2l-quadratic-recipe", *args, "--logdir", tmp_path)
    assert r.code == 0, r.err
    cli = load_checkpoint(_run_dir(tmp_path) / "checkpoints" / "last.pt")["meta_params"]
    recipe = {**load_config()["variants"]["recipe"], **few}
    _, res, _ = meta_train(make("quadratic"), recipe, NullLogger(), "cpu")
    for k, v in res.meta_params.items():
        assert torch.equal(v, cli[k]), k


def test_lopt_preset_runs_from_the_cli_and_its_optimizer_loads(run_cli, tmp_path):
    """`selfref meta-train --preset lopt` (a [problem] table: the task distribution) runs
    through the CLI, exports checkpoints/optimizer.pt for LearnedOptimizer, resumes from
    its run directory alone, and the experiments runner builds the same configuration."""
    from experiments.lopt_meta_train import build as runner_build
    from experiments.lopt_meta_train import load_preset
    from selfref.commands.meta_train import build as cli_build
    from selfref.net.optimizer import LearnedOptimizer

    small = tmp_path / "small.toml"
    small.write_text(
        "[meta]\nmeta_steps = 2\ninner_steps = 10\nunroll = 5\neval_every = 2\n"
        "checkpoint_every = 1\nwarmup_steps = 0\n"
        "[problem]\neval_tasks = 1\neval_instances = 1\neval_steps = 10\n"
    )
    r = run_cli("meta-train", "--preset", "lopt", "--config", small, "--logdir", tmp_path / "l")
    assert r.code == 0, r.err
    run = _run_dir(tmp_path / "l")
    assert run.name.endswith("distribution-lopt-s1")  # the preset's seed
    out = json.loads((run / "results.json").read_text())
    assert out["steps_done"] == 2 and out["optimizer_checkpoint"].endswith("optimizer.pt")
    from selfref import checkpoints

    assert checkpoints.load_meta(out["optimizer_checkpoint"])["wall_s"] > 0  # its own clock
    w = torch.nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([w], checkpoint=out["optimizer_checkpoint"], total_steps=5)
    for _ in range(5):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert torch.isfinite(w).all() and float((w.detach() ** 2).sum()) < 3.0
    r = run_cli("meta-train", "--resume", run)
    assert r.code == 0, r.err  # nothing left to do; the stored spec builds again
    spec = json.loads((run / "config.json").read_text())["spec"]
    _, problem, cfg = cli_build(spec, "cpu")
    preset = load_preset("lopt")
    preset["meta"].update({k: spec["meta"][k] for k in spec["meta"]})
    preset["problem"].update(spec["problem"])
    runner_cfg, runner_problem = runner_build(preset, "cpu")
    assert cfg.to_dict() == runner_cfg.to_dict()
    assert problem.describe() == runner_problem.describe()
    r = run_cli("meta-train", "--preset", "lopt", "--task", "quadratic", "--logdir", tmp_path)
    assert r.code == 2 and len(r.err_lines) == 1 and "[problem]" in r.err
    r = run_cli("meta-train", "--preset", "lopt", "--meta-loss", "sum", "--logdir", tmp_path)
    assert r.code == 2 and len(r.err_lines) == 1 and "[problem] meta_loss" in r.err  # not ignored


_TINY_ENSEMBLE = (
    'extends = "lopt"\n'
    "[meta]\nmeta_steps = 2\ninner_steps = 10\nunroll = 5\neval_every = 2\n"
    "checkpoint_every = 1\nwarmup_steps = 0\n"
    "[problem]\neval_tasks = 1\neval_instances = 1\neval_steps = 10\n"
)


def test_ensemble_spec_runs_its_members_as_processes_and_composes_them(run_cli, tmp_path):
    """An [ensemble] table: each seed is an ordinary meta-training in its own process (the
    spec without the table, `--seed S`); their optimizers compose into one `ensemble`
    checkpoint; --resume of the ensemble skips finished members and resumes the others."""
    from selfref import checkpoints
    from selfref.commands.meta_train import load_spec_file

    spec_file = tmp_path / "ens.toml"
    spec_file.write_text(
        _TINY_ENSEMBLE + "[ensemble]\nseeds = [3, 4]\nparallel = 2\n"
        "core_options = { heldout_step_rate = 0.3 }\n"
    )
    spec = load_spec_file(spec_file)  # extends: the lopt preset underneath, this file over it
    assert spec["core"] == "lopt" and spec["meta"]["meta_steps"] == 2
    assert spec["meta"]["unroll"] == 5 and spec["problem"]["kind"] == "task_distribution"
    assert "extends" not in spec and spec["ensemble"]["seeds"] == [3, 4]
    r = run_cli("meta-train", "--config", spec_file, "--threads", 1, "--logdir", tmp_path / "l")
    assert r.code == 0, r.err
    # no terminal: the progress is plain lines (the last read at the end), no carriage returns
    assert "ensemble meta-steps: 4/4 (100 %)" in r.err and "\r" not in r.err
    run = _run_dir(tmp_path / "l")
    assert run.name.endswith("distribution-lopt-ensemble")
    out = json.loads((run / "results.json").read_text())
    assert [m["seed"] for m in out["members"]] == [3, 4]
    ens = checkpoints.load_meta(out["optimizer_checkpoint"])
    assert ens["net"]["core"] == "ensemble" and ens["net"]["core_options"]["members"] == 2
    # the wall-clock: both members at once, so the longer member's clock (the sum beside it)
    walls = [m["wall_s"] for m in out["members"]]
    assert [m["wall_s"] for m in ens["members"]] == walls and ens["parallel"] == 2
    assert ens["parallel_wall_s"] == out["parallel_wall_s"] == pytest.approx(max(walls))
    assert ens["wall_s"] == pytest.approx(sum(walls))
    # [ensemble] core_options: a config edit of the composed optimizer, recorded; members
    # meta-train without it
    edit = {"heldout_step_rate": 0.3}
    assert out["core_options_edit"] == edit
    assert ens["edits"] == [{"source": "[ensemble] core_options", "core_options": edit}]
    assert ens["net"]["core_options"]["member_options"]["heldout_step_rate"] == 0.3
    for m, member in enumerate(out["members"]):
        assert member["run_dir"].endswith(f"distribution-lopt-s{3 + m}")
        own = checkpoints.load_meta(f"{member['run_dir']}/checkpoints/optimizer.pt")
        for k, v in own["best_meta_params"].items():
            assert torch.equal(ens["best_meta_params"][f"core.m{m}.{k[len('core.') :]}"], v)
        assert own["net"]["core_options"].get("heldout_step_rate", 0.0) == 0.0  # members: off
    # a member left unfinished (its results gone) is resumed; the finished one is skipped
    (Path(out["members"][1]["run_dir"]) / "results.json").unlink()
    r = run_cli("meta-train", "--resume", run, "--threads", 1)
    assert r.code == 0, r.err
    assert "1 finished, 1 to run" in r.out
    again = checkpoints.load_meta(out["optimizer_checkpoint"])
    for k, v in ens["best_meta_params"].items():
        assert torch.equal(again["best_meta_params"][k], v)
    # bad input: one line, exit 2
    for extra, match in (
        ("[ensemble]\nseeds = [1]\n", "two or more distinct"),
        ("[ensemble]\nseeds = [1, 2]\nparallel = 0\n", "parallel"),
        ("[ensemble]\nseeds = [1, 2]\nrestarts = 2\n", "unknown [ensemble]"),
        ("[ensemble]\nseeds = [1, 2]\nkeep = 3\n", "keep must be an integer from 2"),
        ("[ensemble]\nseeds = [1, 2, 3]\nkeep = 1\n", "keep must be an integer from 2"),
        ("[ensemble]\nseeds = [1, 2]\ncore_options = 3\n", "core_options must be a table"),
        ("[ensemble]\nseeds = [1, 2]\ncore_options = { hidden = 8 }\n", "meta-parameters"),
        ("[ensemble]\nseeds = [1, 2]\ncore_options = { heldout_step_rate = -1 }\n", ">= 0"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(_TINY_ENSEMBLE + extra)
        r = run_cli("meta-train", "--config", bad, "--logdir", tmp_path / "b")
        assert r.code == 2 and len(r.err_lines) == 1 and match in r.err, r.err
    r = run_cli("meta-train", "--config", spec_file, "--seed", 5, "--logdir", tmp_path / "b")
    assert r.code == 2 and "seeds" in r.err
    assert not (tmp_path / "b").exists()  # nothing written for bad input
    presets = Path(__file__).parents[1] / "selfref" / "presets"
    shipped = load_spec_file(presets / "lopt-ensemble.toml")  # the lopt preset, twice
    assert {k: v for k, v in shipped.items() if k != "ensemble"} == load_spec_file(
        presets / "lopt.toml"
    )
    assert shipped["ensemble"] == {
        "seeds": [0, 1],
        "parallel": 2,
        "core_options": {"heldout_step_rate": 0.3},  # round 22's config edit
    }


def test_kept_seeds_are_the_lowest_meta_validation_scores_in_seed_order():
    from selfref.commands.meta_train_ensemble import kept_seeds

    assert kept_seeds([0, 1, 2, 3], [-0.02, -0.04, 0.01, -0.03], 2) == [1, 3]
    assert kept_seeds([5, 2, 9], [0.0, 0.0, -1.0], 2) == [5, 9]  # a tie: the earlier seed
    assert kept_seeds([0, 1, 2], [float("nan"), 0.3, 0.2], 2) == [1, 2]  # NaN ranks last
    assert kept_seeds([0, 1], [0.1, 0.2], 2) == [0, 1]


def test_an_ensemble_with_keep_composes_its_best_members_and_counts_them_all(run_cli, tmp_path):
    """[ensemble] keep = k: the k members with the lowest meta-validation scores are composed
    (in seed order); the checkpoint's meta-training cost still counts every member trained."""
    from selfref import checkpoints

    spec_file = tmp_path / "ens.toml"
    spec_file.write_text(_TINY_ENSEMBLE + "[ensemble]\nseeds = [3, 4, 5]\nparallel = 3\nkeep = 2\n")
    r = run_cli("meta-train", "--config", spec_file, "--threads", 1, "--logdir", tmp_path / "l")
    assert r.code == 0, r.err
    out = json.loads((_run_dir(tmp_path / "l") / "results.json").read_text())
    scores = {m["seed"]: m["best_heldout_score"] for m in out["members"]}
    worst = max(scores, key=lambda s: (scores[s], s))
    assert out["kept_seeds"] == [s for s in (3, 4, 5) if s != worst]
    ens = checkpoints.load_meta(out["optimizer_checkpoint"])
    assert ens["net"]["core_options"]["members"] == 2
    assert [m["seed"] for m in ens["members"]] == out["kept_seeds"]
    assert [m["seed"] for m in ens["trained_members"]] == [3, 4, 5]
    assert [m["kept"] for m in ens["trained_members"]] == [s != worst for s in (3, 4, 5)]
    walls = [m["wall_s"] for m in out["members"]]
    assert ens["wall_s"] == pytest.approx(sum(walls))  # all three, not the two kept
    assert ens["parallel_wall_s"] == pytest.approx(max(walls))
    assert ens["grad_evals"] == pytest.approx(
        sum(m["meta_train_grad_evals"] for m in out["members"])
    )
    for m, seed in enumerate(out["kept_seeds"]):
        run = next(x["run_dir"] for x in out["members"] if x["seed"] == seed)
        own = checkpoints.load_meta(f"{run}/checkpoints/optimizer.pt")
        for k, v in own["best_meta_params"].items():
            assert torch.equal(ens["best_meta_params"][f"core.m{m}.{k[len('core.') :]}"], v)


@pytest.mark.slow
def test_a_failed_ensemble_member_loses_nothing_and_resumes(tmp_path):
    """A member process that dies (here: killed by its pid mid-run) leaves the other to
    finish; the ensemble exits 1 naming it and the resume command, and --resume continues
    the dead member from its last checkpoint and composes the ensemble."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    spec = tmp_path / "ens.toml"
    spec.write_text(
        _TINY_ENSEMBLE.replace("meta_steps = 2", "meta_steps = 80")
        + "[ensemble]\nseeds = [0, 1]\nparallel = 2\n"
    )
    cmd = [sys.executable, "-m", "selfref", "meta-train", "--config", str(spec), "--threads",
           "1", "--logdir", str(tmp_path / "l")]  # fmt: skip
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids: dict[str, int] = {}
        assert parent.stdout is not None
        while len(pids) < 2:
            m = re.search(r"member (s\d): started, pid (\d+)", parent.stdout.readline())
            if m:
                pids[m.group(1)] = int(m.group(2))
        run = _run_dir(tmp_path / "l")
        member = run / "members" / "s1"
        deadline = time.monotonic() + 120
        while not list(member.glob("meta-train/*/checkpoints/last.pt")):
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.2)
        os.kill(pids["s1"], signal.SIGKILL)
        out, err = parent.communicate(timeout=300)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert parent.returncode == 1, err
    assert "member s1: failed" in out and "s1 failed" in err and f"--resume {run}" in err
    assert (next((run / "members" / "s0").glob("meta-train/*")) / "results.json").is_file()
    assert not (run / "checkpoints" / "optimizer.pt").exists()
    (last,) = member.glob("meta-train/*/checkpoints/last.pt")
    step = int(load_checkpoint(last)["step"])
    assert 0 < step < 80
    done = subprocess.run([*cmd[:4], "--resume", str(run), "--threads", "1"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 finished, 1 to run" in done.stdout
    assert int(load_checkpoint(last)["step"]) == 80  # the same run directory, continued
    assert (run / "checkpoints" / "optimizer.pt").is_file()


def test_warm_start_takes_a_checkpoints_phi_and_refuses_one_that_does_not_fit():
    """`[meta] init_from`: the keep-best φ of a learned optimizer (of an ensemble, one member)
    starts a run, with its share of the meta-training cost; a misfit fails naming why."""
    from selfref import checkpoints
    from selfref.meta.trainer import MetaTrainConfig, warm_start
    from selfref.net.optimizer import default_checkpoint

    path = default_checkpoint()
    ck = checkpoints.load_meta(path)
    shipped = checkpoints.meta_params_of(ck, "best")
    like = {"core." + k[len("core.m1.") :]: torch.zeros_like(v)
            for k, v in shipped.items() if k.startswith("core.m1.")}  # fmt: skip
    phi, cost, wall = warm_start(path, 1, like)
    assert all(torch.equal(phi[k], shipped["core.m1." + k[len("core.") :]]) for k in like)
    assert cost == pytest.approx(checkpoints.grad_evals_of(ck) / 2)
    # the member's own clock; the shipped file predates members' clocks: its total, shared
    assert wall == pytest.approx(ck["members"][1].get("wall_s", ck["wall_s"] / 2)) and wall > 0
    for member, match in ((-1, "give init_member in 0..1"), (2, "give init_member in 0..1")):
        with pytest.raises(ValueError, match=match):
            warm_start(path, member, like)
    bent = {**like, "core.log_lr": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"core.log_lr has shape \(1,\), this run's \(2,\)"):
        warm_start(path, 0, bent)
    with pytest.raises(ValueError, match="missing"):
        warm_start(path, 0, {**like, "core.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="init_member"):
        MetaTrainConfig(init_member=0)


def test_an_ensemble_fine_tunes_the_members_of_an_ensemble_checkpoint(run_cli, tmp_path):
    """`[meta] init_from = <ensemble>` in an [ensemble] spec: member i starts from the
    checkpoint's member i, evaluated at meta-step 0 (keep-best may return it), and counts
    its share of the checkpoint's meta-training cost."""
    from selfref import checkpoints
    from selfref.net.optimizer import default_checkpoint

    path = default_checkpoint()
    ck = checkpoints.load_meta(path)
    shipped = checkpoints.meta_params_of(ck, "best")
    spec_file = tmp_path / "tune.toml"
    spec_file.write_text(
        _TINY_ENSEMBLE.replace("[meta]\n", f'[meta]\ninit_from = "{path.as_posix()}"\n')
        + "[ensemble]\nseeds = [3, 4]\nparallel = 2\n"
    )
    r = run_cli("meta-train", "--config", spec_file, "--threads", 1, "--logdir", tmp_path / "l")
    assert r.code == 0, r.err
    run = _run_dir(tmp_path / "l")
    out = json.loads((run / "results.json").read_text())
    # the start's seconds: a member's own clock (the shipped file predates them: its total, shared)
    starts = [ck["members"][i].get("wall_s", ck["wall_s"] / 2) for i in range(2)]
    for i, member in enumerate(out["members"]):
        spec = json.loads((run / "members" / f"s{member['seed']}.json").read_text())
        assert spec["meta"]["init_member"] == i
        history = checkpoints.load(f"{member['run_dir']}/checkpoints/last.pt")["history"]
        assert [h["step"] for h in history] == [0, 2]  # the start, then eval_every
        own = checkpoints.load_meta(f"{member['run_dir']}/checkpoints/optimizer.pt")
        start = {k: shipped[f"core.m{i}.{k[len('core.') :]}"] for k in own["best_meta_params"]}
        moved = max(float((v - start[k]).abs().max()) for k, v in own["best_meta_params"].items())
        if member["best_step"] == 0:
            assert moved == 0.0
        else:
            assert 0.0 < moved < 0.05  # two meta-steps of Adam at 5e-3 from the start
        assert member["meta_train_grad_evals"] > checkpoints.grad_evals_of(ck) / 2
        assert own["inherited_wall_s"] == starts[i]  # counted in the export's wall_s
        assert own["wall_s"] == pytest.approx(starts[i] + member["wall_s"])
    own_clocks = sum(m["wall_s"] for m in out["members"])
    assert out["members_wall_s"] == pytest.approx(sum(starts) + own_clocks)  # the exports
