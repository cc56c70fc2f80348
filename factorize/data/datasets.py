"""Dataset loaders (see the package docstring for the search order and conventions)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.request import urlopen  # module-level name so tests can monkeypatch it

import numpy as np

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "cifar10")
ENV_VAR = "FACTORIZE_DATA_DIR"


class DatasetError(RuntimeError):
    """Missing, corrupt or wrongly sized data, with the path and how to fix it in the message."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A fixed train/test split. Images NHWC float32 in [0, 1], labels int32."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[-1])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (the splits are already shuffled)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/factorize`` (default ``~/.cache/factorize``): where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "factorize"


_SYSTEM_DIRS = {
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "cifar10": [Path("/usr/share/datasets/cifar10")],
}


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Base directories searched for dataset ``name``, in order."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs += _SYSTEM_DIRS.get(name, [])
    dirs.append(cache_dir())
    return dirs


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) with its fixed train/test split.

    ``verify=False`` skips the checksum of the official release (for your own files in the
    same format); the structural checks (header, sizes, dtypes) always run.
    """
    loaders: dict[str, Callable[..., Dataset]] = {
        "digits": _load_digits,
        "fashion_mnist": _load_fashion_mnist,
        "cifar10": _load_cifar10,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return loaders[name](data_dir=data_dir, download=download, verify=verify)


# ----------------------------------------------------------------------------------- digits


def _load_digits(**_: object) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    y = d.target.astype(np.int32)
    # Fixed, stratified 1437/360 split (80/20); random_state pins it across machines.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, random_state=0, stratify=y)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10, source="sklearn.datasets.load_digits")


# ------------------------------------------------------------------------- files & checksums


def _digest(path: Path, algo: str, *, gunzip: bool = False) -> str:
    h = hashlib.new(algo)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(urls: Sequence[str], dest: Path, md5: str) -> Path:
    """Download the first reachable URL to ``dest`` atomically, verifying its md5."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
            got = _digest(Path(tmp), "md5")
            if got != md5:
                raise DatasetError(
                    f"checksum mismatch for {url}: expected md5 {md5}, got {got} "
                    "(corrupt or changed download; try again or fetch the file by hand)"
                )
            os.replace(tmp, dest)  # atomic: a partial download never looks complete
            return dest
        except DatasetError:
            raise
        except OSError as e:  # URLError is an OSError
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DatasetError(f"could not download {dest.name}: " + "; ".join(errors))


def _missing(name: str, looked: list[Path], files: Sequence[str], how: str) -> DatasetError:
    where = "\n  ".join(str(p) for p in looked)
    return DatasetError(
        f"{name}: files not found ({', '.join(files)}). Looked in:\n  {where}\n{how}"
    )


# ---------------------------------------------------------------------------- fashion-mnist

_FMNIST_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# file -> (md5 of the official .gz, sha256 of the decompressed IDX, expected shape).
# Debian's package recompresses the files, so its .gz md5 differs but the IDX content is equal.
_FMNIST_FILES = {
    "train-images-idx3-ubyte": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        (60000, 28, 28),
    ),
    "train-labels-idx1-ubyte": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        (60000,),
    ),
    "t10k-images-idx3-ubyte": (
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        (10000, 28, 28),
    ),
    "t10k-labels-idx1-ubyte": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        (10000,),
    ),
}


def _find_idx(d: Path, stem: str) -> Path | None:
    for cand in (d / f"{stem}.gz", d / stem):
        if cand.is_file():
            return cand
    return None


def _read_idx(path: Path, expected_shape: tuple[int, ...], verify: bool, digests) -> np.ndarray:
    gz = path.suffix == ".gz"
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip header, truncated stream
        raise DatasetError(f"{path}: cannot read ({e}); delete it and load again") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims != expected_shape:
        raise DatasetError(f"{path}: expected shape {expected_shape}, header says {dims}")
    want = header + int(np.prod(dims))
    if len(raw) != want:
        raise DatasetError(
            f"{path}: wrong size: expected {want} bytes of IDX data, got {len(raw)} "
            "(truncated or corrupt; delete it and load again)"
        )
    if verify:
        md5, sha256, _ = digests
        ok = hashlib.sha256(raw).hexdigest() == sha256 or (gz and _digest(path, "md5") == md5)
        if not ok:
            raise DatasetError(
                f"{path}: checksum mismatch: expected sha256 {sha256} of the IDX content "
                f"(or md5 {md5} of the official .gz), got sha256 {hashlib.sha256(raw).hexdigest()}"
            )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(*, data_dir, download: bool, verify: bool) -> Dataset:
    looked: list[Path] = []
    found: dict[str, Path] | None = None
    for base in search_dirs("fashion_mnist", data_dir):
        for d in dict.fromkeys((base, base / "fashion-mnist", base / "fashion_mnist")):
            looked.append(d)
            hits = {stem: _find_idx(d, stem) for stem in _FMNIST_FILES}
            if all(hits.values()):
                found = hits  # type: ignore[assignment]
                break
        if found:
            break
    if found is None:
        how = (
            "Get them with `apt install dataset-fashion-mnist` (Debian/Ubuntu), or download the "
            "four .gz files from https://github.com/zalandoresearch/fashion-mnist into a "
            f"directory and pass it as data_dir / --data-dir / ${ENV_VAR}."
        )
        if not download:
            raise _missing("fashion_mnist", looked, [f"{s}.gz" for s in _FMNIST_FILES], how)
        dest = cache_dir() / "fashion-mnist"
        found = {}
        for stem, (md5, _, _) in _FMNIST_FILES.items():
            fname = f"{stem}.gz"
            found[stem] = _download([u + fname for u in _FMNIST_URLS], dest / fname, md5)
    arrays = {
        s: _read_idx(p, _FMNIST_FILES[s][2], verify, _FMNIST_FILES[s]) for s, p in found.items()
    }

    def images(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / 255.0)[..., None]

    return Dataset(
        "fashion_mnist",
        images(arrays["train-images-idx3-ubyte"]),
        arrays["train-labels-idx1-ubyte"].astype(np.int32),
        images(arrays["t10k-images-idx3-ubyte"]),
        arrays["t10k-labels-idx1-ubyte"].astype(np.int32),
        10,
        source=str(found["train-images-idx3-ubyte"].parent),
    )


# ---------------------------------------------------------------------------------- cifar10

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_TGZ = "cifar-10-python.tar.gz"
_CIFAR_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_DIR = "cifar-10-batches-py"
# Official batch md5s (the same values torchvision checks).
_CIFAR_TRAIN = (
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
)
_CIFAR_TEST = (("test_batch", "40351d587109b95175f43aff81a1287e"),)


def _read_cifar_batch(path: Path, md5: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    if verify:
        # Checked before unpickling: pickle runs code, so only the official bytes are trusted.
        got = _digest(path, "md5")
        if got != md5:
            raise DatasetError(
                f"{path}: checksum mismatch: expected md5 {md5}, got {got} (corrupt or not the "
                "official CIFAR-10 batch; delete it, or pass verify=False for your own files)"
            )
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except Exception as e:  # truncated pickle, wrong keys, not a pickle at all
        raise DatasetError(
            f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})"
        ) from e
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{path}: wrong size: expected data of shape (N, 3072) uint8, "
            f"got {data.shape} {data.dtype}"
        )
    if labels.shape != (data.shape[0],):
        raise DatasetError(
            f"{path}: expected {data.shape[0]} labels (one per image), got shape {labels.shape}"
        )
    # Stored as N × (3 planes of 32×32), i.e. NCHW; convert to NHWC.
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, labels.astype(np.int32)


def _extract_cifar(tgz: Path, verify: bool) -> Path:
    if verify:
        got = _digest(tgz, "md5")
        if got != _CIFAR_TGZ_MD5:
            raise DatasetError(
                f"{tgz}: checksum mismatch: expected md5 {_CIFAR_TGZ_MD5}, got {got}"
            )
    # Extract into the cache, never next to the user's archive.
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".cifar-extract-"))
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            tf.extractall(tmp, filter="data")
        if (dest / _CIFAR_DIR).exists():
            shutil.rmtree(dest / _CIFAR_DIR)
        os.replace(tmp / _CIFAR_DIR, dest / _CIFAR_DIR)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DatasetError(f"{tgz}: cannot extract ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / _CIFAR_DIR


def _load_cifar10(*, data_dir, download: bool, verify: bool) -> Dataset:
    names = [n for n, _ in _CIFAR_TRAIN + _CIFAR_TEST]
    looked: list[Path] = []
    found: Path | None = None
    for base in search_dirs("cifar10", data_dir):
        for d in (base / _CIFAR_DIR, base):
            looked.append(d)
            if all((d / n).is_file() for n in names):
                found = d
                break
        if found is None and (base / _CIFAR_TGZ).is_file():
            found = _extract_cifar(base / _CIFAR_TGZ, verify)
        if found:
            break
    if found is None:
        how = (
            f"Download {_CIFAR_URL}, unpack it (it contains {_CIFAR_DIR}/) and pass the directory "
            f"as data_dir / --data-dir / ${ENV_VAR}."
        )
        if not download:
            raise _missing("cifar10", looked, names, how)
        tgz = _download([_CIFAR_URL], cache_dir() / _CIFAR_TGZ, _CIFAR_TGZ_MD5)
        found = _extract_cifar(tgz, verify=False)  # the archive was just verified

    train = [_read_cifar_batch(found / n, m, verify) for n, m in _CIFAR_TRAIN]
    x_te, y_te = _read_cifar_batch(found / _CIFAR_TEST[0][0], _CIFAR_TEST[0][1], verify)
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    for y, n in ((y_tr, "train"), (y_te, "test")):
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DatasetError(f"{found}: {n} labels outside 0..9")

    def f32(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) / 255.0

    return Dataset("cifar10", f32(x_tr), y_tr, f32(x_te), y_te, 10, source=str(found))
