"""MNIST from the four standard IDX files in a directory the user names (nothing downloaded).

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte`` (each optionally gzipped, ``.gz``). The directory comes from the
``data_dir`` option (CLI ``--data-dir``) or the ``SELFREF_DATA`` environment variable.
Preprocessing: pixels / 255, flattened to 784, standardized with the train mean and std of
all pixels; the last ``val_size`` training images (default 10,000) form the val split.

``mnist-mlp`` is the L2L network of Andrychowicz et al. 2016, section 3.2: 784→20→10 sigmoid,
batch 128.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from selfref.tasks.base import resolve_device
from selfref.tasks.digits import MLPTask

__all__ = ["read_idx", "load_mnist", "MnistMLP", "IDXError", "MNIST_FILES"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class IDXError(ValueError):
    """A missing or malformed IDX file (the message names the file)."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array, validating its header.

    Raises:
        IDXError: the file is missing, has a bad magic number, an unknown type code, or a
            size that does not match its header.
    """
    path = Path(path)
    if not path.is_file():
        raise IDXError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise IDXError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise IDXError(f"malformed IDX file {path}: only {len(raw)} bytes, no header")
    zero, code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or code not in _DTYPES or ndim < 1:
        raise IDXError(
            f"malformed IDX file {path}: bad magic number {raw[:4].hex()} "
            "(want 0000 + type code 08/09/0B/0C/0D/0E + ndim)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"malformed IDX file {path}: header truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IDXError(
            f"malformed IDX file {path}: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (data_dir / name).is_file():
            return data_dir / name
    raise IDXError(f"MNIST file missing: {data_dir / stem} (also looked for {stem}.gz)")


def load_mnist(
    data_dir: str | Path | None = None, val_size: int = 10000
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load and preprocess MNIST from IDX files: {split: (x (n, 784) float64, y (n,) int64)}."""
    if data_dir is None:
        data_dir = os.environ.get("SELFREF_DATA")
    if not data_dir:
        raise IDXError("no MNIST directory: pass --data-dir DIR or set SELFREF_DATA")
    d = Path(data_dir)
    if not d.is_dir():
        raise IDXError(f"MNIST directory not found: {d}")
    paths = {k: _find(d, v) for k, v in MNIST_FILES.items()}
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        xp, yp = paths[f"{split}_images"], paths[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1:
            raise IDXError(
                f"malformed MNIST {split} files {xp} and {yp}: images must be 3-d and labels "
                f"1-d, got {xi.shape} and {yi.shape}"
            )
        if xi.shape[0] != yi.shape[0]:
            raise IDXError(
                f"MNIST {split} files disagree: {xp} has {xi.shape[0]} images, "
                f"{yp} has {yi.shape[0]} labels"
            )
    x_tr = arrays["train_images"].reshape(len(arrays["train_images"]), -1) / 255.0
    y_tr = arrays["train_labels"].astype(np.int64)
    x_te = arrays["test_images"].reshape(len(arrays["test_images"]), -1) / 255.0
    y_te = arrays["test_labels"].astype(np.int64)
    if not 0 < val_size < len(y_tr):
        raise ValueError(f"val_size must be in (0, {len(y_tr)}), got {val_size}")
    x_va, y_va = x_tr[-val_size:], y_tr[-val_size:]
    x_tr, y_tr = x_tr[:-val_size], y_tr[:-val_size]
    mean, std = x_tr.mean(), x_tr.std() or 1.0
    return {
        "train": ((x_tr - mean) / std, y_tr),
        "val": ((x_va - mean) / std, y_va),
        "test": ((x_te - mean) / std, y_te),
    }


class MnistMLP(MLPTask):
    """mnist-mlp: 784→20→10 sigmoid MLP on MNIST IDX files (L2L section 3.2), batch 128."""

    name: ClassVar[str] = "mnist-mlp"
    description: ClassVar[str] = "MLP 784-20-10 (sigmoid) on MNIST read from IDX files (--data-dir)"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        hidden: Sequence[int] | int = (20,),
        depth: int | None = None,
        activation: str = "sigmoid",
        batch_size: int = 128,
        val_size: int = 10000,
        init_scale: float = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if depth is not None:
            hidden = (hidden[0] if hidden else 20,) * depth
        dev = resolve_device(device)
        arrays = load_mnist(data_dir, val_size)
        data = {
            s: (torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.int64))
            for s, (x, y) in arrays.items()
        }
        super().__init__(data, 10, hidden, activation, batch_size, init_scale, dev, dtype)
