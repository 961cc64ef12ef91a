"""The data sets of the SADP experiments, kept whole on the device as uint8.

    ds = load_dataset("cifar10", "data")          # downloads 170 MB once, MD5-checked
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
    norm = Normalizer("cifar10", device)
    gen = torch.Generator(device=device).manual_seed(0)
    for xb, yb, idx in batches(x_train, y_train, order, 128):   # order: e.g. list(sampler)
        logits = model(norm(augment(xb, generator=gen)))

Data sets: "cifar10" and "cifar100" (the python versions from the official site) and
"synthetic" (generated, needs nothing; see `make_synthetic`). Images are uint8 [N, 3, 32, 32],
labels int64 [N]. Augmentation (`augment`: zero-padded random crop + horizontal flip) works on
whole batches with tensor ops on whichever device the batch is on; `Normalizer` then turns the
uint8 batch into normalised float32.

Safety of the CIFAR files. The official files are Python pickles, and unpickling runs code, so
no file is unpickled unless its bytes match the official MD5 (`SOURCES`): the archive is
checked before anything is extracted, and every batch file is checked again, from the very
bytes that are then unpickled, before it is loaded, also when the folder was placed by hand.
Downloads stream into a temporary file that gets the archive's name only once its MD5 matches;
extraction goes to a temporary folder that is renamed into place when complete, so an
interrupted run leaves nothing half-written. After the first load the decoded arrays are cached
as `<data_dir>/<folder>.uint8.npz` (plain arrays, read with allow_pickle=False, each with a
SHA-256 stored beside it); a damaged cache is ignored and rebuilt from the verified files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS", "SOURCES", "STATS", "DataError", "ChecksumError", "Dataset", "Source",
    "load_dataset", "load_cifar", "make_synthetic", "download_file", "extract_archive",
    "augment", "augment_params", "crop_flip", "Normalizer", "make_normalizer", "load_mnist1d", "normalize", "batches",
]

DATASETS = ("cifar10", "cifar100", "synthetic", "mnist1d")


class DataError(RuntimeError):
    """A data set cannot be had: offline, missing or damaged files. The message says what to do."""


class ChecksumError(DataError):
    """A file's MD5 differs from the expected one; the file was not used."""


class Dataset(NamedTuple):
    """A whole data set in memory: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    def to(self, device) -> "Dataset":
        """The same data set on `device`."""
        return Dataset(self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.num_classes)


@dataclass(frozen=True)
class Source:
    """Where a CIFAR data set comes from and what its files must hash to (MD5 hex digests)."""
    name: str
    url: str
    archive: str                             # file name of the archive inside data_dir
    archive_md5: str
    folder: str                              # the archive's top-level folder
    train_files: tuple[tuple[str, str], ...]  # (file name in folder, MD5), in order
    test_files: tuple[tuple[str, str], ...]
    label_key: str                           # "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)
    num_classes: int

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        return self.train_files + self.test_files


# The official archives and the MD5 of every file this module unpickles, as published with the
# data sets and as listed by torchvision.datasets.CIFAR10 / CIFAR100. Tests swap in their own
# `Source` (or pass one to `load_cifar`) to use files they write themselves.
SOURCES: dict[str, Source] = {
    "cifar10": Source(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                     ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                     ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                     ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                     ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        label_key="labels",
        num_classes=10,
    ),
    "cifar100": Source(
        name="cifar100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        label_key="fine_labels",
        num_classes=100,
    ),
}

# Per-channel (mean, std) of the training images scaled to [0, 1]. CIFAR: the usual values
# over all training pixels. Synthetic: measured on make_synthetic()'s default output (the
# generator's statistics barely depend on the seed or the size).
STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.502, 0.502, 0.502), (0.269, 0.269, 0.269)),
}

_CACHE_VERSION = 1
_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir: str | os.PathLike = "data", *, download: bool = True,
                 seed: int = 0, num_train: int | None = None, num_test: int | None = None) -> Dataset:
    """Load a data set by name as CPU tensors (move them with `Dataset.to(device)`).

    name: "cifar10", "cifar100" or "synthetic".
    data_dir: where the CIFAR archive, its extracted folder and the array cache live.
    download: fetch a missing CIFAR archive from the official site (else raise DataError).
    seed, num_train, num_test: for "synthetic" (see `make_synthetic`; defaults 10000 / 2000).
        CIFAR ignores `seed` and rejects sizes.
    """
    if name == "synthetic":
        sizes = {k: v for k, v in (("num_train", num_train), ("num_test", num_test)) if v is not None}
        return make_synthetic(seed=seed, **sizes)
    if name == "mnist1d":
        if num_train is not None or num_test is not None:
            raise ValueError("num_train / num_test are for the synthetic data set only; mnist1d "
                             "has the published 4000 / 1000 split")
        return load_mnist1d()
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if num_train is not None or num_test is not None:
        raise ValueError(f"num_train / num_test are for the synthetic data set only; {name} has "
                         f"fixed splits")
    return load_cifar(SOURCES[name], data_dir, download=download)


def load_cifar(source: Source, data_dir: str | os.PathLike, *, download: bool = True,
               cache: bool = True, timeout: float = _TIMEOUT_S) -> Dataset:
    """Load a CIFAR data set, downloading, verifying and extracting it on first use.

    Order: a valid array cache; else the extracted folder `<data_dir>/<source.folder>` (each
    file MD5-checked before unpickling); else the archive `<data_dir>/<source.archive>` (placed
    by hand or downloaded when `download`), MD5-checked, then extracted.
    """
    data_dir = Path(data_dir)
    cache_path = data_dir / f"{source.folder}.uint8.npz"
    if cache and cache_path.is_file():
        try:
            return _read_cache(cache_path, source)
        except Exception as e:  # any damage at all: fall back to the verified files
            warnings.warn(f"ignoring the array cache {cache_path} ({e}); rebuilding it from the "
                          f"MD5-checked files", RuntimeWarning, stacklevel=2)
            _unlink(cache_path)

    folder = data_dir / source.folder
    if not folder.is_dir():
        archive = data_dir / source.archive
        if archive.is_file():
            actual = _md5_file(archive)
            if actual != source.archive_md5:
                raise ChecksumError(
                    f"{archive}: MD5 {actual} differs from the official {source.archive_md5}, so it "
                    f"was not extracted (a partial or altered download?). Delete it and run again "
                    f"to download it afresh, or replace it by hand with the official archive from "
                    f"{source.url}.")
        elif not download:
            raise DataError(f"{source.name} is not in {data_dir} and download=False.\n"
                            + _manual_help(source, data_dir))
        else:
            try:
                download_file(source.url, archive, source.archive_md5, timeout=timeout)
            except DataError as e:
                raise type(e)(f"{e}\n{_manual_help(source, data_dir)}") from e
        extract_archive(archive, data_dir, source.folder)

    dataset = _read_folder(folder, source, data_dir)
    if cache:
        _write_cache(cache_path, dataset, source)
    return dataset


def _manual_help(source: Source, data_dir: Path) -> str:
    names = ", ".join(n for n, _ in source.files)
    return (f"To set up {source.name} by hand: on a machine with internet access download\n"
            f"    {source.url}\n"
            f"and copy it, unchanged, to\n"
            f"    {data_dir / source.archive}    (MD5 {source.archive_md5})\n"
            f"or extract it so that {data_dir / source.folder}/ holds {names}.\n"
            f"Then run again: the files are verified and used without a download. The synthetic "
            f"data set needs no files at all.")


def _read_folder(folder: Path, source: Source, data_dir: Path) -> Dataset:
    xs, ys = {}, {}
    for split, files in (("train", source.train_files), ("test", source.test_files)):
        parts = [_read_batch(folder / name, md5, source, data_dir) for name, md5 in files]
        xs[split] = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        ys[split] = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return Dataset(xs["train"], ys["train"], xs["test"], ys["test"], source.num_classes)


def _read_batch(path: Path, md5: str, source: Source, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: MD5-check its bytes, then unpickle those same bytes and decode them."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing: {path.parent} is incomplete. Delete that folder and run again "
            f"to extract it afresh from {data_dir / source.archive} (downloaded if absent).\n"
            + _manual_help(source, data_dir)) from None
    actual = hashlib.md5(raw).hexdigest()
    if actual != md5:
        raise ChecksumError(
            f"{path}: MD5 {actual} differs from the official {md5}; the file was not loaded "
            f"(a damaged, partial or altered copy). Delete the folder {path.parent} and run again "
            f"to extract it afresh from {data_dir / source.archive} (downloaded if absent), or "
            f"place the official archive by hand at {data_dir / source.archive} (MD5 "
            f"{source.archive_md5}, from {source.url}).")
    entry = _unpickle(raw)
    try:
        x = np.asarray(_field(entry, "data"), dtype=np.uint8)
        y = np.asarray(_field(entry, source.label_key), dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} passed its checksum but is not a CIFAR batch ({e})") from e
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],):
        raise DataError(f"{path}: expected data [n, 3072] and n labels; got {x.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= source.num_classes):
        raise DataError(f"{path}: labels outside [0, {source.num_classes})")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32)), y


def _unpickle(raw: bytes):
    """The only unpickling in this module; called on MD5-verified bytes only."""
    # latin1 decodes the Python 2 strings of the official files (keys become str).
    return pickle.loads(raw, encoding="latin1")


def _field(entry, key: str):
    if not isinstance(entry, dict):
        raise TypeError(f"expected a dict, got {type(entry).__name__}")
    if key in entry:
        return entry[key]
    return entry[key.encode()]


# ---------------------------------------------------------------------------------------------
# Download and extraction
# ---------------------------------------------------------------------------------------------

_NETWORK_ERRORS = (urllib.error.URLError, OSError, HTTPException, ValueError)


def download_file(url: str, dest: str | os.PathLike, md5: str, *, timeout: float = _TIMEOUT_S,
                  chunk_size: int = 1 << 20, quiet: bool = False) -> Path:
    """Download `url` to `dest`, which appears only once the MD5 matches.

    The bytes stream into a temporary file next to `dest` (so the final rename is atomic) and
    are hashed on the way; on any failure or interruption the temporary file is removed.
    Raises DataError when the download fails, ChecksumError when the MD5 differs.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except _NETWORK_ERRORS as e:
                raise DataError(f"could not download {url}: {_reason(e)}. This machine seems to be "
                                f"offline, or the server cannot be reached.") from e
            with response:
                total = int(response.headers.get("Content-Length") or 0)
                if not quiet:
                    size = f" ({total / 2**20:.0f} MB)" if total else ""
                    print(f"downloading {url}{size} to {dest}", file=sys.stderr, flush=True)
                done, shown = 0, 0
                while True:
                    try:
                        chunk = response.read(chunk_size)
                    except _NETWORK_ERRORS as e:
                        raise DataError(f"the download of {url} broke off after {done} bytes: "
                                        f"{_reason(e)}. Run again to retry.") from e
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    if not quiet and total and done * 10 // total > shown:
                        shown = done * 10 // total
                        print(f"  {shown * 10}%", file=sys.stderr, flush=True)
        actual = digest.hexdigest()
        if actual != md5:
            raise ChecksumError(
                f"the file downloaded from {url} has MD5 {actual}, not the official {md5}; it was "
                f"discarded. Run again to retry (a proxy or captive portal may have altered it).")
        os.replace(tmp, dest)
    except BaseException:
        _unlink(tmp)
        raise
    return dest


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    return str(reason if reason is not None else e) or type(e).__name__


def extract_archive(archive: str | os.PathLike, data_dir: str | os.PathLike, folder: str) -> Path:
    """Extract the top-level `folder` of a .tar.gz into `data_dir`, atomically.

    Only plain files and folders are extracted; a member with an absolute path, a `..`
    component, or that is a link or device is refused (DataError) before anything lands in
    `data_dir`. Everything is written to a temporary folder that is renamed to
    `<data_dir>/<folder>` once complete, and removed on failure or interruption.
    """
    archive, data_dir = Path(archive), Path(data_dir)
    final = data_dir / folder
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{folder}.", suffix=".extract"))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    parts = _safe_parts(member.name, archive)
                    if not parts:
                        continue
                    target = tmp.joinpath(*parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                    else:
                        raise DataError(f"{archive}: member {member.name!r} is a link or special "
                                        f"file; refusing to extract this archive")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"could not extract {archive}: {e}. Delete it and run again.") from e
        extracted = tmp / folder
        if not extracted.is_dir():
            raise DataError(f"{archive} has no top-level folder {folder}/; is it the right archive?")
        try:
            os.rename(extracted, final)
        except OSError:
            if not final.is_dir():  # else another process extracted it first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _safe_parts(name: str, archive: Path) -> list[str]:
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"{archive}: member {name!r} points outside the archive's folder; "
                        f"refusing to extract")
    return parts


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Array cache: plain .npz (no pickle), each array's SHA-256 and the source's MD5 table stored
# ---------------------------------------------------------------------------------------------

_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def _cache_meta(source: Source, arrays: dict[str, np.ndarray]) -> dict:
    return {"version": _CACHE_VERSION, "source": source.name, "num_classes": source.num_classes,
            "files": [list(f) for f in source.files],
            "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha256(a)}
                       for k, a in arrays.items()}}


def _write_cache(path: Path, ds: Dataset, source: Source) -> None:
    arrays = {k: getattr(ds, k).numpy() for k in _ARRAYS}
    meta = json.dumps(_cache_meta(source, arrays)).encode()
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.frombuffer(meta, dtype=np.uint8), **arrays)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            _unlink(tmp)
        if not isinstance(e, OSError):
            raise
        # The cache is a convenience: a read-only or full disk is not an error.
        warnings.warn(f"could not write the array cache {path}: {e}", RuntimeWarning, stacklevel=3)


def _read_cache(path: Path, source: Source) -> Dataset:
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes().decode())
        if meta.get("version") != _CACHE_VERSION or meta.get("source") != source.name:
            raise ValueError("written by another version or for another data set")
        if meta.get("files") != [list(f) for f in source.files]:
            raise ValueError("made from files with other checksums")
        arrays = {k: npz[k] for k in _ARRAYS}
    if _cache_meta(source, arrays)["arrays"] != meta.get("arrays"):
        raise ValueError("contents do not match their recorded shapes and SHA-256")
    x_train, y_train, x_test, y_test = (torch.from_numpy(arrays[k]) for k in _ARRAYS)
    if (x_train.dtype != torch.uint8 or x_train.shape[1:] != (3, 32, 32) or y_train.dtype != torch.int64
            or len(y_train) != len(x_train) or len(y_test) != len(x_test)):
        raise ValueError("arrays of the wrong shape or type")
    return Dataset(x_train, y_train, x_test, y_test, source.num_classes)


# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------

# SHA-256 of x, y, x_test, y_test (float64 / int64 bytes, in that order) as mnist1d 0.0.2.post1
# generates them with its default arguments: the published MNIST-1D data set.
MNIST1D_SHA256 = "2377c0b18c9f643da2b39e66086395782aac2fcfdd678b89f55a22b17ec47631"


def load_mnist1d() -> Dataset:
    """MNIST-1D (Greydanus, 2020): 10 classes of 1-D signals of length 40, 4000 train / 1000 test.

    A small real benchmark that is far from saturated: the published reference accuracies are
    32% (logistic regression), 68% (MLP), 91% (GRU) and 94% (CNN). The `mnist1d` package
    generates it offline and deterministically with its default arguments; its `get_dataset`
    (which tries the network first) is not used. The arrays are hashed and compared with the
    published set's hash; a different package version that generates other data gets a
    warning, since its numbers would not be comparable. Signals come standardised (mean 0,
    sd 1 over the training set) and are returned as float32 [N, 1, 40] with int64 labels.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise DataError(f"--data mnist1d needs the optional package mnist1d ({e}): "
                        f"pip install mnist1d") from e
    d = make_dataset(get_dataset_args())
    digest = hashlib.sha256()
    for key in ("x", "y", "x_test", "y_test"):
        digest.update(np.ascontiguousarray(d[key]).tobytes())
    if digest.hexdigest() != MNIST1D_SHA256:
        warnings.warn(f"mnist1d generated a data set whose SHA-256 ({digest.hexdigest()[:12]}...) "
                      f"differs from the published one ({MNIST1D_SHA256[:12]}...); accuracies "
                      f"will not be comparable with published or this project's figures.")

    def signals(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).unsqueeze(1)   # [N, 1, 40]

    def labels(a):
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return Dataset(signals(d["x"]), labels(d["y"]), signals(d["x_test"]), labels(d["y_test"]), 10)


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------

def make_synthetic(num_train: int = 10000, num_test: int = 2000, num_classes: int = 10, *,
                   seed: int = 0, label_noise: float = 0.02) -> Dataset:
    """A learnable, CIFAR-shaped data set whose examples differ in difficulty; needs no files.

    Generative process (draws from torch generators seeded by `seed`: one stream for the class
    templates, one for the training and one for the test examples, so the test set does not
    depend on `num_train`):

    1. Class templates. Class k has a colour and a texture. The colour is a hue: a unit
       direction u_k in the plane of chroma (r + g + b = 0, so it carries no brightness), the
       hues of the classes evenly spaced around the circle in a random order. The texture t_k
       is a periodic random field (3 x 32 x 32) with spatial frequencies between 2 and 5
       cycles per image; half of its variance is a texture common to all classes, so textures
       alone tell classes apart only partly. Template T_k = 0.8 u_k + 0.6 t_k (unit RMS).
    2. Each image blends its class's template with another random class's:
       (1 - a) T_y + a T_other with a ~ U(0, 0.45), then mirrors the blend at random and shifts
       it circularly to a uniformly random position (the texture has no fixed place); it then
       scales it by a contrast A, adds a brightness 128 + U(-10, 10) (plus U(-3, 3) per
       channel) and i.i.d. Gaussian pixel noise of sd sigma, and rounds and clips to uint8
       (about 11% of the pixels clip, in high-contrast images).
    3. Difficulty varies per example through independent draws: the contrast A log-uniform in
       [30, 150] (a faint image shows little of its hue), the blend a (near 0.45 an image is
       nearly as close to the other class as to its own), and the noise sigma log-uniform in
       [10, 80], which mostly hides the texture.
    4. Labels are balanced (each class equally often, up to rounding); then a fraction
       `label_noise` of the *training* labels is moved to another class (test labels stay
       clean), like the mislabelled examples of real data sets.

    Measured with 10 classes, seed 0, 3000 training examples, 5 epochs (SGD lr 0.1, cosine,
    batch 128, `augment`): the spiking ConvNet of models.py (T = 4) reaches 69% test accuracy
    (39% after the first epoch), a small ReLU CNN (32-64-64 channels) 72%; logistic regression
    on the pixels (Adam, 10 epochs) 61%, far from separating the classes. The colour is learnt
    first, the texture (which needs translation invariance) much later: the same ReLU CNN
    reaches 97% after 15 epochs on 10000 examples. Difficulty is graded: after 5 epochs the
    spiking ConvNet is right on 52% of the test images with the faintest colour (lowest
    third) and on 81% of those with the strongest. With many classes the hues crowd together
    and the textures matter more. Generating 10000 examples takes about 0.3 s on a 2-core CPU.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be positive; got {num_train}, {num_test}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2; got {num_classes}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1]; got {label_noise}")
    seed = int(seed) % (2 ** 62)
    templates = _templates(num_classes, _generator(seed, 0))
    x_train, y_train = _sample(templates, num_train, _generator(seed, 1), label_noise)
    x_test, y_test = _sample(templates, num_test, _generator(seed, 2), 0.0)
    return Dataset(x_train, y_train, x_test, y_test, num_classes)


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 3 + stream)


# The generative parameters described in make_synthetic's docstring.
_COLOUR = 0.8               # weight of the hue in a template; the texture's is sqrt(1 - 0.8 ** 2)
_SHARED = 0.5               # share of texture variance common to all classes
_BLEND = 0.45               # a ~ U(0, _BLEND): weight of the other class's template
_CONTRAST = (30.0, 150.0)   # A, log-uniform
_SIGMA = (10.0, 80.0)       # pixel noise sd, log-uniform
_BRIGHTNESS = (10.0, 3.0)   # +- range of the grey level, and of each channel on top of it


def _templates(k: int, g: torch.Generator) -> Tensor:
    """[k, 2 (plain, mirrored), 3, 32 * 32] class templates of unit RMS."""
    fy = torch.fft.fftfreq(32, 1 / 32).view(32, 1)
    fx = torch.fft.rfftfreq(32, 1 / 32).view(1, 17)
    radius = (fy ** 2 + fx ** 2).sqrt()
    band = ((radius >= 2) & (radius <= 5)).to(torch.float32)

    def texture(m: int) -> Tensor:
        spectrum = torch.complex(torch.randn(m, 3, 32, 17, generator=g),
                                 torch.randn(m, 3, 32, 17, generator=g)) * band
        t = torch.fft.irfft2(spectrum, s=(32, 32))
        return t / t.flatten(1).std(dim=1).view(m, 1, 1, 1)

    t = math.sqrt(_SHARED) * texture(1) + math.sqrt(1.0 - _SHARED) * texture(k)
    t = t / t.flatten(1).std(dim=1).view(k, 1, 1, 1)
    hue = 2 * math.pi * (torch.randperm(k, generator=g) / k + torch.rand(1, generator=g))
    e1 = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
    e2 = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6)
    u = (hue.cos()[:, None] * e1 + hue.sin()[:, None] * e2) * math.sqrt(3)  # RMS 1 per pixel
    t = math.sqrt(1.0 - _COLOUR ** 2) * t + _COLOUR * u.view(k, 3, 1, 1)
    return torch.stack([t, t.flip(-1)], dim=1).reshape(k, 2, 3, 32 * 32)


_CHUNK = 1024


def _log_uniform(n: int, low: float, high: float, g: torch.Generator) -> Tensor:
    return torch.empty(n).uniform_(math.log(low), math.log(high), generator=g).exp_()


def _sample(templates: Tensor, n: int, g: torch.Generator, label_noise: float) -> tuple[Tensor, Tensor]:
    k = templates.shape[0]
    y = torch.randperm(n, generator=g) % k
    other = (y + torch.randint(1, k, (n,), generator=g)) % k
    blend = _BLEND * torch.rand(n, generator=g)
    contrast = _log_uniform(n, *_CONTRAST, g)
    sigma = _log_uniform(n, *_SIGMA, g)
    grey, channel = _BRIGHTNESS
    brightness = (128.0 + torch.empty(n, 1).uniform_(-grey, grey, generator=g)
                  + torch.empty(n, 3).uniform_(-channel, channel, generator=g))
    mirror = torch.randint(0, 2, (n,), generator=g)
    dy, dx = torch.randint(0, 32, (2, n, 1), generator=g)
    r = torch.arange(32)
    pixel = (((r + dy) % 32).view(n, 32, 1) * 32 + ((r + dx) % 32).view(n, 1, 32)).view(n, 1, 1024)
    bank = templates.reshape(k * 2, 3, 1024)
    x = torch.empty(n, 3, 1024, dtype=torch.uint8)
    for i in range(0, n, _CHUNK):  # chunks that stay in cache: about twice as fast as one pass
        j = slice(i, i + _CHUNK)
        m = len(y[j])
        image = bank.index_select(0, y[j] * 2 + mirror[j]).lerp_(
            bank.index_select(0, other[j] * 2 + mirror[j]), blend[j].view(m, 1, 1))
        image = image.gather(2, pixel[j].expand(m, 3, 1024)).mul_(contrast[j].view(m, 1, 1))
        noise = torch.randn(m, 3, 1024, generator=g).mul_(sigma[j].view(m, 1, 1))
        image.add_(noise).add_(brightness[j].view(m, 3, 1)).round_().clamp_(0, 255)
        x[j] = image
    x = x.view(n, 3, 32, 32)
    if label_noise > 0:
        moved = torch.rand(n, generator=g) < label_noise
        y = torch.where(moved, (y + torch.randint(1, k, (n,), generator=g)) % k, y)
    return x, y


# ---------------------------------------------------------------------------------------------
# Augmentation, normalisation, minibatches
# ---------------------------------------------------------------------------------------------

def augment_params(n: int, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None,
                   device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop offsets and flips for `n` examples: (top, left) in [0, 2 pad], flip bool.

    Drawn on the generator's device (else `device`), in this order: top and left together as
    one [2, n] draw, then the flips.
    """
    if generator is not None:
        device = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=device)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=offsets.device)
    return offsets[0], offsets[1], flips


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, *, pad: int = 4) -> Tensor:
    """Per example i: zero-pad x[i] by `pad` on every side, take the H x W window whose corner
    is (top[i], left[i]) in the padded image, and mirror it left-right if flip[i].

    x: [B, C, H, W] of any dtype; top, left: [B] integers in [0, 2 pad]; flip: [B] bool.
    One gather over the whole batch, on x's device.
    """
    B, C, H, W = x.shape
    dev = x.device
    top, left, flip = top.to(dev), left.to(dev), flip.to(dev)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    Wp = W + 2 * pad
    rows = top.view(B, 1) + torch.arange(H, device=dev)
    cols = left.view(B, 1) + torch.arange(W, device=dev)
    cols = torch.where(flip.view(B, 1), cols.flip(1), cols)
    index = (rows.view(B, H, 1) * Wp + cols.view(B, 1, W)).view(B, 1, H * W).expand(B, C, H * W)
    return padded.reshape(B, C, (H + 2 * pad) * Wp).gather(2, index).view(B, C, H, W)


def augment(x: Tensor, generator: torch.Generator | None = None, *, pad: int = 4,
            flip: bool = True) -> Tensor:
    """Random crop after zero padding by `pad` (default 4), and random horizontal flip.

    The usual CIFAR augmentation of the SNN literature, applied to a whole batch
    x [B, C, H, W] (uint8 or float) at once; returns the same shape and dtype on x's device.
    Reproducible with a seeded `generator`, which may live on x's device or on the CPU.
    """
    top, left, flips = augment_params(x.shape[0], pad=pad, flip=flip, generator=generator,
                                      device=x.device)
    return crop_flip(x, top, left, flips, pad=pad)


def _stats(stats) -> tuple[Sequence[float], Sequence[float]]:
    if isinstance(stats, str):
        if stats not in STATS:
            raise ValueError(f"no normalisation statistics for {stats!r}; valid names: "
                             f"{', '.join(STATS)}, or pass (mean, std)")
        return STATS[stats]
    mean, std = stats
    return mean, std


def make_normalizer(stats, device=None):
    """The input transform for a data set: `Normalizer(stats, device)` for the uint8 image sets,
    the identity for MNIST-1D, whose signals come standardised."""
    return (lambda x: x) if stats == "mnist1d" else Normalizer(stats, device)


class Normalizer:
    """uint8 images -> float32 (x / 255 - mean) / std per channel, on `device`.

    stats: a data set name ("cifar10", "cifar100", "synthetic") or a (mean, std) pair of
    per-channel values for images scaled to [0, 1].
    """

    def __init__(self, stats="cifar10", device=None):
        mean, std = _stats(stats)
        mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std

    def __call__(self, x: Tensor) -> Tensor:
        out = x * self.scale if x.dtype == torch.float32 else x.to(torch.float32).mul_(self.scale)
        return out.sub_(self.shift)


def normalize(x: Tensor, stats="cifar10") -> Tensor:
    """`Normalizer(stats, x.device)(x)`: uint8 [.., C, H, W] -> normalised float32."""
    return Normalizer(stats, x.device)(x)


def batches(x: Tensor, y: Tensor, indices: Tensor | Iterable[int], batch_size: int, *,
            drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (x[idx], y[idx], idx) for consecutive chunks idx of `indices`.

    indices: any order of example indices, e.g. a permutation or `list(sampler)`; moved to
    x's device. The last chunk may be short unless `drop_last`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if not torch.is_tensor(indices):
        indices = torch.as_tensor(list(indices), dtype=torch.long)
    indices = indices.to(device=x.device, dtype=torch.long).reshape(-1)
    stop = len(indices) - len(indices) % batch_size if drop_last else len(indices)
    for i in range(0, stop, batch_size):
        idx = indices[i:i + batch_size]
        yield x[idx], y[idx], idx
