"""The data sets of the SADP experiments, held whole in memory and moved whole to the device.

    ds = load_dataset("cifar10", "data")          # downloaded once, MD5-checked
    x_train, norm = ds.x_train.to(device), Normalizer("cifar10", device)
    for idx in order.split(128):                  # order: e.g. torch.tensor(list(sampler))
        logits = model(norm(augment(x_train[idx])))   # crop + flip on the batch's device

CIFAR-10/100 (official python versions), "synthetic" (`make_synthetic`): uint8 [N, 3, 32, 32];
"mnist1d": float32 [N, 1, 40]; labels int64 [N], range-checked on load. Unpickling runs code, so
only bytes that match the official MD5 (`SOURCES`) are unpickled; downloads and extractions appear
only once complete.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import warnings
from collections import namedtuple
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("cifar10", "cifar100", "synthetic", "mnist1d")


class DataError(RuntimeError):
    """A data set cannot be had: offline, missing or damaged files. The message says what to do."""


class ChecksumError(DataError):
    """A file's MD5 differs from the expected one; the file was not used."""


def check_labels(labels: Tensor, num_classes: int, source: str) -> None:
    """DataError naming `source` and a label outside [0, num_classes): the loss does not check on the device."""
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        raise DataError(f"{source}: labels outside [0, {num_classes}), e.g. {int(labels[bad[0]])} at "
                        f"index {int(bad[0])} ({len(bad)} in all); a label is a class index.")


class ArrayDataset(namedtuple("_Arrays", "x_train y_train x_test y_test num_classes")):
    """A whole data set in memory: inputs (uint8 images, or float signals) and int64 labels, whose
    range is checked whoever builds it; `source` names the set in the error."""

    def __new__(cls, x_train, y_train, x_test, y_test, num_classes, *, source="in-memory arrays"):
        check_labels(y_train, num_classes, f"{source} (training labels)")
        check_labels(y_test, num_classes, f"{source} (test labels)")
        return super().__new__(cls, x_train, y_train, x_test, y_test, num_classes)


# Per-channel (mean, std) of the training images scaled to [0, 1]: CIFAR's usual values; for
# synthetic, those of make_synthetic()'s default output (test_data.py checks them).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.502, 0.502, 0.502), (0.269, 0.269, 0.269)),
}


def load_dataset(name: str, data_dir: str | os.PathLike = "data", *, download: bool = True,
                 seed: int = 0, num_train: int | None = None, num_test: int | None = None) -> ArrayDataset:
    """A data set of DATASETS as CPU tensors. data_dir, download: where CIFAR lives and whether to
    fetch it if absent. seed, num_train, num_test: for "synthetic" only."""
    if name == "synthetic":
        sizes = {k: v for k, v in (("num_train", num_train), ("num_test", num_test)) if v is not None}
        return make_synthetic(seed=seed, **sizes)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if num_train is not None or num_test is not None:
        split = "the published 4000 / 1000 split" if name == "mnist1d" else "fixed splits"
        raise ValueError(f"num_train / num_test are for the synthetic data set only; {name} has {split}")
    return load_mnist1d() if name == "mnist1d" else load_cifar(SOURCES[name], data_dir, download=download)


# The published MNIST-1D set, fingerprinted: other numeric libraries change the signals' last bits, so
# labels are hashed exactly and signals compared through a few fixed projections within a tolerance.
# Derived once from the published file, `mnist1d_data.pkl` at the root of the mnist1d
# repository (github.com/greydanus/mnist1d; the file's SHA-256 is e95257676e9fb045...7dd6aa5):
#     python -c "import pickle, data; print(data.mnist1d_fingerprint(pickle.load(open('mnist1d_data.pkl', 'rb'))))"
MNIST1D_PUBLISHED = {
    "labels": "6feec4a017698c7fe237c8854cbd2e338c6dd5c16240f6fa79daefaaa129e169",
    "x": ((4000, 40), (159248.25386534864, -41.195857999098635, -26.881426577341465,
                       -61.689417814518464, 78.93805158034932)),
    "x_test": ((1000, 40), (40751.74613465137, 54.26826482102048, 30.50736268163208,
                            62.240863966225284, 13.402119889977946)),
}
MNIST1D_TOLERANCE = 1e-12      # per element: a projection may move by at most this x sum(|w|)


def _projection_weights(n: int, k: int) -> np.ndarray:
    """Fixed weights in [-0.5, 0.5) from integer arithmetic alone (no library RNG to change)."""
    i = np.arange(n, dtype=np.int64)
    return ((i * 0x9E3779B1 + (k + 1) * 0x7F4A7C15) % 2 ** 32) / 2 ** 32 - 0.5


def mnist1d_fingerprint(d: dict) -> dict:
    """The fingerprint of an MNIST-1D dict (keys x, y, x_test, y_test): the SHA-256 of the labels
    (int64, little-endian) and, per signal array, its shape, its sum of squares and 4 projections."""
    labels = b"".join(np.ascontiguousarray(d[k], dtype="<i8").tobytes() for k in ("y", "y_test"))
    out = {"labels": hashlib.sha256(labels).hexdigest()}
    for key in ("x", "x_test"):
        x = np.asarray(d[key], dtype=np.float64).ravel()
        sums = [float(x @ x)] + [float(x @ _projection_weights(x.size, k)) for k in range(4)]
        out[key] = (tuple(np.shape(d[key])), tuple(sums))
    return out


def mnist1d_mismatch(d: dict) -> str | None:
    """None if d is the published MNIST-1D set (up to MNIST1D_TOLERANCE), else what differs."""
    got = mnist1d_fingerprint(d)
    if got["labels"] != MNIST1D_PUBLISHED["labels"]:
        return "its labels differ from the published ones"
    for key in ("x", "x_test"):
        (shape, sums), (want_shape, want) = got[key], MNIST1D_PUBLISHED[key]
        if shape != want_shape:
            return f"its {key} has shape {shape}, the published one {want_shape}"
        x = np.asarray(d[key], dtype=np.float64).ravel()
        scale = [2 * float(np.abs(x).sum())] + [float(np.abs(_projection_weights(x.size, k)).sum()) for k in range(4)]
        if any(abs(a - b) > MNIST1D_TOLERANCE * s for a, b, s in zip(sums, want, scale)):
            return f"its signals ({key}) differ from the published ones by more than rounding"
    return None


def load_mnist1d() -> ArrayDataset:
    """MNIST-1D (Greydanus, 2020): 10 classes, 4000 train / 1000 test standardised signals, float32
    [N, 1, 40]. Generated once per process; every call gets its own copy to change in place."""
    return ArrayDataset(*(t.clone() for t in _generate_mnist1d()), 10, source="mnist1d")


@functools.lru_cache(maxsize=1)
def _generate_mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """By the optional `mnist1d` package, offline (not its network-first `get_dataset`); warns if not published."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise DataError(f"--data mnist1d needs the optional package mnist1d ({e}): pip install mnist1d") from e
    d = make_dataset(get_dataset_args())
    if (mismatch := mnist1d_mismatch(d)) is not None:
        warnings.warn(f"mnist1d generated a data set that is not the published MNIST-1D: {mismatch}; "
                      f"accuracies will not be comparable with published or this project's figures.")
    signals = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).unsqueeze(1)   # [N, 1, 40]
    labels = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))
    return signals(d["x"]), labels(d["y"]), signals(d["x_test"]), labels(d["y_test"])


def make_synthetic(num_train: int = 10000, num_test: int = 2000, num_classes: int = 10, *,
                   seed: int = 0) -> ArrayDataset:
    """A learnable, CIFAR-shaped data set whose examples differ in difficulty; needs no files.

    Class k's template: a hue plus a periodic texture, half of it shared by all classes. An image
    blends its class's template with another's, mirrors and shifts it, and takes a contrast, a
    brightness and pixel noise drawn per example (so difficulty varies). The test set has its own
    generator: it does not depend on `num_train`."""
    if num_train < 1 or num_test < 1 or num_classes < 2:
        raise ValueError(f"make_synthetic needs num_train, num_test >= 1 and num_classes >= 2; "
                         f"got {num_train}, {num_test}, {num_classes}")
    gen = lambda stream: torch.Generator().manual_seed(int(seed) % (2 ** 62) * 3 + stream)
    templates = _templates(num_classes, gen(0))
    x_train, y_train = _sample(templates, num_train, gen(1), _LABEL_NOISE)
    x_test, y_test = _sample(templates, num_test, gen(2), 0.0)
    return ArrayDataset(x_train, y_train, x_test, y_test, num_classes, source="synthetic")


_COLOUR = 0.8               # weight of the hue in a template; the texture's is sqrt(1 - 0.8 ** 2)
_SHARED = 0.5               # share of texture variance common to all classes
_BLEND = 0.45               # a ~ U(0, _BLEND): weight of the other class's template
_CONTRAST = (30.0, 150.0)   # A, log-uniform
_SIGMA = (10.0, 80.0)       # pixel noise sd, log-uniform
_BRIGHTNESS = (10.0, 3.0)   # +- range of the grey level, and of each channel on top of it
_LABEL_NOISE = 0.02         # share of training labels moved to another class; test labels stay clean
_CHUNK = 1024               # examples generated at once: they stay in the CPU cache


def _templates(k: int, g: torch.Generator) -> Tensor:
    """[2 k, 3, 32 * 32] class templates of unit RMS: class c's plain at 2 c, mirrored at 2 c + 1."""
    radius = (torch.fft.fftfreq(32, 1 / 32).view(32, 1) ** 2 + torch.fft.rfftfreq(32, 1 / 32) ** 2).sqrt()
    band = ((radius >= 2) & (radius <= 5)).to(torch.float32)
    unit_rms = lambda t: t / t.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def texture(m: int) -> Tensor:
        spectrum = torch.complex(torch.randn(m, 3, 32, 17, generator=g), torch.randn(m, 3, 32, 17, generator=g))
        return unit_rms(torch.fft.irfft2(spectrum * band, s=(32, 32)))

    t = unit_rms(math.sqrt(_SHARED) * texture(1) + math.sqrt(1.0 - _SHARED) * texture(k))
    hue = 2 * math.pi * (torch.randperm(k, generator=g) / k + torch.rand(1, generator=g))
    e1 = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
    e2 = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6)
    u = (hue.cos()[:, None] * e1 + hue.sin()[:, None] * e2) * math.sqrt(3)  # RMS 1 per pixel
    t = math.sqrt(1.0 - _COLOUR ** 2) * t + _COLOUR * u.view(k, 3, 1, 1)
    return torch.stack([t, t.flip(-1)], dim=1).reshape(2 * k, 3, 32 * 32)


def _sample(bank: Tensor, n: int, g: torch.Generator, label_noise: float) -> tuple[Tensor, Tensor]:
    k = len(bank) // 2
    y = torch.randperm(n, generator=g) % k
    other = (y + torch.randint(1, k, (n,), generator=g)) % k
    blend = _BLEND * torch.rand(n, generator=g)
    contrast, sigma = (torch.empty(n).uniform_(math.log(lo), math.log(hi), generator=g).exp_()
                       for lo, hi in (_CONTRAST, _SIGMA))      # log-uniform
    grey, channel = _BRIGHTNESS
    brightness = (128.0 + torch.empty(n, 1).uniform_(-grey, grey, generator=g)
                  + torch.empty(n, 3).uniform_(-channel, channel, generator=g))
    mirror = torch.randint(0, 2, (n,), generator=g)
    dy, dx = torch.randint(0, 32, (2, n, 1), generator=g)
    r = torch.arange(32)
    pixel = (((r + dy) % 32).view(n, 32, 1) * 32 + ((r + dx) % 32).view(n, 1, 32)).view(n, 1, 1024)
    x = torch.empty(n, 3, 1024, dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
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


def augment_params(n: int, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None,
                   device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop offsets and flips for `n` examples: (top, left) in [0, 2 pad], flip bool.
    Drawn on the generator's device (else `device`): top and left as one [2, n] draw, then flips."""
    device = generator.device if generator is not None else device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=device)
    flips = (torch.randint(0, 2, (n,), generator=generator, device=device).bool() if flip
             else torch.zeros(n, dtype=torch.bool, device=offsets.device))
    return offsets[0], offsets[1], flips


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, *, pad: int = 4) -> Tensor:
    """Per example i: the H x W window at (top[i], left[i]) of x[i] zero-padded by `pad`, mirrored if flip[i].
    x: [B, C, H, W] of any dtype; top, left: [B] in [0, 2 pad]; flip: [B] bool. One gather, on x's device."""
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
    """Random crop after zero padding by `pad` and random horizontal flip, the usual CIFAR augmentation,
    of a batch x [B, C, H, W] on x's device; reproducible with a seeded `generator` (x's device or CPU)."""
    top, left, flips = augment_params(len(x), pad=pad, flip=flip, generator=generator, device=x.device)
    return crop_flip(x, top, left, flips, pad=pad)


def make_normalizer(stats, device=None):
    """`Normalizer(stats, device)` for the uint8 image sets; MNIST-1D comes standardised: identity."""
    return (lambda x: x) if stats == "mnist1d" else Normalizer(stats, device)


class Normalizer:
    """uint8 images -> float32 (x / 255 - mean) / std per channel, on `device`. stats: a name in
    STATS or a (mean, std) pair of per-channel values for images scaled to [0, 1]."""

    def __init__(self, stats="cifar10", device=None):
        if isinstance(stats, str) and stats not in STATS:
            raise ValueError(f"no normalisation statistics for {stats!r}; valid names: "
                             f"{', '.join(STATS)}, or pass (mean, std)")
        mean, std = (torch.as_tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                     for v in (STATS[stats] if isinstance(stats, str) else stats))
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float() * self.scale).sub_(self.shift)


@dataclass(frozen=True)
class Source:
    """Where a CIFAR data set comes from and what its files must hash to (MD5 hex digests)."""
    name: str
    url: str
    archive: str                              # file name of the archive inside data_dir
    archive_md5: str
    folder: str                               # the archive's top-level folder
    train_files: tuple[tuple[str, str], ...]  # (file name in folder, MD5), in order
    test_files: tuple[tuple[str, str], ...]
    label_key: str                            # "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)
    num_classes: int
    files = property(lambda self: self.train_files + self.test_files)   # all (name, MD5)


# The official archives and the MD5 of every file unpickled, as published with the data sets
# (and listed by torchvision.datasets.CIFAR10 / CIFAR100). Tests pass their own `Source`.
SOURCES = {
    "cifar10": Source(
        "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        train_files=tuple(zip([f"data_batch_{i}" for i in range(1, 6)], (
            "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
            "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
            "482c414d41f54cd18b22e5b47cb7c3cb"))),
        test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),), label_key="labels", num_classes=10),
    "cifar100": Source(
        "cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),), label_key="fine_labels", num_classes=100),
}


def load_cifar(source: Source, data_dir: str | os.PathLike, *, download: bool = True) -> ArrayDataset:
    """Load CIFAR from `<data_dir>/<source.folder>`; if absent, from the archive (placed by hand,
    or downloaded when `download`), MD5-checked, then extracted. Every file is MD5-checked."""
    data_dir = Path(data_dir)
    folder, archive = data_dir / source.folder, data_dir / source.archive
    by_hand = (f"To set up {source.name} by hand, download\n    {source.url}\non a machine with internet "
               f"access and copy it unchanged to\n    {archive}    (MD5 {source.archive_md5})\n"
               f"or extract it so that {folder}/ holds {', '.join(n for n, _ in source.files)}; "
               f"then run again. The synthetic data set needs no files.")
    if not folder.is_dir():
        if not (download or archive.is_file()):
            raise DataError(f"{source.name} is not in {data_dir} and download=False.\n{by_hand}")
        try:
            if archive.is_file():
                _check_md5(hashlib.md5(archive.read_bytes()).hexdigest(), source.archive_md5, archive,
                           "so it was not extracted (a partial or altered download?). Delete it and "
                           "run again to download it afresh.")
            else:
                download_file(source.url, archive, source.archive_md5)
            extract_archive(archive, data_dir, source.folder)
        except DataError as e:
            raise type(e)(f"{e}\n{by_hand}") from e
        except OSError as e:            # making data_dir or a temporary file in it: before any download
            raise DataError(f"cannot read or write in --data-dir {data_dir} ({e}); check its "
                            f"permissions, or choose another --data-dir.\n{by_hand}") from e
    splits = []
    for files in (source.train_files, source.test_files):
        parts = [_read_batch(folder / name, md5, source, by_hand) for name, md5 in files]
        splits += [torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in (0, 1)]
    return ArrayDataset(*splits, source.num_classes, source=str(folder))


def _check_md5(actual: str, md5: str, what, advice: str) -> None:
    if actual != md5:
        raise ChecksumError(f"{what}: MD5 {actual} differs from the official {md5}; {advice}")


def _read_batch(path: Path, md5: str, source: Source, by_hand: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's images and labels, unpickled from the very bytes whose MD5 was checked."""
    redo = f"Delete the folder {path.parent} and run again to extract it afresh (downloaded if absent)"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: its folder is incomplete. {redo}.\n{by_hand}") from None
    _check_md5(hashlib.md5(raw).hexdigest(), md5, path, f"the file was not loaded (a damaged, partial "
               f"or altered copy). {redo}, or place the official {source.archive} there by hand.")
    entry = pickle.loads(raw, encoding="bytes")     # as the data sets' page reads them: bytes keys
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    x = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(entry[source.label_key.encode()], dtype=np.int64)


def download_file(url: str, dest: Path, md5: str) -> None:
    """Download `url` to `dest` through a temporary file beside it, renamed into place (atomically)
    once its MD5 matches and removed on any failure or interruption."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w+b") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    print(f"downloading {url} to {dest}", file=sys.stderr, flush=True)
                    shutil.copyfileobj(response, out, 1 << 20)
            except (OSError, HTTPException, ValueError) as e:     # offline, a broken connection, a full disk
                raise DataError(f"could not download {url} to {dest} (stopped after {out.tell()} bytes): "
                                f"{getattr(e, 'reason', None) or e}. This machine may be offline, the "
                                f"server unreachable or {dest.parent} full; run again to retry.") from e
            out.seek(0)
            _check_md5(hashlib.file_digest(out, "md5").hexdigest(), md5, f"the file downloaded from {url}",
                       "it was discarded. Run again to retry (a proxy or captive portal may have altered it).")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extract_archive(archive: Path, data_dir: Path, folder: str) -> None:
    """Extract the top-level `folder` of a .tar.gz into `data_dir` through a temporary folder, renamed
    into place once complete and removed on failure. Only plain files and folders are extracted."""
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{folder}.", suffix=".extract"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name, parts = member.name, [p for p in member.name.split("/") if p not in ("", ".")]
                if (not (member.isdir() or member.isfile()) or name.startswith(("/", "\\")) or "\\" in name
                        or name[1:2] == ":" or ".." in parts):
                    raise DataError(f"{archive}: member {name!r} is a link, a special file or a path outside "
                                    f"the archive's folder; refusing to extract this archive")
                if member.isfile():             # its folders are made for it
                    target = tmp.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        if not (tmp / folder).is_dir():
            raise DataError(f"{archive} has no top-level folder {folder}/; is it the right archive?")
        try:
            os.rename(tmp / folder, data_dir / folder)
        except OSError:
            if not (data_dir / folder).is_dir():  # else another process extracted it first: use theirs
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"could not extract {archive}: {e}. Delete it and run again.") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
