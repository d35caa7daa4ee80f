"""Search spaces: typed dimensions, grids, seeded sampling (log-uniform where log), TOML."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from selfref.search_space import (
    CategoricalDim,
    FloatDim,
    IntDim,
    SearchSpace,
    default_space,
    load_space,
)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.toml"
    p.write_text(text)
    return p


def test_default_space_tunes_sgd_with_momentum() -> None:
    s = default_space()
    assert s.optimizer == "momentum"
    assert s.names == ["lr", "momentum", "weight_decay"]
    assert s["lr"] == FloatDim("lr", 1e-3, 1.0, log=True)
    assert s["momentum"] == FloatDim("momentum", 0.0, 0.99)
    assert s["weight_decay"] == FloatDim("weight_decay", 1e-6, 1e-1, log=True)


def test_grid_is_the_cartesian_product_log_spaced_at_cell_centres() -> None:
    s = default_space()
    pts = s.grid({"lr": 3, "momentum": 2, "weight_decay": 1})
    assert len(pts) == 6
    lrs = sorted({p["lr"] for p in pts})
    # cell centres of [1e-3, 1] in log10: -2.5, -1.5, -0.5
    np.testing.assert_allclose(np.log10(lrs), [-2.5, -1.5, -0.5], atol=1e-12)
    assert sorted({p["momentum"] for p in pts}) == pytest.approx([0.2475, 0.7425])
    assert [p["weight_decay"] for p in pts] == [pytest.approx(10**-3.5)] * 6
    # every combination exactly once
    combos = {(p["lr"], p["momentum"]) for p in pts}
    assert len(combos) == 6
    # endpoints=True spans the bounds
    ends = FloatDim("lr", 1e-3, 1.0, log=True).grid(4, endpoints=True)
    np.testing.assert_allclose(np.log10(ends), [-3, -2, -1, 0], atol=1e-12)


def test_int_and_categorical_grids() -> None:
    assert IntDim("k", 1, 10).grid(3) == [2, 6, 9]  # cell centres of 1..10
    assert IntDim("k", 1, 3).grid(10) == [1, 2, 3]  # never more points than values
    assert IntDim("k", 1, 1000, log=True).grid(4, endpoints=True) == [1, 10, 100, 1000]
    assert CategoricalDim("c", ("a", "b", "c")).grid(1) == ["a", "b", "c"]


def test_sampling_is_reproducible_and_in_bounds() -> None:
    s = SearchSpace(
        (
            FloatDim("lr", 1e-4, 0.5, log=True),
            FloatDim("momentum", 0.1, 0.9),
            FloatDim("weight_decay", 1e-6, 1e-2, log=True),
        ),
        optimizer="momentum",
    )
    a = [s.sample(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    b = s.sample(torch.Generator().manual_seed(4))
    assert b != a[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        p = s.sample(g)
        assert s.contains(p)
        assert 1e-4 <= p["lr"] <= 0.5 and 0.1 <= p["momentum"] <= 0.9


def test_log_dimension_is_log_uniform() -> None:
    """Distribution test: log10 of a log dimension is uniform; a linear one is not."""
    log_dim = FloatDim("lr", 1e-4, 1.0, log=True)
    lin_dim = FloatDim("lr", 1e-4, 1.0)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=g, dtype=torch.float64).tolist()
    x = np.log10([log_dim.from_unit(v) for v in u])  # uniform on [-4, 0]
    counts, _ = np.histogram(x, bins=8, range=(-4, 0))
    expected = len(x) / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # chi-square, 7 dof, p = 0.001
    # a quarter of the mass per decade; the linear dimension puts ~0.1% below 1e-3
    assert abs(np.mean(x < -3) - 0.25) < 0.02
    y = np.log10([lin_dim.from_unit(v) for v in u])
    assert np.mean(y < -3) < 0.01
    # the space's sampler uses the same map
    s = SearchSpace((log_dim,), optimizer="sgd")
    z = np.log10([s.sample(g)["lr"] for _ in range(4000)])
    assert abs(np.mean(z < -2) - 0.5) < 0.03


def test_int_log_and_categorical_sampling_cover_every_value() -> None:
    g = torch.Generator().manual_seed(1)
    k = IntDim("k", 1, 4)
    vals = [k.from_unit(float(u)) for u in torch.rand(4000, generator=g, dtype=torch.float64)]
    freq = np.bincount(vals, minlength=5)[1:] / len(vals)
    np.testing.assert_allclose(freq, 0.25, atol=0.03)
    c = CategoricalDim("c", ("x", "y"))
    assert {c.from_unit(0.0), c.from_unit(0.999999), c.from_unit(1.0)} == {"x", "y"}


@pytest.mark.parametrize(
    ("dim", "match"),
    [
        (lambda: FloatDim("lr", 1.0, 0.1), "inverted range"),
        (lambda: FloatDim("lr", 0.1, 0.1), "empty range"),
        (lambda: FloatDim("lr", 0.0, 1.0, log=True), "log range needs low > 0"),
        (lambda: FloatDim("lr", 0.0, math.inf), "finite number"),
        (lambda: IntDim("k", 5, 2), "inverted range"),
        (lambda: IntDim("k", 1.5, 2), "must be an integer"),  # type: ignore[arg-type]
        (lambda: CategoricalDim("c", ()), "empty list of choices"),
        (lambda: CategoricalDim("c", ("a", "a")), "repeated choices"),
    ],
)
def test_bad_dimensions_raise_naming_the_problem(dim, match) -> None:
    with pytest.raises(ValueError, match=match):
        dim()


def test_space_checks_names_and_optimizer_ranges() -> None:
    with pytest.raises(ValueError, match="unknown hyperparameter 'beta1' for optimizer 'momentum'"):
        SearchSpace((FloatDim("beta1", 0.1, 0.9),), optimizer="momentum")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        SearchSpace((FloatDim("lr", 0.1, 0.9),), optimizer="lbfgs")
    with pytest.raises(ValueError, match="dimension 'momentum'.*out of range"):
        SearchSpace((FloatDim("momentum", 0.0, 1.0),))  # momentum 1 is not allowed
    with pytest.raises(ValueError, match="names a dimension twice"):
        SearchSpace((FloatDim("lr", 0.1, 0.9), FloatDim("lr", 0.1, 0.9)))
    with pytest.raises(ValueError, match="both tuned and fixed"):
        SearchSpace((FloatDim("lr", 0.1, 0.9),), fixed={"lr": 0.1})
    with pytest.raises(ValueError, match="at least one dimension"):
        SearchSpace(())
    s = SearchSpace((FloatDim("l2", 1e-5, 1e-1, log=True),), optimizer="adam", fixed={"lr": 0.01})
    assert s.split({"l2": 1e-3, "lr": 0.01}) == ({"lr": 0.01}, {"l2": 1e-3})


def test_toml_round_trip(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        """
optimizer = "momentum"

[lr]
type = "float"
low = 1e-3
high = 1.0
log = true

[momentum]
type = "float"
low = 0.0
high = 0.99

[fixed]
weight_decay = 0.0
""",
    )
    s = load_space(p)
    assert s.names == ["lr", "momentum"]
    assert s["lr"] == FloatDim("lr", 1e-3, 1.0, log=True)
    assert s.fixed == {"weight_decay": 0.0}
    assert SearchSpace.from_dict(s.to_dict()) == s
    pts = s.grid(2)
    assert len(pts) == 4 and all(p["weight_decay"] == 0.0 for p in pts)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('optimizer = "momentum"\n[lr]\ntype = "float"\nlow = 1.0\nhigh = 0.1\n', "inverted"),
        ('[lr]\ntype = "float"\nlow = 0.1\nhigh = 0.1\n', "empty range"),
        ('[lr]\ntype = "float"\nlow = 0.1\nhigh = 1\nstep = 2\n', r"unknown keys \['step'\]"),
        ('[lr]\ntype = "real"\nlow = 0.1\nhigh = 1\n', "has type 'real'"),
        ('[lr]\ntype = "float"\nhigh = 1\n', "needs 'low'"),
        ('seed = 3\n[lr]\ntype = "float"\nlow = 0.1\nhigh = 1\n', "unknown key 'seed'"),
        ('[lrr]\ntype = "float"\nlow = 0.1\nhigh = 1\n', "unknown hyperparameter 'lrr'"),
        ('[lr]\ntype = "float"\nlow = 0.1\nhigh = 1\nlog = "yes"\n', "log must be true or false"),
        ("[lr\n", "not valid TOML"),
    ],
)
def test_bad_toml_raises_naming_the_problem(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_space(_write(tmp_path, text))


def test_missing_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_space(tmp_path / "nope.toml")
