"""Tasks: deterministic batches, digits preprocessing, quadratic formula and vmap, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfref import tasks
from selfref.tasks import SPLITS, Task, make

ALL_TASKS = tasks.names()


def _build(name: str, mnist_factory) -> Task:
    if name == "mnist-mlp":
        return make(name, data_dir=str(mnist_factory()), val_size=10, batch_size=8)
    return make(name)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registry_lists_the_foundation_tasks():
    for name in ("quadratic", "digits-mlp", "digits-logreg", "mnist-mlp"):
        assert name in ALL_TASKS
    for name, description in tasks.available().items():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("name", ALL_TASKS)
def test_batches_are_deterministic_per_split_step_seed(name, mnist_factory):
    task = _build(name, mnist_factory)
    assert isinstance(task, Task)
    for split in SPLITS:
        for step in (0, 3):
            assert _equal(task.batch(split, step, seed=7), task.batch(split, step, seed=7))
    # a fresh instance gives the same batches too (no hidden state)
    assert _equal(_build(name, mnist_factory).batch("train", 2, 7), task.batch("train", 2, 7))
    # different seeds and different splits give different batches
    assert not _equal(task.batch("train", 0, seed=0), task.batch("train", 0, seed=1))
    assert not _equal(task.batch("train", 0, seed=0), task.batch("val", 0, seed=0))


@pytest.mark.parametrize("name", ALL_TASKS)
def test_protocol_capabilities_tell_the_truth(name, mnist_factory):
    """step_invariant, full_batch, num_classes and search_defaults (what callers use instead
    of the task's name or its attributes) agree with what the task does."""
    task = _build(name, mnist_factory)
    cls = tasks.task_class(name)
    assert cls.step_invariant == task.step_invariant
    same = _equal(task.batch("train", 0, seed=3), task.batch("train", 5, seed=3))
    assert same == task.step_invariant, name
    for split in SPLITS:
        full = task.full_batch(split)
        if full is None:  # no data set in memory: quadratics (the batch is the function), fewshot
            continue
        p = task.init_params(torch.Generator().manual_seed(0))
        assert full["y"].shape[0] == task.num_examples(split)
        assert 0 <= int(full["y"].min()) and int(full["y"].max()) < task.num_classes
        got = float(task.loss(p, full))  # the loss of the whole split is its evaluation's
        assert got == pytest.approx(task.evaluate(p, split)["loss"], rel=1e-5)
    want = {"quadratic": 0, "fewshot-digits": getattr(task, "ways", None)}.get(name, 10)
    assert task.num_classes == want
    assert (task.full_batch("train") is None) == (name in ("quadratic", "fewshot-digits"))
    # a search's task defaults are valid options of the task
    assert isinstance(_build(name, mnist_factory), cls)
    if cls.search_defaults:
        make(name, **cls.search_defaults)
    with pytest.raises(TypeError):  # read-only: no caller changes them for everyone
        cls.search_defaults["functions"] = "per_split"  # type: ignore[index]


def test_quadratic_search_defaults_fix_one_function():
    assert dict(tasks.task_class("quadratic").search_defaults) == {"functions": "fixed"}
    task = make("quadratic", **tasks.task_class("quadratic").search_defaults)
    assert _equal(task.batch("train", 0, 0), task.batch("test", 0, 5))  # one problem
    assert dict(tasks.task_class("digits-mlp").search_defaults) == {}


def test_registry_and_seed_mixing_are_public_and_read_only():
    assert set(tasks.REGISTRY) == set(ALL_TASKS)
    with pytest.raises(TypeError):
        tasks.REGISTRY["cifar"] = "x:Y"  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown task 'cifar'; known tasks: quadratic"):
        tasks.task_class("cifar")
    assert dict(tasks.SPLIT_SALT) == {"train": 0, "val": 1, "test": 2}
    seeds = {tasks.mix_seed(s, t) for s in range(20) for t in range(20)}
    assert len(seeds) == 400 and all(0 <= v < 2**63 for v in seeds)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_bad_split_and_step_raise(name, mnist_factory):
    task = _build(name, mnist_factory)
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, val, test"):
        task.batch("dev", 0, 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        task.batch("train", -1, 0)


@pytest.mark.parametrize("name", ["digits-mlp", "digits-logreg"])
def test_supervised_steps_differ_and_cover_an_epoch(name):
    task = make(name, batch_size=100)
    b0, b1 = task.batch("train", 0, 0), task.batch("train", 1, 0)
    assert b0["x"].shape == (100, 64) and b0["y"].dtype == torch.int64
    assert not torch.equal(b0["x"], b1["x"])
    # within an epoch batches are disjoint slices of one permutation
    per_epoch = task.num_examples("train") // 100
    xs = torch.cat([task.batch("train", t, 0)["x"] for t in range(per_epoch)])
    n_unique_all = torch.unique(task.data["train"][0], dim=0).shape[0]
    n_dupes = task.num_examples("train") - n_unique_all  # digits has a few repeated images
    assert torch.unique(xs, dim=0).shape[0] >= xs.shape[0] - n_dupes


def test_digits_split_sizes_and_standardization():
    task = make("digits-mlp", dtype=torch.float64)
    sizes = {s: task.num_examples(s) for s in SPLITS}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    x_tr, y_tr = task.data["train"]
    mean, std = x_tr.mean(0), x_tr.std(0, unbiased=False)
    constant = std == 0  # pixels that are always 0 in train stay exactly 0
    assert torch.allclose(mean, torch.zeros(64, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(std[~constant], torch.ones_like(std[~constant]), atol=1e-12)
    assert (x_tr[:, constant] == 0).all()
    # val/test use the train statistics, so they are only approximately standardized
    assert abs(float(task.data["val"][0].mean())) < 0.2
    # stratified: every class appears in every split
    for s in SPLITS:
        assert set(task.data[s][1].tolist()) == set(range(10))
    # the split is fixed by split_seed
    other = make("digits-mlp", split_seed=1, dtype=torch.float64)
    assert not torch.equal(other.data["test"][1], task.data["test"][1])


def test_digits_mlp_shapes_init_and_evaluate():
    task = make("digits-mlp", hidden=[32, 16], activation="relu")
    p = task.init_params(torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in p.items()} == {
        "l0.weight": (32, 64),
        "l0.bias": (32,),
        "l1.weight": (16, 32),
        "l1.bias": (16,),
        "l2.weight": (10, 16),
        "l2.bias": (10,),
    }
    assert _equal(p, task.init_params(torch.Generator().manual_seed(0)))
    assert not _equal(p, task.init_params(torch.Generator().manual_seed(1)))
    metrics = task.evaluate(p, "test")
    assert set(metrics) == {"loss", "accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0
    loss = task.loss(p, task.batch("train", 0, 0))
    assert loss.shape == () and torch.isfinite(loss)


def test_task_options_are_validated():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*gelu, relu, sigmoid, tanh"):
        make("digits-mlp", activation="swish")
    with pytest.raises(ValueError, match="unknown option 'widht' for task 'digits-mlp'; valid: "
                       "activation, batch_size, depth, .*hidden"):  # fmt: skip
        make("digits-mlp", widht=3)
    with pytest.raises(ValueError, match="'digits-mlp' option hidden='abc' must be a list of "
                       "integers or an integer"):  # fmt: skip
        make("digits-mlp", hidden="abc")
    with pytest.raises(ValueError, match="option ways=2.5 must be an integer"):
        make("fewshot-digits", ways=2.5)
    assert make("digits-mlp", hidden=[8, 4], init_scale=1).sizes == (64, 8, 4, 10)  # int: a number
    with pytest.raises(ValueError, match="unknown distribution"):
        make("quadratic", distribution="cauchy")


def test_make_unknown_name_lists_known_tasks():
    with pytest.raises(ValueError) as e:
        make("cifar10")
    msg = str(e.value)
    assert "unknown task 'cifar10'" in msg
    for name in ALL_TASKS:
        assert name in msg


def test_quadratic_shapes_and_loss_formula():
    task = make("quadratic", dim=10, num_functions=3, dtype=torch.float64, init="gaussian")
    p = task.init_params(torch.Generator().manual_seed(0))
    batch = task.batch("train", 0, seed=4)
    assert p["theta"].shape == (3, 10)
    assert batch["W"].shape == (3, 10, 10) and batch["y"].shape == (3, 10)
    direct = sum(
        float(np.sum((batch["W"][i].numpy() @ p["theta"][i].numpy() - batch["y"][i].numpy()) ** 2))
        for i in range(3)
    )
    assert float(task.loss(p, batch)) == pytest.approx(direct, rel=1e-12)
    # the objective does not depend on the step; zeros init by default (paper)
    assert _equal(task.batch("train", 5, seed=4), batch)
    assert float(make("quadratic").init_params(torch.Generator())["theta"].abs().sum()) == 0.0
    # each function's gradient is its own: 2 W_i^T (W_i θ_i − y_i)
    g = torch.func.grad(task.loss)(p, batch)["theta"]
    for i in range(3):
        r = batch["W"][i] @ p["theta"][i] - batch["y"][i]
        assert torch.allclose(g[i], 2 * batch["W"][i].T @ r, atol=1e-12)


def test_quadratic_vmap_over_stacked_functions_equals_loop():
    task = make("quadratic", dtype=torch.float64, init="gaussian")
    m = 6
    params = [task.init_params(torch.Generator().manual_seed(i)) for i in range(m)]
    batches = [task.batch("train", 0, seed=i) for i in range(m)]
    stacked_p = {"theta": torch.stack([p["theta"] for p in params])}  # (m, 1, d)
    stacked_b = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
    vmapped = torch.func.vmap(task.loss)(stacked_p, stacked_b)  # (m,)
    looped = torch.stack([task.loss(p, b) for p, b in zip(params, batches)])
    assert vmapped.shape == (m,)
    assert torch.allclose(vmapped, looped, atol=1e-12)
    grads = torch.func.vmap(torch.func.grad(task.loss))(stacked_p, stacked_b)["theta"]
    for i in range(m):
        assert torch.allclose(grads[i], torch.func.grad(task.loss)(params[i], batches[i])["theta"])


def test_quadratic_fixed_function_is_one_problem_for_every_split_and_seed():
    per_split = make("quadratic", seed=3)
    assert not torch.equal(
        per_split.batch("train", 0, seed=3)["W"], per_split.batch("val", 0, seed=3)["W"]
    )
    fixed = make("quadratic", functions="fixed", seed=3)
    want = per_split.batch("train", 0, seed=3)  # the task seed's train function
    for split in ("train", "val", "test"):
        for seed in (0, 3, 7):
            b = fixed.batch(split, 5, seed=seed)
            assert torch.equal(b["W"], want["W"]) and torch.equal(b["y"], want["y"])
    theta = fixed.init_params(torch.Generator().manual_seed(0))
    theta = {"theta": theta["theta"] + 0.5}
    train_loss = float(fixed.loss(theta, fixed.batch("train", 0, seed=11)))
    assert fixed.evaluate(theta, "val")["loss"] == pytest.approx(train_loss)
    with pytest.raises(ValueError, match="functions"):
        make("quadratic", functions="shared")


def test_quadratic_uniform_distribution_range():
    task = make("quadratic", distribution="uniform", num_functions=50)
    b = task.batch("val", 0, 0)
    assert float(b["W"].abs().max()) <= 1.0 and float(b["y"].abs().max()) <= 1.0
    assert task.evaluate(task.init_params(torch.Generator()), "val").keys() == {"loss"}
