"""Keyword options checked against the constructor that takes them, before anything is built.

Tasks and methods are built from keyword options that often come from the command line
(``--task-option hidden=40``, ``--method-option grid.points=4``) or from a stored
config.json. :func:`option_hints` reads which options a constructor accepts (its named
parameters, or the fields of a config dataclass for constructors that take ``**options``) and
their type hints; :func:`check_options` rejects an unknown option (naming the valid ones) or a
value of the wrong type (naming the type wanted) with one ``ValueError`` line, so bad input
fails before any work.

Types are checked as far as the hints say: ``int``, ``float`` (an int is a number too),
``bool``, ``str``, ``None``, ``Literal``, unions, sequences (``list``/``tuple``/``Sequence``
of a checked element type; a string is not a sequence here), mappings, and classes
(``isinstance``; a ``Path`` also takes a string). Anything else (``Any``, callables, type
variables, unresolvable hints) is accepted as it is and left to the constructor.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

__all__ = ["option_hints", "check_options", "describe_hint"]

_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _resolve(fn: Any) -> dict[str, Any]:
    """Type hints of ``fn`` by name; a hint that cannot be evaluated counts as ``Any``."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # a hint names something imported only for type checking
        out: dict[str, Any] = {}
        globalns = getattr(inspect.unwrap(fn), "__globals__", {})
        for name, raw in getattr(fn, "__annotations__", {}).items():
            try:
                out[name] = eval(raw, globalns) if isinstance(raw, str) else raw  # noqa: S307
            except Exception:
                out[name] = Any
        return out


def option_hints(cls: Any, exclude: Sequence[str] = ()) -> dict[str, Any] | None:
    """{option: type hint} that ``cls(**options)`` accepts, or None when it cannot be known.

    The named keyword parameters of ``cls.__init__`` (``self`` and ``exclude`` left out); a
    constructor that also takes ``**options`` adds the fields of ``cls.options_class`` (a
    dataclass) when it declares one, and otherwise accepts anything (None).
    """
    init = cls.__init__ if inspect.isclass(cls) else cls
    params = inspect.signature(init).parameters
    hints = _resolve(init)
    out = {
        n: hints.get(n, Any)
        for n, p in params.items()
        if n != "self" and n not in exclude and p.kind in _KEYWORD
    }
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        config = getattr(cls, "options_class", None)
        if config is None or not dataclasses.is_dataclass(config):
            return None
        fields = _resolve(config)
        for f in dataclasses.fields(config):
            if f.name not in exclude:
                out[f.name] = fields.get(f.name, Any)
        out.pop("config", None)
    return out


def _matches(hint: Any, value: Any) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(map(_matches, args, value))
        return not args or all(_matches(args[0], v) for v in value)
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            return False
        if len(args) != 2:
            return True
        return all(_matches(args[0], k) and _matches(args[1], v) for k, v in value.items())
    if inspect.isclass(hint):
        if issubclass(hint, PurePath) and isinstance(value, str):
            return True
        return isinstance(value, hint)
    return True  # a callable, a type variable, ...: left to the constructor


def describe_hint(hint: Any) -> str:
    """A short English name of a type hint, e.g. ``int | None`` -> "an integer or None"."""
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(dict.fromkeys(describe_hint(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple, Sequence, typing.Sequence):
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return "a list of " + (plural.get(args[0], "values") if args else "values")
    if origin in (dict, Mapping, typing.Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_options(
    owner: str, cls: Any, options: Mapping[str, Any], exclude: Sequence[str] = ()
) -> None:
    """Reject unknown options and values of the wrong type for ``cls(**options)``.

    Args:
        owner: how messages name the thing built, e.g. ``"task 'digits-mlp'"``.
        cls: the class (or function) that will take the options.
        options: the options to check.
        exclude: parameters the caller sets itself (not options a user may give).

    Raises:
        ValueError: ``unknown option 'x' for task 'digits-mlp'; valid: a, b, c`` or
            ``task 'digits-mlp' option hidden='abc' must be a list of integers or an integer``.
    """
    hints = option_hints(cls, exclude)
    if hints is None:  # **options with no declared schema: the constructor checks them
        return
    for key, value in options.items():
        if key not in hints:
            valid = ", ".join(sorted(hints)) or "none"
            raise ValueError(f"unknown option {key!r} for {owner}; valid: {valid}")
        if not _matches(hints[key], value):
            raise ValueError(f"{owner} option {key}={value!r} must be {describe_hint(hints[key])}")
