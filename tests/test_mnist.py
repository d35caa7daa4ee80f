"""MNIST from IDX files the test writes itself: loading, preprocessing, training, bad files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from selfref.tasks.mnist import IDXError, MnistMLP, load_mnist, read_idx
from selfref.train import train


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, idx_writer, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = idx_writer(tmp_path / "x-idx3-ubyte", a, gz=gz)
    assert path.name.endswith(".gz") == gz
    assert np.array_equal(read_idx(path), a)
    b = np.array([-5, 7, 1 << 20], dtype=">i4")
    assert np.array_equal(read_idx(idx_writer(tmp_path / "y", b, gz=gz)), b)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_mlp_loads_and_trains(mnist_factory, gz):
    d = mnist_factory("plain" if not gz else "gz", gz=gz)
    task = MnistMLP(data_dir=d, val_size=10, batch_size=8)
    assert {s: task.num_examples(s) for s in ("train", "val", "test")} == {
        "train": 50,
        "val": 10,
        "test": 20,
    }
    assert task.sizes == (784, 20, 10)
    x_tr = task.data["train"][0]
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std(unbiased=False)) - 1) < 1e-4
    out = train(task, "adam", {"lr": 0.01}, steps=3, seed=0)
    assert out.status == "ok" and len(out.losses) == 3
    assert set(task.evaluate(out.params, "test")) == {"loss", "accuracy"}


def test_gz_and_plain_files_give_identical_data(mnist_factory):
    a = MnistMLP(data_dir=mnist_factory("a", gz=False), val_size=10)
    b = MnistMLP(data_dir=mnist_factory("b", gz=True), val_size=10)
    for s in ("train", "val", "test"):
        assert torch.equal(a.data[s][0], b.data[s][0]) and torch.equal(a.data[s][1], b.data[s][1])


def test_val_is_the_tail_of_the_training_file(mnist_factory):
    d = mnist_factory()
    labels = read_idx(d / "train-labels-idx1-ubyte").astype(np.int64)
    arrays = load_mnist(d, val_size=10)
    assert np.array_equal(arrays["val"][1], labels[-10:])
    assert np.array_equal(arrays["train"][1], labels[:-10])


def test_data_dir_from_environment(mnist_factory, monkeypatch):
    monkeypatch.setenv("SELFREF_DATA", str(mnist_factory()))
    assert MnistMLP(val_size=10).num_examples("test") == 20


def test_no_directory_given(monkeypatch):
    monkeypatch.delenv("SELFREF_DATA", raising=False)
    with pytest.raises(IDXError, match="--data-dir"):
        MnistMLP()


def test_directory_missing(tmp_path):
    with pytest.raises(IDXError, match="MNIST directory not found: .*nowhere"):
        MnistMLP(data_dir=tmp_path / "nowhere")


def test_missing_file_is_named(mnist_factory):
    d = mnist_factory()
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(IDXError, match="t10k-labels-idx1-ubyte"):
        MnistMLP(data_dir=d, val_size=10)


def test_bad_magic_is_named(mnist_factory, idx_writer):
    d = mnist_factory()
    labels = read_idx(d / "train-labels-idx1-ubyte").copy()
    idx_writer(d / "train-labels-idx1-ubyte", labels, magic=b"\x08\x03\x08\x01")
    with pytest.raises(IDXError, match="train-labels-idx1-ubyte: bad magic number 08030801"):
        MnistMLP(data_dir=d, val_size=10)


def test_truncated_data_is_named(mnist_factory):
    d = mnist_factory()
    path = d / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(IDXError, match="train-images-idx3-ubyte.*file has"):
        MnistMLP(data_dir=d, val_size=10)


def test_truncated_gzip_header_is_named(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03\x00\x00")  # header cut inside the dimensions
    with pytest.raises(IDXError, match="t10k-images-idx3-ubyte.gz: header truncated"):
        read_idx(path)


def test_count_mismatch_names_the_files(mnist_factory, idx_writer):
    d = mnist_factory()
    labels = read_idx(d / "t10k-labels-idx1-ubyte")
    idx_writer(d / "t10k-labels-idx1-ubyte", labels[:-1].copy())
    with pytest.raises(
        IDXError, match="t10k-images-idx3-ubyte has 20 images.*t10k-labels-idx1-ubyte has 19"
    ):
        MnistMLP(data_dir=d, val_size=10)


def test_idx_error_is_a_value_error():
    assert issubclass(IDXError, ValueError)  # so the CLI prints it as one line with exit 2
