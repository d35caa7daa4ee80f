"""Imports only run down the layers (../shared/DESIGN.md): a test fails if one runs up.

Every ``import``/``from ... import`` of every module under ``selfref/`` — also the ones inside
functions — is read with :mod:`ast` and the importing module's layer compared with the
imported one's (the layers, bottom to top, are :data:`LAYERS`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import selfref

ROOT = Path(selfref.__file__).resolve().parent

# top-level module or package of selfref -> layer (a module may import its own layer or below)
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        ("params", "checkpoints", "stats", "budget", "logging", "runs", "search_space", "optim"),
        0,
    ),
    "tasks": 1,
    **dict.fromkeys(("net", "train", "hypergrad"), 2),
    "meta": 3,
    **dict.fromkeys(("methods", "execution"), 4),
    "compare": 5,
    **dict.fromkeys(("commands", "cli", "__main__", "__init__"), 6),
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "selfref":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "selfref":
                out += [(node.lineno, f"selfref.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def test_every_module_has_a_layer():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.glob("*")}
    tops = {t for t in tops if not t.startswith((".", "_")) or t in ("__init__", "__main__")}
    tops -= {"presets", "py.typed"}
    missing = sorted(t for t in tops if t not in LAYERS and (ROOT / t).suffix != ".toml")
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_imports_only_run_down_the_layers():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        me = rel.parts[0].removesuffix(".py")
        if me not in LAYERS:
            continue
        for line, mod in _imports(path):
            top = _top(mod)
            if top is None or top not in LAYERS:
                continue
            if LAYERS[top] > LAYERS[me]:
                bad.append(
                    f"selfref/{rel}:{line} imports {mod} (layer {LAYERS[top]} > {LAYERS[me]})"
                )
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself: an import of meta from tasks is found."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from selfref.meta.trainer import MetaTrainer\n")
    assert _imports(f) == [(2, "selfref.meta.trainer")]
    assert LAYERS[_top("selfref.meta.trainer")] > LAYERS["tasks"]
