"""selfref.options: keyword options checked against a constructor's signature and hints."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from selfref import methods
from selfref.options import check_options, describe_hint, option_hints


class _Plain:
    def __init__(
        self,
        n: int = 1,
        rate: float = 0.1,
        flag: bool = False,
        name: str = "a",
        sizes: Sequence[int] | int = (2,),
        pair: tuple[int, str] = (1, "x"),
        where: str | Path | None = None,
        mode: Literal["fast", "slow"] = "fast",
        table: Mapping[str, int] | None = None,
        anything: Any = None,
    ) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class _Config:
    steps: int = 3
    lr: float = 0.1


class _FromConfig:
    options_class = _Config

    def __init__(self, **options: Any) -> None:
        _Config(**options)


class _Opaque:
    def __init__(self, **options: Any) -> None:
        pass


GOOD = [
    {"n": 3}, {"n": np.int64(3)}, {"rate": 2}, {"rate": np.float32(0.5)}, {"flag": True},
    {"sizes": [4, 5]}, {"sizes": (4,)}, {"sizes": 7}, {"pair": (2, "y")}, {"where": "a/b"},
    {"where": Path("a")}, {"where": None}, {"mode": "slow"}, {"table": {"a": 1}},
    {"anything": object()},
]  # fmt: skip
BAD = [
    ({"n": True}, "n=True must be an integer"),
    ({"n": 2.5}, "n=2.5 must be an integer"),
    ({"rate": "fast"}, "rate='fast' must be a number"),
    ({"flag": 1}, "flag=1 must be true or false"),
    ({"name": 3}, "name=3 must be a string"),
    ({"sizes": "abc"}, "sizes='abc' must be a list of integers or an integer"),
    ({"sizes": [1, "x"]}, "must be a list of integers or an integer"),
    ({"pair": (1, 2)}, "pair=(1, 2) must be"),
    ({"mode": "medium"}, "mode='medium' must be one of 'fast', 'slow'"),
    ({"table": {"a": "b"}}, "table={'a': 'b'} must be a mapping or None"),
    ({"where": 3}, "where=3 must be a string or Path or None"),
    ({"nosuch": 1}, "unknown option 'nosuch' for thing; valid: anything, flag, mode, n, name"),
]


@pytest.mark.parametrize("opts", GOOD, ids=[str(g) for g in GOOD])
def test_values_of_the_hinted_types_pass(opts: dict) -> None:
    check_options("thing", _Plain, opts)


@pytest.mark.parametrize("opts, message", BAD, ids=[m for _, m in BAD])
def test_unknown_options_and_wrong_types_are_one_line_errors(opts: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        check_options("thing", _Plain, opts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_where_the_options_come_from() -> None:
    assert set(option_hints(_Plain)) >= {"n", "rate", "where", "anything"}
    assert set(option_hints(_Plain, exclude=("where",))) == set(option_hints(_Plain)) - {"where"}
    assert option_hints(_FromConfig) == {"steps": int, "lr": float}  # **options: the dataclass
    assert option_hints(_Opaque) is None  # **options, no schema: the constructor decides
    check_options("opaque", _Opaque, {"whatever": object()})
    with pytest.raises(ValueError, match="unknown option 'lr_' for cfg; valid: lr, steps"):
        check_options("cfg", _FromConfig, {"lr_": 1})
    assert describe_hint(int | None) == "an integer or None"
    assert describe_hint(Sequence[str]) == "a list of strings"


def test_every_registered_method_declares_its_user_options() -> None:
    """No method hides its options behind an undeclared **options, and none offers the
    harness's own parameters to users."""
    for name in methods.names():
        opts = methods.user_options(name)
        assert opts is not None, name
        assert not set(opts) & set(methods.HARNESS_OPTIONS), name
        methods.check_options(name, {})  # the defaults are valid
    assert set(methods.user_options("rmad")) >= {"steps", "meta_lr", "learn"}
    assert "checkpoint" in methods.user_options("selfref")
    with pytest.raises(ValueError, match="method 'grid': unknown grid order 'x'"):
        methods.check_options("grid", {"order": "x"})
    with pytest.raises(ValueError, match="option 'space' is set by the comparison"):
        methods.check_options("grid", {"space": None})
    with pytest.raises(TypeError):
        methods.REGISTRY["new"] = "x:Y"  # type: ignore[index]
