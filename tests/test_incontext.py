"""In-context learners, their meta-training loop, and the tuned-SGD baseline."""

from __future__ import annotations

import math

import pytest
import torch

from selfref.logging import MemoryLogger
from selfref.meta import MetaTrainConfig, MetaTrainer, SequenceProblem
from selfref.net.sequence import (
    HyperLSTMSequenceModel,
    LSTMSequenceModel,
    SRWMSequenceModel,
    make_sequence_model,
)
from selfref.stats import paired_difference
from selfref.tasks.fewshot import FewShotDigits
from selfref.tasks.fewshot_sgd import sgd_eval, sgd_hits, sgd_query_accuracy, tune_sgd

D64 = torch.float64


def _params(model, seed=0):
    return {k: v.to(D64) for k, v in model.init_params(torch.Generator().manual_seed(seed)).items()}


def _tiny_task(model, **model_options):
    """2-way, 6-long sequences, 8 per batch, 16 for evaluation: a few-second meta-training."""
    task = FewShotDigits(ways=2, length=6, batch_size=8, eval_sequences=16)
    return task.with_model(make_sequence_model(model, task.input_dim, task.ways, **model_options))


def _train(task, logger=None, **meta):
    """Meta-train ``task``'s learner through the one loop (SequenceProblem + MetaTrainer)."""
    base = {"estimator": "full_bptt", "unroll": 1, "inner_steps": 1, "eval_every": 0}
    cfg = MetaTrainConfig(**{**base, "meta_batch": task.batch_size, **meta})
    trainer = MetaTrainer(SequenceProblem(task), cfg, logger)
    return trainer, trainer.train()


def _inputs(b=3, n=7, i=6, seed=1):
    return torch.randn(b, n, i, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_make_sequence_model_names():
    assert isinstance(make_sequence_model("hypernet", 6, 3), HyperLSTMSequenceModel)
    assert isinstance(make_sequence_model("srwm", 6, 3, dim=8, heads=2), SRWMSequenceModel)
    with pytest.raises(ValueError, match="valid"):
        make_sequence_model("gru", 6, 3)
    with pytest.raises(ValueError, match="unknown option 'width'.*valid: dim"):
        make_sequence_model("lstm", 6, 3, width=3)
    with pytest.raises(ValueError, match="dim"):
        make_sequence_model("lstm", 6, 3, dim="wide")


@pytest.mark.parametrize(
    "model",
    [
        SRWMSequenceModel(6, 3, dim=8, heads=2, layers=2),
        SRWMSequenceModel(6, 3, dim=8, heads=2, layers=1, token_shift=True),
        LSTMSequenceModel(6, 3, dim=5),
        HyperLSTMSequenceModel(6, 3, dim=5, hyper_dim=4, embed=2),
    ],
    ids=["srwm", "srwm_token_shift", "lstm", "hyperlstm"],
)
def test_models_are_causal_stateful_and_every_weight_gets_a_gradient(model):
    params = _params(model)
    x = _inputs()
    out, _ = model.forward(params, x)
    assert out.shape == (3, 7, 3)
    # causal: changing the future does not change the past
    x2 = x.clone()
    x2[:, 4:] += 1.0
    out2, _ = model.forward(params, x2)
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert float((out2[:, 4:] - out[:, 4:]).abs().max()) > 1e-6
    # the state carries the sequence on: two halves == the whole
    a, st = model.forward(params, x[:, :3])
    b, _ = model.forward(params, x[:, 3:], st)
    torch.testing.assert_close(torch.cat([a, b], 1), out)
    if isinstance(model, HyperLSTMSequenceModel):
        # d.* start at 0 (a plain LSTM), so the hyper-LSTM's own weights get gradients from
        # the second meta-step on; move d.* off zero to check those gradients too
        g = torch.Generator().manual_seed(3)
        for k in ("d.h", "d.x", "d.b"):
            params[k] = 0.1 * torch.randn(params[k].shape, generator=g, dtype=D64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    y = torch.randint(3, (3, 7), generator=torch.Generator().manual_seed(2))
    logits, _ = model.forward(leaves, x)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)).backward()
    for k, v in leaves.items():
        assert v.grad is not None and float(v.grad.abs().sum()) > 0, k


def test_srwm_model_fused_equals_reference_path():
    fused = SRWMSequenceModel(6, 3, dim=8, heads=2, fused=True)
    ref = SRWMSequenceModel(6, 3, dim=8, heads=2, fused=False)
    params = _params(fused)
    x = _inputs(n=9)
    torch.testing.assert_close(fused.forward(params, x)[0], ref.forward(params, x)[0])
    stats = fused.internals(params, x)
    assert {"l0/dW/y", "l1/k_entropy", "l1/beta/b"} <= set(stats)


def test_hyperlstm_starts_as_plain_lstm():
    hyper = HyperLSTMSequenceModel(6, 3, dim=5, hyper_dim=4, embed=2)
    hp = _params(hyper)
    lstm = LSTMSequenceModel(6, 3, dim=5)
    lp = {
        "lstm.w_ih": hp["main.w_ih"],
        "lstm.w_hh": hp["main.w_hh"],
        "lstm.b": hp["main.b"],
        "out.weight": hp["out.weight"],
        "out.bias": hp["out.bias"],
    }
    x = _inputs()
    torch.testing.assert_close(hyper.forward(hp, x)[0], lstm.forward(lp, x)[0])
    hp["d.h"] = hp["d.h"] + 0.5  # the hypernetwork now rescales the recurrent products
    assert float((hyper.forward(hp, x)[0] - lstm.forward(lp, x)[0]).abs().max()) > 1e-4


def test_sgd_baseline_matches_explicit_training():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g, dtype=D64)
    y = torch.randint(3, (4, 6), generator=g)
    k, lr, steps = 4, 0.7, 5
    hits = sgd_query_accuracy(x, y, k, 3, lr, steps)
    for i in range(4):
        lin = torch.nn.Linear(5, 3).double()
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        opt = torch.optim.SGD(lin.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(x[i, :k]), y[i, :k]).backward()
            opt.step()
        with torch.no_grad():
            assert float(hits[i]) == float(lin(x[i, k]).argmax() == y[i, k])
    with pytest.raises(ValueError, match="k must be"):
        sgd_query_accuracy(x, y, 6, 3, lr, steps)


def test_tuned_sgd_beats_chance_and_is_deterministic():
    task = FewShotDigits(ways=3, length=12, eval_sequences=60)
    choices = tune_sgd(task, (1, 10), lrs=(0.01, 1.0), steps_grid=(1, 10), sequences=60)
    assert set(choices) == {1, 10}
    assert choices[10].lr in (0.01, 1.0) and choices[10].steps in (1, 10)
    res = sgd_eval(task, choices)
    assert res == sgd_eval(task, choices)
    assert res["acc@10"] > 0.5  # 3-way after 10 examples: well above chance (1/3)
    hits = sgd_hits(task, choices)  # per sequence, on the sequences task.query_hits uses
    assert set(hits) == {1, 10} and hits[10].shape == (60,)
    assert float(hits[10].mean()) == res["acc@10"]
    batch = task.sequences("test", 60, task.seed, step=10_000_000)  # the first (only) chunk
    ch = choices[10]
    explicit = sgd_query_accuracy(batch["x"], batch["y"], 10, 3, ch.lr, ch.steps)
    assert torch.equal(hits[10], explicit)


def test_paired_difference():
    a = torch.tensor([1.0, 1.0, 0.0, 1.0])
    b = torch.tensor([0.0, 1.0, 0.0, 0.0])
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(0.5)
    assert se == pytest.approx(float(torch.tensor([1.0, 0, 0, 1]).std()) / 2)
    assert paired_difference(b, b) == (0.0, 0.0)
    with pytest.raises(ValueError, match="paired"):
        paired_difference(a, b[:3])


def test_meta_training_runs_logs_internals_and_lowers_the_loss():
    task = _tiny_task("srwm", dim=8, heads=2, layers=1)
    logger = MemoryLogger()
    _, res = _train(task, logger, meta_steps=40, meta_lr=3e-3, eval_every=20, log_every=20)
    losses = logger.values("meta/loss")
    assert len(losses) == 40 and res.steps_done == 40
    assert sum(losses[-10:]) < sum(losses[:10])
    assert {
        "meta/loss",
        "meta/grad_norm",
        "srwm/l0/dW/y",
        "srwm/l0/q_entropy",
        "heldout/acc@1",
        "heldout/score",
    } <= set(logger.scalars)
    assert "srwm/l0/beta/y" in logger.histograms
    again_logger = MemoryLogger()
    _train(task, again_logger, meta_steps=40, meta_lr=3e-3, eval_every=20, log_every=20)
    assert again_logger.values("meta/loss") == losses  # seeded: bitwise repeatable


def test_cli_meta_train_fewshot_digits(run_cli, tmp_path):
    import json

    for core in ("srwm", "lstm", "hypernet"):
        r = run_cli(
            "meta-train",
            "--task",
            "fewshot-digits",
            "--core",
            core,
            "--meta-steps",
            "3",
            "--eval-every",
            "0",
            "-o",
            "length=6",
            "-o",
            "eval_sequences=8",
            "-o",
            "dim=8",
            "--logdir",
            str(tmp_path),
            "--device",
            "cpu",
        )
        assert r.code == 0, r.err
    runs = sorted((tmp_path / "meta-train").iterdir())
    assert len(runs) == 3
    res = json.loads((runs[0] / "results.json").read_text())
    assert {"acc@1", "acc@5"} <= set(res["test"]) and (
        runs[0] / "checkpoints" / "last.pt"
    ).is_file()
    bad = run_cli(
        "meta-train", "--task", "fewshot-digits", "-o", "widht=3", "--logdir", str(tmp_path)
    )
    assert bad.code == 2 and "widht" in bad.err


def test_cli_resume_fewshot_digits_after_a_crash(run_cli, tmp_path, monkeypatch):
    import json

    from selfref.runs import RunDir

    argv = [
        "meta-train",
        "--task",
        "fewshot-digits",
        "--core",
        "srwm",
        "--meta-steps",
        "6",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--lr-schedule",
        "cosine",
        "-o",
        "length=6",
        "-o",
        "eval_sequences=8",
        "-o",
        "dim=8",
        "-o",
        "min_ways=2",
        "-o",
        "min_ways_steps=3",  # the curriculum switches before the crash; resume keeps it
        "--device",
        "cpu",
    ]
    whole = tmp_path / "whole"
    assert run_cli(*argv, "--logdir", str(whole)).code == 0
    (done,) = (whole / "meta-train").iterdir()
    want = json.loads((done / "results.json").read_text())
    spec = json.loads((done / "config.json").read_text())["spec"]
    assert spec["task_options"]["min_ways_steps"] == 3

    real_save = RunDir.save_checkpoint

    def dies_after_step_4(self, state, name="last.pt"):  # type: ignore[no-untyped-def]
        real_save(self, state, name)
        if state.get("step") == 4:
            raise KeyboardInterrupt  # as if the job were stopped right after this save

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(RunDir, "save_checkpoint", dies_after_step_4)
    stopped = run_cli(*argv, "--logdir", str(crashed))
    assert stopped.code == 130  # the CLI's exit code for an interrupt
    monkeypatch.setattr(RunDir, "save_checkpoint", real_save)
    (run,) = (crashed / "meta-train").iterdir()
    assert not (run / "results.json").exists()
    r = run_cli("meta-train", "--resume", str(run))
    assert r.code == 0, r.err
    got = json.loads((run / "results.json").read_text())
    assert got["heldout"] == want["heldout"] and got["test"] == want["test"]
    assert (run / "checkpoints" / "best.pt").is_file()
    missing = run_cli("meta-train", "--resume", str(tmp_path))
    assert missing.code == 2
    again = run_cli("meta-train", "--task", "fewshot-digits", "--resume", str(run))
    assert again.code == 2 and "--task" in again.err  # the spec is the stored one


def test_token_shift_feeds_the_previous_input():
    model = SRWMSequenceModel(6, 3, dim=8, heads=2, layers=1, token_shift=True)
    params = _params(model)
    x = _inputs(n=5)
    base, _ = model.forward(params, x)
    x2 = x.clone()
    x2[:, 2] += 1.0
    out, _ = model.forward(params, x2)
    # position 3 sees position 2 twice: through the SRWM's fast weights and through the shift
    no_shift = {"in.weight": params["in.weight"][:, :6], "in.bias": params["in.bias"]}
    plain = SRWMSequenceModel(6, 3, dim=8, heads=2, layers=1)
    p_plain = {**params, **no_shift}
    d_shift = (out - base)[:, 3]
    d_plain = (plain.forward(p_plain, x2)[0] - plain.forward(p_plain, x)[0])[:, 3]
    assert float((d_shift - d_plain).abs().max()) > 1e-6


def test_cosine_schedule_and_keep_best():
    task = _tiny_task("lstm", dim=8)
    logger = MemoryLogger()
    # lr 3 makes the val loss jump about: keep-best must return the weights of the evaluation
    # with the lowest val loss, not the final ones
    trainer, res = _train(
        task, logger, meta_steps=30, meta_lr=3.0, eval_every=5, clip_grad_norm=0.0
    )
    vals = logger.values("heldout/loss")
    assert res.best_score == min(vals)
    assert task.evaluate(res.best_meta_params, "val")["loss"] == res.best_score
    assert task.evaluate(res.meta_params, "val")["loss"] > res.best_score  # keep-best chose
    cos = MetaTrainConfig(meta_steps=4, meta_lr=1e-2, lr_schedule="cosine")
    want = [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert [cos.lr_at(s) for s in range(4)] == pytest.approx(want)
    lg = MemoryLogger()
    _train(task, lg, meta_steps=4, meta_lr=1e-2, lr_schedule="cosine")
    assert lg.values("meta/lr") == pytest.approx(want)  # the loop follows the schedule
    with pytest.raises(ValueError, match="lr_schedule"):
        MetaTrainConfig(lr_schedule="linear")


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path):
    task = FewShotDigits(ways=3, length=6, batch_size=4, eval_sequences=8, min_ways=2)
    model = make_sequence_model(
        "srwm", task.input_dim, 3, dim=8, heads=2, layers=1, token_shift=True
    )
    task = task.with_model(model)
    meta = dict(meta_steps=6, meta_lr=3e-3, eval_every=2, lr_schedule="cosine", seed=3)
    _, full = _train(task, **meta)
    base = {"estimator": "full_bptt", "unroll": 1, "inner_steps": 1, "meta_batch": 4}
    cfg = MetaTrainConfig(**{**base, **meta})
    first = MetaTrainer(SequenceProblem(task), cfg)
    first.train(until=4)  # stops after step 4 (as if killed right after its checkpoint)
    first.save(path=tmp_path / "ck.pt")
    again = MetaTrainer(SequenceProblem(task), cfg)
    again.resume(tmp_path / "ck.pt")
    assert again.step == 4
    res = again.train()
    for k in full.meta_params:  # bit for bit, schedule and data included
        assert torch.equal(res.meta_params[k], full.meta_params[k]), k
    assert res.best_step == full.best_step and res.best_score == full.best_score
    other = MetaTrainer(SequenceProblem(task, {"seed": 4}), cfg)
    with pytest.raises(ValueError, match="differs"):
        other.resume(tmp_path / "ck.pt")


def test_tuned_sgd_widens_a_grid_off_its_edges_but_not_off_a_plateau():
    """Learning rates far too small put the best on the grid's top edge: the grid grows past
    it (and the steps past theirs) until the best is inside. At k = 1 every learning rate
    ties (one example fixes the prediction), so that grid stays as given."""
    task = FewShotDigits(ways=3, length=12, eval_sequences=60)
    lrs, steps = (1e-3, 10**-2.5), (1, 10)
    choices = tune_sgd(task, (1, 10), lrs=lrs, steps_grid=steps, sequences=60)
    c = choices[10]
    assert len(c.lr_grid) > len(lrs) and not c.on_edge
    assert min(c.lr_grid) < c.lr < max(c.lr_grid)
    assert c.steps < max(c.steps_grid)
    one = choices[1]
    assert one.lr_grid == lrs and one.steps_grid == steps and not one.on_edge
    assert one.lr == lrs[0] and one.steps == 1  # ties keep the fewest steps, smallest lr
    capped = tune_sgd(task, (10,), lrs=lrs, steps_grid=steps, sequences=60, max_widen=0)[10]
    assert capped.on_edge and capped.lr_grid == lrs
