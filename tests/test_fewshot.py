"""fewshot-digits: deterministic sequences, delayed labels, held-out maps never seen in training."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from selfref.net.sequence import make_sequence_model
from selfref.tasks import Task, make
from selfref.tasks.fewshot import FewShotDigits, mapping_split


def _lstm(task: FewShotDigits, dim: int) -> FewShotDigits:
    """``task`` handed an LSTM learner of width ``dim``."""
    return task.with_model(make_sequence_model("lstm", task.input_dim, task.ways, dim=dim))


def test_registry_and_protocol():
    task = make("fewshot-digits", ways=3, length=6, batch_size=2)
    assert isinstance(task, FewShotDigits) and isinstance(task, Task)
    with pytest.raises(ValueError, match="ways"):
        make("fewshot-digits", ways=11)
    with pytest.raises(ValueError, match="bad option"):
        make("fewshot-digits", wayz=3)


def test_batches_are_deterministic_and_vary_with_step_seed_split():
    task = FewShotDigits(ways=5, length=10, batch_size=4)
    a = task.batch("train", 3, seed=7)
    b = task.batch("train", 3, seed=7)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["x"], task.batch("train", 4, seed=7)["x"])
    assert not torch.equal(a["x"], task.batch("train", 3, seed=8)["x"])
    assert not torch.equal(a["x"], task.batch("val", 3, seed=7)["x"])
    with pytest.raises(ValueError, match="split"):
        task.batch("dev", 0, seed=0)


def test_inputs_are_projection_and_previous_label():
    task = FewShotDigits(ways=4, length=12, proj_dim=7, batch_size=3)
    b = task.batch("train", 0, seed=0)
    assert b["inputs"].shape == (3, 12, 11)
    torch.testing.assert_close(b["inputs"][..., :7], b["x"])
    prev = b["inputs"][..., 7:]
    assert torch.equal(prev[:, 0], torch.zeros(3, 4))
    assert torch.equal(prev[:, 1:].argmax(-1), b["y"][:, :-1])
    assert torch.equal(prev.sum(-1)[:, 1:], torch.ones(3, 11))
    assert int(b["y"].max()) < 4 and int(b["y"].min()) >= 0
    # every sequence has its own label permutation / projection
    assert len({tuple(c) for c in b["classes"].tolist()}) > 1


def test_each_sequence_has_its_own_projection():
    task = FewShotDigits(ways=2, length=40, proj_dim=5, batch_size=2)
    b = task.sequences("train", 2, seed=0)
    # same digit class in two sequences maps to different directions: the mean input per
    # class differs between the sequences far beyond sampling noise
    means = []
    for i in range(2):
        lab = int((b["classes"][i] == b["classes"][i][0]).nonzero()[0])
        means.append(b["x"][i][b["y"][i] == lab].mean(0))
    assert float((means[0] - means[1]).norm()) > 0.1


def test_class_maps_are_partitioned_between_splits():
    counts = {"train": 0, "val": 0, "test": 0}
    for classes in itertools.permutations(range(10), 5):
        counts[mapping_split(list(classes))] += 1
    total = sum(counts.values())
    assert total == 30240
    assert abs(counts["test"] / total - 0.1) < 0.01 and abs(counts["val"] / total - 0.1) < 0.01
    task = FewShotDigits(ways=5, length=3)
    for split in ("train", "val", "test"):
        b = task.sequences(split, 60, seed=3)
        assert all(mapping_split(c) == split for c in b["classes"].tolist())


def test_loss_and_evaluate_with_a_learner():
    task = _lstm(FewShotDigits(ways=3, length=22, batch_size=4, eval_sequences=8), 8)
    params = task.init_params(torch.Generator().manual_seed(0))
    loss = task.loss(params, task.batch("train", 0, seed=0))
    assert loss.ndim == 0 and abs(float(loss) - math.log(3)) < 0.5
    ev = task.evaluate(params, "test")
    assert set(ev) == {"loss", "accuracy", "acc@1", "acc@5", "acc@10", "acc@20"}
    assert ev == task.evaluate(params, "test")  # fixed evaluation sequences
    hits = task.query_hits(params, "test")
    assert hits.shape == (8, 22) and set(hits.unique().tolist()) <= {0.0, 1.0}
    for k in (1, 5, 10, 20):
        assert float(hits[:, k].mean()) == pytest.approx(ev[f"acc@{k}"])
    assert float(hits.mean()) == pytest.approx(ev["accuracy"])
    # more evaluation sequences (two blocks) extend the set: the first 8 stay the same
    more = _lstm(FewShotDigits(ways=3, length=22, eval_sequences=260), 8)
    assert more.EVAL_BLOCK < 260
    wide = more.query_hits(params, "test")
    assert wide.shape == (260, 22) and torch.equal(wide[:8], hits)
    short = _lstm(FewShotDigits(ways=3, length=8, eval_sequences=4), 4)
    assert set(short.evaluate(short.init_params(torch.Generator().manual_seed(0)), "val")) == {
        "loss",
        "accuracy",
        "acc@1",
        "acc@5",
    }


def test_fixed_projection_ablation_shares_one_projection():
    # with p = 70 > 64 pixels, inputs projected by one P lie in its 64-d column space; with
    # a new P per sequence, two sequences together span all 70 dimensions
    def rank(projection: str) -> int:
        task = FewShotDigits(
            ways=5, length=60, proj_dim=70, projection=projection, dtype=torch.float64
        )
        x = task.sequences("train", 2, seed=0)["x"].double()
        return int(torch.linalg.matrix_rank(x.reshape(-1, 70)))

    assert rank("fixed") <= 64 < rank("random")
    with pytest.raises(ValueError, match="projection"):
        FewShotDigits(projection="orthogonal")


def test_vectorized_batches_hold_the_right_images_maps_and_projections():
    # batch() draws everything in one vectorized pass; it must keep the held-out maps, put
    # at every position an image of the class its label names, and use a new projection per
    # sequence. With the fixed (invertible 64×64) projection the pixels can be recovered.
    task = FewShotDigits(
        ways=5, length=30, proj_dim=64, batch_size=16, projection="fixed", dtype=torch.float64
    )
    P = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 8
    for split in ("train", "val", "test"):
        b = task.batch(split, 5, seed=1)
        assert all(mapping_split(c) == split for c in b["classes"].tolist())
        imgs, labels = task.data[split]
        pixels = torch.linalg.solve(P, b["x"].reshape(-1, 64).T).T  # (b·n, 64)
        nearest = torch.cdist(pixels, imgs).min(dim=1)
        assert float(nearest.values.max()) < 1e-6  # every input is an image of the split
        digit = torch.gather(b["classes"], 1, b["y"]).reshape(-1)  # class each label names
        assert torch.equal(labels[nearest.indices], digit)
    varied = FewShotDigits(ways=5, length=30, batch_size=64).batch("train", 0, seed=0)
    assert len({tuple(c) for c in varied["classes"].tolist()}) > 30
    # a new P per sequence: two sequences with p = 70 together span all 70 dimensions
    wide = FewShotDigits(ways=5, length=60, proj_dim=70, batch_size=2, dtype=torch.float64)
    x = wide.batch("train", 0, seed=0)["x"].reshape(-1, 70)
    assert int(torch.linalg.matrix_rank(x)) == 70


def test_min_ways_mixes_easier_train_sequences_and_keeps_evaluation_full():
    task = FewShotDigits(ways=5, length=40, batch_size=400, min_ways=2)
    b = task.batch("train", 0, seed=0)
    used = torch.tensor([len(set(row)) for row in b["y"].tolist()])  # labels per sequence
    assert int(used.min()) == 2 and int(used.max()) == 5
    # c ~ U{2..5}: each count is about a quarter (a 40-long sequence shows all c labels
    # except with probability < 5·(4/5)^40 ≈ 7e-4)
    for c in range(2, 6):
        assert 0.15 < float((used == c).double().mean()) < 0.35
    # labels are a random subset, not always 0..c−1
    two = [set(row) for row, u in zip(b["y"].tolist(), used.tolist()) if u == 2]
    assert len({tuple(sorted(s)) for s in two}) > 3
    for split in ("val", "test"):  # held-out sequences always use all ways
        ev = task.batch(split, 0, seed=0)
        assert min(len(set(row)) for row in ev["y"].tolist()) >= 4
        assert max(len(set(row)) for row in ev["y"].tolist()) == 5
    full = FewShotDigits(ways=5, length=40, batch_size=100)
    assert min(len(set(row)) for row in full.batch("train", 0, seed=0)["y"].tolist()) >= 4
    with pytest.raises(ValueError, match="min_ways"):
        FewShotDigits(ways=5, min_ways=6)
    with pytest.raises(ValueError, match="min_ways"):
        FewShotDigits(ways=5, min_ways=1)


def test_min_ways_steps_ends_the_mixture_at_that_step():
    task = FewShotDigits(ways=5, length=40, batch_size=200, min_ways=2, min_ways_steps=3)
    mixed = FewShotDigits(ways=5, length=40, batch_size=200, min_ways=2)
    for step in (0, 2):  # before the switch: the mixture, the same batches as without it
        b = task.batch("train", step, seed=0)
        assert torch.equal(b["y"], mixed.batch("train", step, seed=0)["y"])
        assert min(len(set(row)) for row in b["y"].tolist()) == 2
    for step in (3, 10):  # from the switch on: every sequence uses all ways
        assert min(len(set(row)) for row in task.batch("train", step, seed=0)["y"].tolist()) >= 4
    with pytest.raises(ValueError, match="min_ways_steps"):
        FewShotDigits(ways=5, min_ways=2, min_ways_steps=-1)
