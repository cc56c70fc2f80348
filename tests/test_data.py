"""Dataset loaders: shapes against the datasets' published sizes, search order, errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from factorize import data
from factorize.data import datasets as dsmod

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env var, no system dir, an empty cache: only what the test provides is found."""
    monkeypatch.delenv(dsmod.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dsmod, "_SYSTEM_DIRS", {})

    def no_network(*a, **k):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(dsmod, "urlopen", no_network)
    return tmp_path


def test_digits_split_matches_sklearn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    d = data.load("digits")
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert d.x_train.min() >= 0 and d.x_train.max() == 1.0
    # The split is a partition of sklearn's 1797 images (pixel sums as a fingerprint).
    got = np.sort(np.concatenate([d.x_train, d.x_test]).reshape(1797, -1).sum(1) * 16)
    np.testing.assert_allclose(got, np.sort(ref.images.reshape(1797, -1).sum(1)), atol=1e-3)
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([d.y_train, d.y_test])), np.bincount(ref.target)
    )
    assert set(np.unique(d.y_test)) == set(range(10))  # stratified
    d2 = data.load("digits")
    np.testing.assert_array_equal(d.y_test, d2.y_test)  # fixed split
    assert d.subset(10, 5).x_train.shape == (10, 8, 8, 1)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="digits, fashion_mnist, cifar10"):
        data.load("mnist")
    assert data.DATASETS == ("digits", "fashion_mnist", "cifar10")


@needs_fmnist
def test_fashion_mnist_real_files():
    d = data.load("fashion_mnist", download=False)
    # Published: 60,000 train / 10,000 test 28×28 images, 10 balanced classes.
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
    assert (np.bincount(d.y_train) == 6000).all() and (np.bincount(d.y_test) == 1000).all()
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1


def _idx(arr: np.ndarray, dims=None) -> bytes:
    dims = arr.shape if dims is None else dims
    head = bytes([0, 0, 8, len(dims)]) + b"".join(int(n).to_bytes(4, "big") for n in dims)
    return head + arr.astype(np.uint8).tobytes()


def _write_gz(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def test_fashion_mnist_missing_says_where_and_how(isolated):
    with pytest.raises(data.DatasetError) as e:
        data.load("fashion_mnist", data_dir=isolated / "nowhere", download=False)
    msg = str(e.value)
    assert str(isolated / "nowhere") in msg and str(isolated / "cache") in msg
    assert "dataset-fashion-mnist" in msg and "data_dir" in msg


def test_fashion_mnist_truncated_file(isolated):
    d = isolated / "fm"
    d.mkdir()
    # Header promises 60000 images, the file holds 3: the error names the file and both sizes.
    _write_gz(d / "train-images-idx3-ubyte.gz", _idx(np.zeros((3, 28, 28)), dims=(60000, 28, 28)))
    _write_gz(d / "train-labels-idx1-ubyte.gz", _idx(np.zeros(60000)))
    _write_gz(d / "t10k-images-idx3-ubyte.gz", _idx(np.zeros((10000, 28, 28))))
    _write_gz(d / "t10k-labels-idx1-ubyte.gz", _idx(np.zeros(10000)))
    with pytest.raises(data.DatasetError) as e:
        data.load("fashion_mnist", data_dir=d, download=False)
    msg = str(e.value)
    want = 16 + 60000 * 28 * 28
    got = 16 + 3 * 28 * 28
    assert "train-images-idx3-ubyte.gz" in msg and str(want) in msg and str(got) in msg


@needs_fmnist
def test_fashion_mnist_checksum_mismatch(isolated):
    d = isolated / "fm"
    d.mkdir()
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.symlink(FMNIST_DIR / f"{stem}.gz", d / f"{stem}.gz")
    # Right size and header, wrong content (uncompressed variant of the name is accepted too).
    (d / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(60000)))
    with pytest.raises(data.DatasetError, match="train-labels-idx1-ubyte: checksum mismatch"):
        data.load("fashion_mnist", data_dir=d, download=False)
    ds = data.load("fashion_mnist", data_dir=d, download=False, verify=False)
    assert (ds.y_train == 0).all() and ds.x_train.shape == (60000, 28, 28, 1)


def test_fashion_mnist_download_verified(isolated, monkeypatch):
    # Small stand-in files served by a fake urlopen: the download path without a network.
    rng = np.random.default_rng(0)
    files, table = {}, {}
    for stem, shape in (
        ("train-images-idx3-ubyte", (6, 28, 28)),
        ("train-labels-idx1-ubyte", (6,)),
        ("t10k-images-idx3-ubyte", (4, 28, 28)),
        ("t10k-labels-idx1-ubyte", (4,)),
    ):
        arr = rng.integers(0, 10 if len(shape) == 1 else 256, shape)
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb") as g:
            g.write(_idx(arr))
        files[f"{stem}.gz"] = buf.getvalue()
        table[stem] = (hashlib.md5(buf.getvalue()).hexdigest(), "0" * 64, shape)
    monkeypatch.setattr(dsmod, "_FMNIST_FILES", table)
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(dsmod, "urlopen", fake_urlopen)
    ds = data.load("fashion_mnist")
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.y_test.shape == (4,)
    assert len(urls) == 4 and all(u.startswith("http") for u in urls)
    cached = isolated / "cache" / "factorize" / "fashion-mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(files)  # no .part leftovers

    # A corrupted download fails its md5 and leaves nothing in the cache.
    for p in cached.iterdir():
        p.unlink()
    monkeypatch.setattr(dsmod, "urlopen", lambda url, timeout=None: io.BytesIO(b"garbage"))
    with pytest.raises(data.DatasetError, match="checksum mismatch.*expected md5"):
        data.load("fashion_mnist")
    assert list(cached.iterdir()) == []


def _cifar_batch(path: Path, n: int, seed: int, labels=None, data_=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data_ is None else data_
    lab = list(rng.integers(0, 10, n)) if labels is None else labels
    with open(path, "wb") as f:
        pickle.dump({b"data": arr, b"labels": lab, b"batch_label": b"fake"}, f)
    return arr


def _fake_cifar(root: Path, n: int = 8) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: _cifar_batch(d / name, n, i) for i, name in enumerate(names)}


def test_cifar10_fake_batches_layout(isolated):
    raw = _fake_cifar(isolated / "c")
    ds = data.load("cifar10", data_dir=isolated / "c", download=False, verify=False)
    assert ds.x_train.shape == (40, 32, 32, 3) and ds.x_test.shape == (8, 32, 32, 3)
    # The pickle row is 1024 red, then 1024 green, then 1024 blue values, row-major 32×32.
    row = raw["data_batch_2"][3]
    for y, x, c in ((0, 0, 0), (5, 17, 1), (31, 2, 2)):
        assert ds.x_train[8 + 3, y, x, c] == pytest.approx(row[c * 1024 + y * 32 + x] / 255)
    # Official checksums are on by default: the fakes are refused before unpickling.
    with pytest.raises(data.DatasetError, match="data_batch_1: checksum mismatch"):
        data.load("cifar10", data_dir=isolated / "c", download=False)


def test_cifar10_wrong_size_and_truncated(isolated):
    _fake_cifar(isolated / "c")
    d = isolated / "c" / "cifar-10-batches-py"
    _cifar_batch(d / "data_batch_3", 8, 0, data_=np.zeros((8, 3000), np.uint8))
    with pytest.raises(data.DatasetError) as e:
        data.load("cifar10", data_dir=isolated / "c", download=False, verify=False)
    assert "data_batch_3" in str(e.value) and "(N, 3072)" in str(e.value)
    assert "(8, 3000)" in str(e.value)

    _cifar_batch(d / "data_batch_3", 8, 0)
    blob = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DatasetError, match="test_batch: not a readable CIFAR-10 batch"):
        data.load("cifar10", data_dir=isolated / "c", download=False, verify=False)


def test_cifar10_missing_and_env_var(isolated, monkeypatch):
    with pytest.raises(data.DatasetError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", download=False)
    _fake_cifar(isolated / "env")
    monkeypatch.setenv("FACTORIZE_DATA_DIR", str(isolated / "env"))
    ds = data.load("cifar10", download=False, verify=False)
    assert ds.source.startswith(str(isolated / "env"))
