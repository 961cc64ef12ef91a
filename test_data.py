"""Tests of data.py: CIFAR loading on small archives written here in the official format (no
network), the download path through file:// URLs and fake connections, checksum refusals before
any unpickling, safe extraction, batched augmentation and the synthetic set."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import warnings
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data

N_PER_BATCH = 4


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


# ---------------------------------------------------------------------------------------------
# Small archives in the official formats
# ---------------------------------------------------------------------------------------------

def _batch_bytes(x: np.ndarray, labels, label_key: str, extra=None) -> bytes:
    # As the official files read with encoding="bytes": byte-string keys, uint8 [n, 3072] data.
    entry = {b"batch_label": b"testing batch", label_key.encode(): list(map(int, labels)),
             b"data": x, b"filenames": [b"img_%d.png" % i for i in range(len(x))]}
    entry.update(extra or {})
    return pickle.dumps(entry, protocol=2)


def write_cifar(root: Path, kind: str = "cifar10", seed: int = 0):
    """Write the extracted folder of a small CIFAR-10 or CIFAR-100 into root.

    Returns (source with this folder's MD5s and no archive yet, expected ArrayDataset).
    The first training image has one marked pixel: channel 2 (blue), row 5, column 7 = 250.
    """
    rng = np.random.default_rng(seed)
    real = data.SOURCES[kind]
    folder = root / real.folder
    folder.mkdir(parents=True)
    k = real.num_classes
    table, xs, ys = {}, {"train": [], "test": []}, {"train": [], "test": []}
    for split, files in (("train", real.train_files), ("test", real.test_files)):
        for name, _ in files:
            n = N_PER_BATCH * (1 if kind == "cifar10" else 3)
            x = rng.integers(0, 200, size=(n, 3072), dtype=np.uint8)
            if split == "train" and not xs["train"]:
                x[0] = 0
                x[0, 2 * 1024 + 5 * 32 + 7] = 250
            y = rng.integers(0, k, size=n)
            extra = {b"coarse_labels": list(map(int, (y + 1) % 20))} if kind == "cifar100" else None
            raw = _batch_bytes(x, y, real.label_key, extra)
            (folder / name).write_bytes(raw)
            table[name] = md5(raw)
            xs[split].append(x)
            ys[split].append(y)
    meta_name = "batches.meta" if kind == "cifar10" else "meta"
    (folder / meta_name).write_bytes(pickle.dumps({b"label_names": [b"a"] * k}, protocol=2))
    source = replace(real,
                     train_files=tuple((n, table[n]) for n, _ in real.train_files),
                     test_files=tuple((n, table[n]) for n, _ in real.test_files),
                     archive_md5="0" * 32, url="file:///nonexistent/" + real.archive)
    cat = lambda parts: np.concatenate(parts)
    expected = data.ArrayDataset(torch.from_numpy(cat(xs["train"]).reshape(-1, 3, 32, 32)),
                            torch.from_numpy(cat(ys["train"]).astype(np.int64)),
                            torch.from_numpy(cat(xs["test"]).reshape(-1, 3, 32, 32)),
                            torch.from_numpy(cat(ys["test"]).astype(np.int64)), k)
    return source, expected


def make_archive(root: Path, kind: str = "cifar10", where: Path | None = None):
    """Write a folder, tar.gz it into `where` (default root) under the official archive name and
    delete the folder. Returns (source with correct MD5s and a file:// URL to it, expected)."""
    build = root / "build"
    source, expected = write_cifar(build, kind)
    where = where or root
    where.mkdir(parents=True, exist_ok=True)
    archive = where / source.archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build / source.folder, arcname=source.folder)
    _rmtree(build)
    source = replace(source, archive_md5=md5(archive.read_bytes()), url=archive.resolve().as_uri())
    return source, expected


def _rmtree(p: Path):
    import shutil
    shutil.rmtree(p)


def assert_same(a: data.ArrayDataset, b: data.ArrayDataset):
    for name in ("x_train", "y_train", "x_test", "y_test"):
        u, v = getattr(a, name), getattr(b, name)
        assert u.dtype == v.dtype and u.shape == v.shape, name
        assert torch.equal(u, v), name
    assert a.num_classes == b.num_classes


def leftovers(d: Path) -> list[str]:
    """Temporary or partial files anywhere under d."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")
                  if p.name.startswith(".") or p.name.endswith((".part", ".extract", ".tmp")))


@pytest.fixture
def no_network(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("no download expected here")
    monkeypatch.setattr(urllib.request, "urlopen", fail)


@pytest.fixture
def unpickled(monkeypatch):
    """The MD5 of everything unpickled during the test, in order.

    Recorded, not only raised, so that a caller swallowing exceptions cannot hide it. Unpickling
    from a file object (whose bytes could change after a check) is recorded as "<file>".
    """
    seen: list[str] = []
    real_loads = pickle.loads

    def spy_loads(raw, *a, **k):
        seen.append(md5(bytes(raw)))
        return real_loads(raw, *a, **k)

    def file_load(*a, **k):
        seen.append("<file>")
        raise AssertionError("unpickling from a file object")

    monkeypatch.setattr(pickle, "loads", spy_loads)
    monkeypatch.setattr(pickle, "load", file_load)
    monkeypatch.setattr(pickle, "Unpickler", file_load)
    return seen


# ---------------------------------------------------------------------------------------------
# Loading CIFAR
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_hand_placed_archive_is_verified_extracted_and_decoded(tmp_path, no_network, kind):
    source, expected = make_archive(tmp_path / "data", kind)
    ds = data.load_cifar(source, tmp_path / "data", download=False)
    assert_same(ds, expected)
    n_train, n_test = (5 * N_PER_BATCH, N_PER_BATCH) if kind == "cifar10" else (3 * N_PER_BATCH,) * 2
    assert ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (n_test, 3, 32, 32)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.uint8
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.num_classes == (10 if kind == "cifar10" else 100)
    # The raw layout is 1024 red, 1024 green, 1024 blue, each row-major: [c, h, w] = [2, 5, 7].
    first = ds.x_train[0]
    assert first[2, 5, 7] == 250 and int(first.sum()) == 250
    assert (tmp_path / "data" / source.folder).is_dir()
    assert leftovers(tmp_path / "data") == []


def test_cifar100_uses_fine_labels(tmp_path, no_network):
    source, expected = make_archive(tmp_path / "data", "cifar100")
    ds = data.load_cifar(source, tmp_path / "data", download=False)
    assert torch.equal(ds.y_train, expected.y_train) and torch.equal(ds.y_test, expected.y_test)
    assert not torch.equal(ds.y_train, (expected.y_train + 1) % 20)   # the coarse labels


def test_download_end_to_end_through_load_dataset(tmp_path, monkeypatch):
    source, expected = make_archive(tmp_path / "server", "cifar10")
    monkeypatch.setitem(data.SOURCES, "cifar10", source)
    data_dir = tmp_path / "empty" / "data"      # does not exist yet
    ds = data.load_dataset("cifar10", data_dir, seed=123)
    assert_same(ds, expected)
    archive = data_dir / source.archive
    assert md5(archive.read_bytes()) == source.archive_md5
    assert (data_dir / source.folder / "data_batch_5").is_file()
    assert leftovers(data_dir) == []


def test_download_with_wrong_checksum_is_discarded_before_extraction(tmp_path, unpickled):
    source, _ = make_archive(tmp_path / "server", "cifar10")
    bad = replace(source, archive_md5="f" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(data.ChecksumError) as err:
        data.load_cifar(bad, data_dir)
    msg = str(err.value)
    assert "f" * 32 in msg and source.archive_md5 in msg and source.url in msg
    assert "by hand" in msg
    assert list(data_dir.iterdir()) == []   # no archive, no partial file, no folder
    assert unpickled == []


def test_hand_placed_archive_with_wrong_checksum_is_not_extracted(tmp_path, no_network, unpickled):
    data_dir = tmp_path / "data"
    source, _ = make_archive(data_dir, "cifar10")
    bad = replace(source, archive_md5="e" * 32)
    with pytest.raises(data.ChecksumError) as err:
        data.load_cifar(bad, data_dir)
    msg = str(err.value)
    assert str(data_dir / source.archive) in msg and "e" * 32 in msg and source.archive_md5 in msg
    assert sorted(p.name for p in data_dir.iterdir()) == [source.archive]   # the user's file stays
    assert unpickled == []


def test_tampered_batch_file_is_refused_before_unpickling(tmp_path, no_network, unpickled):
    data_dir = tmp_path / "data"
    source, _ = write_cifar(data_dir, "cifar10")

    class Payload:  # what an attacker would put in a pickle: code run by unpickling
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    path = data_dir / source.folder / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}))
    with pytest.raises(data.ChecksumError) as err:
        data.load_cifar(source, data_dir)
    msg = str(err.value)
    expected_md5 = dict(source.files)["data_batch_3"]
    assert str(path) in msg and expected_md5 in msg and md5(path.read_bytes()) in msg
    assert "Delete" in msg and source.archive in msg
    assert not (tmp_path / "pwned").exists()
    assert set(unpickled) <= {m for _, m in source.files}   # only files that passed their check
    assert not list(data_dir.glob("*.npz"))


def test_missing_batch_file_is_a_clear_error(tmp_path, no_network):
    data_dir = tmp_path / "data"
    source, _ = write_cifar(data_dir, "cifar10")
    (data_dir / source.folder / "test_batch").unlink()
    with pytest.raises(data.DataError, match="test_batch is missing"):
        data.load_cifar(source, data_dir)


def test_labels_out_of_range_are_a_data_error(tmp_path, no_network):
    """A batch file whose checksum matches its source but whose labels do not fit num_classes
    (a hand-made or wrong-source file) is refused at load, not trained on."""
    data_dir = tmp_path / "data"
    source, _ = write_cifar(data_dir, "cifar10")
    path = data_dir / source.folder / "data_batch_2"
    raw = _batch_bytes(np.zeros((N_PER_BATCH, 3072), dtype=np.uint8), [3, 10, 0, 1], "labels")
    path.write_bytes(raw)
    source = replace(source, train_files=tuple((n, md5(raw) if n == "data_batch_2" else m)
                                               for n, m in source.train_files))
    with pytest.raises(data.DataError, match=r"labels outside \[0, 10\)"):
        data.load_cifar(source, data_dir)


def test_labels_outside_the_classes_are_refused_for_every_source():
    """Every data set is an ArrayDataset (CIFAR, MNIST-1D, synthetic, frames, arrays a caller
    builds): its labels are range-checked once, when it is built. The training loss no longer
    checks its targets on the device, where a bad label would fail late or index out of bounds."""
    ok = data.make_synthetic(20, 10, seed=0)
    for split, value in (("y_train", 10), ("y_test", -1)):
        fields = ok._asdict()
        fields[split] = fields[split].clone()
        fields[split][3] = value
        with pytest.raises(data.DataError, match=rf"my arrays.*labels outside \[0, 10\).*{value}"):
            data.ArrayDataset(**fields, source="my arrays")
        with pytest.raises(data.DataError, match="in-memory arrays"):   # no source given
            data.ArrayDataset(*fields.values())
    data.ArrayDataset(*ok)                                            # in range: accepted


def test_offline_gives_hand_placement_instructions(tmp_path, monkeypatch):
    def offline(url, *a, **k):
        raise urllib.error.URLError(OSError("Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data_dir = tmp_path / "data"
    with pytest.raises(data.DataError) as err:
        data.load_dataset("cifar10", data_dir)
    assert not isinstance(err.value, data.ChecksumError)
    msg = str(err.value)
    real = data.SOURCES["cifar10"]
    for part in (real.url, "offline", str(data_dir / real.archive), real.archive_md5,
                 str(data_dir / real.folder), "data_batch_1", "name resolution"):
        assert part in msg, part
    assert leftovers(data_dir) == [] and not (data_dir / real.archive).exists()


def test_download_false_is_respected(tmp_path, no_network):
    with pytest.raises(data.DataError, match="download=False") as err:
        data.load_dataset("cifar100", tmp_path, download=False)
    assert data.SOURCES["cifar100"].url in str(err.value)
    assert list(tmp_path.iterdir()) == []


class _Response(io.BytesIO):
    """A connection that breaks (or is interrupted) after `ok` bytes."""

    def __init__(self, payload: bytes, ok: int, exc: BaseException):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}
        self.ok, self.exc = ok, exc

    def read(self, n=-1):
        if self.tell() >= self.ok:
            raise self.exc
        return super().read(min(n, self.ok - self.tell()))


@pytest.mark.parametrize("exc", [TimeoutError("timed out"), KeyboardInterrupt()])
def test_broken_download_leaves_nothing_behind(tmp_path, monkeypatch, exc):
    source, _ = make_archive(tmp_path / "server", "cifar10")
    payload = (tmp_path / "server" / source.archive).read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: _Response(payload, len(payload) // 2, exc))
    data_dir = tmp_path / "data"
    with pytest.raises(data.DataError if isinstance(exc, Exception) else KeyboardInterrupt):
        data.load_cifar(source, data_dir)
    assert list(data_dir.iterdir()) == []


def test_interrupted_extraction_leaves_nothing_behind(tmp_path, monkeypatch, no_network):
    data_dir = tmp_path / "data"
    source, _ = make_archive(data_dir, "cifar10")
    calls = []

    def copy(src, dst, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        dst.write(src.read())

    monkeypatch.setattr(data.shutil, "copyfileobj", copy)
    with pytest.raises(KeyboardInterrupt):
        data.load_cifar(source, data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == [source.archive]


def _evil_archive(path: Path, folder: str, member: tarfile.TarInfo, payload: bytes = b"x"):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo(f"{folder}/readme.html")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)


def _member(name, kind=tarfile.REGTYPE, link=""):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    m.size = 1 if kind == tarfile.REGTYPE else 0
    return m


@pytest.mark.parametrize("case", ["dotdot-inside", "dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_archive_members_are_refused(tmp_path, no_network, case):
    data_dir = tmp_path / "a" / "data"
    data_dir.mkdir(parents=True)
    source = data.SOURCES["cifar10"]
    member = {
        "dotdot-inside": _member(f"{source.folder}/../../escaped"),
        "dotdot": _member("../escaped"),
        "absolute": _member(str(tmp_path / "escaped")),
        "symlink": _member(f"{source.folder}/link", tarfile.SYMTYPE, str(tmp_path / "escaped")),
        "hardlink": _member(f"{source.folder}/hard", tarfile.LNKTYPE, str(tmp_path / "escaped")),
    }[case]
    archive = data_dir / source.archive
    _evil_archive(archive, source.folder, member)
    source = replace(source, archive_md5=md5(archive.read_bytes()))
    with pytest.raises(data.DataError, match="refusing"):
        data.load_cifar(source, data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == [source.archive]
    assert not list(tmp_path.rglob("escaped"))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        data.load_dataset("imagenet", "data")
    for name in data.DATASETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="synthetic"):
        data.load_dataset("cifar10", "data", num_train=10)


# ---------------------------------------------------------------------------------------------
# Augmentation, normalisation
# ---------------------------------------------------------------------------------------------

def reference_crop_flip(x, top, left, flip, pad):
    out = torch.empty_like(x)
    H, W = x.shape[-2:]
    for i in range(len(x)):
        p = F.pad(x[i], (pad, pad, pad, pad))
        c = p[:, top[i]:top[i] + H, left[i]:left[i] + W]
        out[i] = c.flip(-1) if flip[i] else c
    return out


def test_crop_flip_on_a_hand_made_image():
    x = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    top, left = torch.tensor([0]), torch.tensor([0])
    shifted = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]], dtype=torch.uint8)
    out = data.crop_flip(x, top, left, torch.tensor([False]), pad=1)
    assert torch.equal(out[0, 0], shifted)
    out = data.crop_flip(x, top, left, torch.tensor([True]), pad=1)
    assert torch.equal(out[0, 0], shifted.flip(-1))
    centre = data.crop_flip(x, torch.tensor([1]), torch.tensor([1]), torch.tensor([False]), pad=1)
    assert torch.equal(centre, x)
    corner = data.crop_flip(x, torch.tensor([2]), torch.tensor([2]), torch.tensor([False]), pad=1)
    assert torch.equal(corner[0, 0], torch.tensor([[6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0],
                                                  [0, 0, 0, 0]], dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_matches_per_example_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (64, 3, 32, 32), generator=g).to(dtype)
    out = data.augment(x, generator=torch.Generator().manual_seed(5))
    top, left, flip = data.augment_params(64, generator=torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_crop_flip(x, top, left, flip, 4))
    assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
    assert 0 < int(flip.sum()) < 64        # both flipped and unflipped examples
    assert len(set(top.tolist())) > 3 and len(set(left.tolist())) > 3


def test_augment_is_reproducible_and_random():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    a = data.augment(x, generator=torch.Generator().manual_seed(0))
    b = data.augment(x, generator=torch.Generator().manual_seed(0))
    c = data.augment(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(data.augment(x, g), data.augment(x, g))  # the stream advances
    # Flips only: every example is either itself or its mirror image, and both occur.
    f = data.augment(x, generator=g, pad=0)
    same = (f == x).flatten(1).all(1)
    mirrored = (f == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    assert torch.equal(data.augment(x, generator=g, pad=0, flip=False), x)
    assert data.augment(x[:0]).shape == (0, 3, 32, 32)


def test_normalizer():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2)
    mean, std = data.STATS["cifar10"]
    out = data.Normalizer("cifar10")(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-mean[c] / std[c], rel=1e-5)
        assert out[0, c, 0, 1].item() == pytest.approx((1 - mean[c]) / std[c], rel=1e-5)
    assert torch.allclose(data.Normalizer(((0.5,) * 3, (0.5,) * 3))(x)[0, :, 0],
                          torch.tensor([-1.0, 1.0]).expand(3, 2))
    with pytest.raises(ValueError, match="cifar10"):
        data.Normalizer("mnist")


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_well_formed():
    a = data.make_synthetic(num_train=600, num_test=300, seed=3)
    b = data.load_dataset("synthetic", "unused", num_train=600, num_test=300, seed=3)
    assert_same(a, b)
    c = data.make_synthetic(num_train=600, num_test=300, seed=4)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (600, 3, 32, 32) and a.x_test.shape == (300, 3, 32, 32)
    assert a.x_train.dtype == torch.uint8 and a.y_train.dtype == torch.int64 and a.num_classes == 10
    assert torch.bincount(a.y_test, minlength=10).tolist() == [30] * 10   # test labels: clean, balanced
    assert (torch.bincount(a.y_train, minlength=10) > 0).all()
    # The test set does not depend on the training set's size.
    assert torch.equal(data.make_synthetic(num_train=50, num_test=300, seed=3).x_test, a.x_test)
    d = data.make_synthetic(num_train=400, num_test=200, num_classes=100, seed=0)
    assert d.num_classes == 100 and int(d.y_test.max()) == 99 and int(d.y_test.min()) == 0


def test_synthetic_examples_vary_in_difficulty_and_match_the_stats():
    ds = data.make_synthetic(num_train=2000, num_test=100, seed=0)
    x = ds.x_train.float() / 255
    mean, std = data.STATS["synthetic"]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.tensor(mean), atol=0.02)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.tensor(std), atol=0.02)
    # Noise levels differ per image. The templates are smooth, so the spread of differences
    # between horizontal neighbours measures the pixel noise.
    noise = (x[..., 1:] - x[..., :-1]).flatten(1).std(dim=1)
    lo, hi = noise.quantile(torch.tensor([0.1, 0.9])).tolist()
    assert hi / lo > 2.5
    # So do the contrasts: the spread of the images' mean colour (away from grey).
    colour = x.mean(dim=(2, 3))
    chroma = (colour - colour.mean(dim=1, keepdim=True)).norm(dim=1)
    lo, hi = chroma.quantile(torch.tensor([0.1, 0.9])).tolist()
    assert hi / lo > 3


def test_synthetic_is_learnable_but_not_trivial():
    torch.manual_seed(0)
    ds = data.make_synthetic(num_train=2000, num_test=1000, seed=0)
    norm = data.Normalizer("synthetic")
    xtr, xte = norm(ds.x_train).flatten(1), norm(ds.x_test).flatten(1)
    model = torch.nn.Linear(3072, 10)
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-3)
    for epoch in range(4):
        for idx in torch.randperm(2000).split(100):
            loss = F.cross_entropy(model(xtr[idx]), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = model(xte)
    correct = (logits.argmax(1) == ds.y_test).float()
    assert 0.35 < correct.mean() < 0.8, correct.mean()   # chance 0.1; linear cannot solve it
    # Difficulty is graded: images whose mean colour is far from grey (strong contrast, little
    # blending with another class) are much easier than faint ones.
    colour = ds.x_test.float().mean(dim=(2, 3))
    chroma = (colour - colour.mean(dim=1, keepdim=True)).norm(dim=1)
    faint, strong = chroma.argsort()[:333], chroma.argsort()[-333:]
    assert correct[strong].mean() > correct[faint].mean() + 0.15


# ---------------------------------------------------------------------------------------------
# MNIST-1D (optional package; CI installs it)
# ---------------------------------------------------------------------------------------------

def test_mnist1d_is_the_published_split():
    pytest.importorskip("mnist1d", reason="--data mnist1d needs `pip install mnist1d`")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a fingerprint mismatch would warn
        ds = data.load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and set(ds.y_train.unique().tolist()) == set(range(10))
    assert abs(ds.x_train.mean()) < 0.01 and abs(ds.x_train.std() - 1) < 0.01   # standardised
    x = torch.randn(2, 1, 40)
    assert data.make_normalizer("mnist1d")(x) is x
    with pytest.raises(ValueError, match="published 4000 / 1000"):
        data.load_dataset("mnist1d", num_train=100)


def test_mnist1d_fingerprint_allows_rounding_and_nothing_more():
    """The published-set check is portable: last-bit differences (other numeric libraries) pass,
    a changed value, a changed label or two swapped examples do not."""
    pytest.importorskip("mnist1d", reason="--data mnist1d needs `pip install mnist1d`")
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())
    assert data.mnist1d_mismatch(d) is None
    ulp = lambda a, toward: np.nextafter(a, toward * np.inf)
    rng = np.random.default_rng(0)
    nudged = dict(d, x=ulp(d["x"], rng.choice([-1, 1], d["x"].shape)), x_test=ulp(d["x_test"], 1))
    assert data.mnist1d_mismatch(nudged) is None                            # 1 ulp everywhere
    changed = {k: np.array(v, copy=True) for k, v in d.items() if k in ("x", "y", "x_test", "y_test")}
    changed["x_test"][123, 7] += 1e-6
    assert "signals (x_test)" in data.mnist1d_mismatch(changed)
    swapped = dict(d, x=d["x"][[1, 0] + list(range(2, len(d["x"])))])
    assert "signals (x)" in data.mnist1d_mismatch(swapped)
    relabelled = dict(d, y=np.where(np.arange(len(d["y"])) == 5, (d["y"] + 1) % 10, d["y"]))
    assert "labels" in data.mnist1d_mismatch(relabelled)
    assert "shape" in data.mnist1d_mismatch(dict(d, x=d["x"][:-1]))


def test_mnist1d_is_generated_once_per_process_and_callers_cannot_corrupt_it(monkeypatch):
    pytest.importorskip("mnist1d", reason="--data mnist1d needs `pip install mnist1d`")
    import mnist1d.data
    made, real = [], mnist1d.data.make_dataset
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: made.append(1) or real(args))
    data._generate_mnist1d.cache_clear()
    first = data.load_mnist1d()
    x_test, y_test = first.x_test.clone(), first.y_test.clone()
    first.x_test.zero_()                                   # a caller changing its copy in place
    first.y_test.fill_(3)
    again = data.load_dataset("mnist1d")
    assert made == [1]                                     # generated once
    assert torch.equal(again.x_test, x_test) and torch.equal(again.y_test, y_test)


def test_mnist1d_without_the_package_names_the_install_command(monkeypatch):
    import sys
    data._generate_mnist1d.cache_clear()                 # a cached set needs no package
    monkeypatch.setitem(sys.modules, "mnist1d", None)    # import fails as if not installed
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(data.DataError, match="pip install mnist1d"):
        data.load_dataset("mnist1d")
