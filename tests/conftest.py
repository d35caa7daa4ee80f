"""Shared pytest fixtures: seeding, thread count, run-dir roots, the CLI runner, tiny MNIST.

- Every test starts from ``torch.manual_seed(0)`` (tests should still pass explicit
  generators; this only pins anything that forgets to).
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before anything touches CUDA, so the RMAD tests'
  deterministic cuBLAS setting takes effect (RMAD warns when it is set too late).
- ``torch.set_num_threads(1)``: the tasks under test are tiny, and on a shared 2-core
  machine intra-op threads only contend with each other.
- ``tmp_logdir``: a fresh, not yet existing log root under pytest's ``tmp_path``.
- ``run_cli(*args)``: runs ``selfref.cli.main`` in-process and returns a :class:`CliRun`
  with the exit code (argparse's ``SystemExit`` included), stdout and stderr.
- ``idx_writer``, ``mnist_factory``, ``tiny_mnist_dir``: IDX files written by the test itself
  (MNIST layout), plain or gzipped.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402 - after the cuBLAS setting above

torch.set_num_threads(1)

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i4"): 0x0C}


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tmp_logdir(tmp_path: Path) -> Path:
    """A log root that does not exist yet (commands must create it)."""
    return tmp_path / "logs"


@dataclass
class CliRun:
    """Exit code and captured output of one in-process ``selfref`` call."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """``run_cli("train", "--steps", 5)`` -> CliRun(code, out, err); never raises SystemExit."""
    from selfref.cli import main

    def run(*args: object) -> CliRun:
        capsys.readouterr()  # drop anything printed before
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help (0) and usage errors (2)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliRun(int(code), captured.out, captured.err)

    return run


def write_idx(path: Path, array: np.ndarray, gz: bool = False, magic: bytes | None = None) -> Path:
    """Write ``array`` as an IDX file (uint8/int8/int32), optionally gzipped or with a bad magic."""
    array = np.ascontiguousarray(array)
    code = _IDX_CODES[array.dtype]
    header = magic if magic is not None else bytes([0, 0, code, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(str(path) + ".gz") if gz else Path(path)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_tiny_mnist(
    root: Path, n_train: int = 60, n_test: int = 20, side: int = 28, gz: bool = False, seed: int = 0
) -> Path:
    """Four MNIST-named IDX files with random images whose label is readable from the pixels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 64, size=(n, side, side)).astype(np.uint8)
        images[np.arange(n), 0, labels] = 255  # the label is a bright pixel in row 0
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return root


@pytest.fixture
def tiny_mnist_dir(tmp_path: Path) -> Path:
    """A directory with tiny uncompressed MNIST IDX files (60 train, 20 test images)."""
    return make_tiny_mnist(tmp_path / "mnist")


@pytest.fixture
def idx_writer() -> Callable[..., Path]:
    """The :func:`write_idx` helper, for tests that build their own (malformed) IDX files."""
    return write_idx


@pytest.fixture
def mnist_factory(tmp_path: Path) -> Callable[..., Path]:
    """``mnist_factory(name="mnist", **kw)`` writes tiny MNIST files under tmp_path/name."""

    def make(name: str = "mnist", **kw: object) -> Path:
        return make_tiny_mnist(tmp_path / name, **kw)  # type: ignore[arg-type]

    return make
