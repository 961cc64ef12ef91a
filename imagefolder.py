"""ImageNet, and any data set in its folder-of-classes layout, streamed from disk (docs/imagenet.md).

    DIR/train/<class>/**/<image>    DIR/val/<class>/**/<image>    (class names: any folder names)

    folder = scan("path/to/imagenet")        # the layout is checked before anything trains
    source = FolderSource(folder, size=224, workers=8, device="cuda", seed=0)
    for idx, x, y, keep in source.train_batches(epoch, order.split(256)):   # order: list(sampler)
        ...                                   # x: float [B, 3, 224, 224] normalised on the device

DataLoader workers decode the images to uint8; the device normalises them. A training crop is seeded
by (seed, epoch, rank, position in the epoch): the same with any number of workers, and on resume.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from data import DataError, Normalizer, check_labels

# torchvision's list, compared case-insensitively: the files the layout scan takes as images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # the usual per-channel mean, std
CROP_SCALE = (0.08, 1.0)          # random-resized crop: share of the image's area
CROP_RATIO = (3 / 4, 4 / 3)       # and aspect ratio (width / height), drawn log-uniformly
EVAL_CROP = 0.875                 # evaluation: centre crop of size out of a size / 0.875 resize


def require_pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("--data imagenet / imagefolder decode images with Pillow, which is not "
                        "installed: pip install pillow (or the faster drop-in pillow-simd)") from e
    return Image


class Split(NamedTuple):
    """One split's images: paths relative to `root` (a numpy bytes array: no per-path Python
    object, so forked workers do not copy 1.28M refcounted strings) and int64 labels."""
    root: str
    paths: np.ndarray
    labels: Tensor

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def __len__(self) -> int:
        return len(self.labels)


class Folder(NamedTuple):
    """A scanned DIR: class names (sorted folder names; label i is classes[i]), train, val."""
    root: str
    classes: tuple[str, ...]
    train: Split
    val: Split

    def digest(self) -> bytes:
        """SHA-256 of both splits' file lists and labels (compared across ranks and on --resume)."""
        h = hashlib.sha256()
        for split in (self.train, self.val):
            h.update(b"\0".join(split.paths.tolist()))
            h.update(split.labels.numpy().tobytes())
        return h.digest()


LAYOUT = ("expected DIR/train/<class>/<image> and DIR/val/<class>/<image> with the same class "
          "folders (ImageNet's layout; `python imagefolder.py sort DIR/val LABELS` sorts its flat "
          "val/ folder into class folders, LABELS being e.g. LOC_val_solution.csv)")


def scan(root: str | os.PathLike) -> Folder:
    """Lists DIR/train and DIR/val and checks the layout (a DataError says what is wrong and the
    fix). As in torchvision's ImageFolder, every image anywhere below a class folder is of its class."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder; {LAYOUT}.")
    if missing := [s for s in ("train", "val") if not (root / s).is_dir()]:
        raise DataError(f"{root} has no {' or '.join(s + '/' for s in missing)} folder; {LAYOUT}.")
    (classes, loose), (val_classes, val_loose) = _listdir(root / "train"), _listdir(root / "val")
    for split, mine, other, images in (("train", classes, val_classes, loose),
                                       ("val", val_classes, classes, val_loose)):
        if images:
            raise DataError(f"{root / split} holds {len(images)} image(s) outside class folders "
                            f"(e.g. {images[0]}); {LAYOUT}.")
        if len(mine) < 2:
            raise DataError(f"{root / split} holds {len(mine)} class folder(s) ({_some(mine)}); a "
                            f"classifier needs at least 2 classes; {LAYOUT}.")
        if lacking := sorted(set(other) - set(mine)):
            raise DataError(f"{len(lacking)} class(es) have no folder in {root / split}: {_some(lacking)}; {LAYOUT}.")
    return Folder(str(root), tuple(classes), *(_list_split(root / s, classes) for s in ("train", "val")))


def _list_split(split: Path, classes: list[str]) -> Split:
    files = [sorted(_images_below(split / name, {os.path.realpath(split): split})) for name in classes]
    if empty := [name for name, names in zip(classes, files) if not names]:
        raise DataError(f"{len(empty)} class folder(s) in {split} hold no image "
                        f"({', '.join(IMAGE_EXTENSIONS)}): {_some(empty)}. Remove them from both "
                        f"train/ and val/, or fill them.")
    paths = [os.fsencode(os.path.join(name, f)) for name, names in zip(classes, files) for f in names]
    labels = torch.arange(len(classes)).repeat_interleave(torch.tensor([len(names) for names in files]))
    return Split(str(split), np.array(paths, dtype=bytes), labels)


def _images_below(folder: Path, above: dict) -> Iterator[str]:
    """The images anywhere below `folder`, relative to it, links to folders followed as torchvision
    does, but a link back to a folder above (above: real path -> folder) refused, not walked forever."""
    if (here := os.path.realpath(folder)) in above:
        raise DataError(f"{folder} is {above[here]} again (a symbolic link loop); remove the link.")
    folders, images = _listdir(folder)
    yield from images
    for sub in folders:
        yield from (os.path.join(sub, f) for f in _images_below(folder / sub, {**above, here: folder}))


def _listdir(folder: Path) -> tuple[list[str], list[str]]:
    """The sorted sub-folders and image files in `folder`, hidden ones (.name) left out. DataError for
    an entry that cannot be read, and for a broken link: it may have led to images gone missing unseen."""
    folders, images = [], []
    try:
        with os.scandir(folder) as entries:
            for e in (e for e in entries if not e.name.startswith(".")):
                if e.is_dir():
                    folders.append(e.name)
                elif e.is_file():
                    images += [e.name] if e.name.lower().endswith(IMAGE_EXTENSIONS) else []
                elif e.is_symlink() and not os.path.exists(e.path):
                    raise DataError(f"{e.path} is a broken symbolic link (to {os.readlink(e.path)}); "
                                    f"restore what it points to, or remove it.")
    except OSError as e:
        raise DataError(f"cannot read {e.filename or folder} ({e.strerror}); repair it, or "
                        f"remove it from the data set.") from e
    return sorted(folders), sorted(images)


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def sort_flat_split(split: str | os.PathLike, labels: str | os.PathLike) -> int:
    """Moves the images lying directly in `split` into split/<class>/ folders by a UTF-8 labels file
    of "<image>,<class>" or "<image> <class>" lines (the image with or without its extension; the
    class's first word; other lines ignored), as ImageNet's LOC_val_solution.csv is. Nothing moves
    unless every image has a label that can be a folder name and no move would replace a file.
    Returns how many moved; run again, it moves the rest, or none."""
    split = Path(split)
    if not split.is_dir():
        raise DataError(f"{split} is not a folder.")
    loose, by_name = _listdir(split)[1], _read_labels(labels)
    label = {n: by_name.get(n, by_name.get(os.path.splitext(n)[0])) for n in loose}
    if unlabelled := [n for n, c in label.items() if c is None]:
        raise DataError(f"{labels} has no label for {len(unlabelled)} of the {len(loose)} images "
                        f"in {split} ({_some(unlabelled)}); nothing was moved.")
    if odd := _not_folder_names(split, set(label.values())):
        raise DataError(f"{labels} names classes that are not folder names: {_some(odd)}; nothing was moved.")
    if taken := [os.path.join(c, n) for n, c in label.items() if os.path.lexists(split / c / n)]:
        raise DataError(f"{split} already holds {_some(taken)}, which moving would replace; nothing was moved.")
    for moved, (name, cls) in enumerate(label.items()):
        try:
            (split / cls).mkdir(exist_ok=True)
            os.replace(split / name, split / cls / name)
        except OSError as e:
            raise DataError(f"cannot move {split / name} into {split / cls} ({e}); {moved} of the "
                            f"{len(loose)} images were moved before it. Fix the cause and run the "
                            f"same command again: it moves the rest.") from e
    return len(loose)


def _read_labels(labels) -> dict[str, str]:
    with open(labels, "rb") as f:           # a byte order mark (Excel's "CSV UTF-8") is no name
        lines = f.read().removeprefix(codecs.BOM_UTF8).splitlines()
    by_name = {}
    for number, line in enumerate(lines, 1):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{labels} is not UTF-8 text (line {number}, byte {e.start + 1}: "
                            f"{line[e.start:e.end]!r}); save it as UTF-8; nothing was moved.") from None
        fields = line.strip().split("," if "," in line else None, 1)
        if len(fields) == 2 and fields[1].split():
            by_name[fields[0].strip()] = fields[1].split()[0]
    return by_name


def _not_folder_names(split: Path, names: set[str]) -> list[str]:
    """Those of `names` that cannot be folders in `split`, each with why."""
    try:
        limit = os.pathconf(split, "PC_NAME_MAX")   # -1: no limit
    except (AttributeError, OSError, ValueError):   # no pathconf (Windows), or not known here
        limit = 255
    bad = []
    for name in sorted(names):
        size = len(os.fsencode(name))
        why = ("a NUL byte" if "\0" in name else "a path separator" if "/" in name or "\\" in name
               else "not a name" if name in (".", "..") else
               f"{size} bytes, over the {limit} allowed here" if 0 <= limit < size else None)
        bad += [f"{name[:20]!r}{'...' if len(name) > 20 else ''} ({why})"] if why else []
    return bad


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random-resized crop's (left, top, right, bottom) in a width x height image: area a share
    U(CROP_SCALE) of the image's, aspect ratio log-uniform in CROP_RATIO, placed uniformly. Ten
    tries; then the largest centred crop with its aspect ratio clipped to CROP_RATIO."""
    lo, hi = CROP_RATIO
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = min(max(width / height, lo), hi)
    w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


DECODERS = ("auto", "pillow", "torchcodec")


def resolve_decoder(decoder: str = "auto") -> str:
    """"auto": torchcodec where it loads, else Pillow; DataError if torchcodec is asked for and does not load."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
    try:
        if decoder != "pillow":
            from torchcodec.decoders import decode_image  # noqa: F401
            return "torchcodec"
    except Exception as e:        # ImportError, or its native libraries failing to load
        if decoder == "torchcodec":
            raise DataError(f"--decoder torchcodec: torchcodec does not load ({type(e).__name__}: {e}); "
                            f"pip install torchcodec (the release matching your torch), or use --decoder pillow") from e
    return "pillow"


def load_image(path: str, size: int, rng: np.random.Generator | None, draft: bool = True,
               decoder: str = "pillow") -> Tensor:
    """The image at `path` as uint8 [size, size, 3]. With rng (training): a random-resized crop,
    flipped with probability 1/2; else the centre crop of a resize to a shorter side of size / EVAL_CROP,
    as a box in whole pixels of the original (so that every decoder crops the same ones). A JPEG is
    decoded at reduced size where the crop allows (draft); else torchcodec, if asked, decodes JPEG
    and 8-bit PNG files; Pillow the rest. Errors propagate (see `unreadable`)."""
    Image = require_pillow()
    with Image.open(path) as img:
        width, height = img.size
        if rng is not None:
            box = crop_box(width, height, rng)
        else:
            side = max(1, round(min(width, height) * EVAL_CROP))
            left, top = (width - side) // 2, (height - side) // 2
            box = (left, top, left + side, top + side)
        # the largest DCT scaling (1/2, 1/4, 1/8) that keeps the crop >= size on both sides
        shrink = min(box[2] - box[0], box[3] - box[1]) / size
        out = None
        if draft and img.format == "JPEG" and shrink >= 2:
            img.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
            sx, sy = img.size[0] / width, img.size[1] / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        elif decoder == "torchcodec" and img.format in ("JPEG", "PNG") and img.mode[0] != "I":
            out = _torchcodec_crop(path, box, size, (height, width))
        if out is None:
            if img.mode.startswith("I"):     # 16-bit grey (I;16, I;16B, I): scaled, not clipped at 255
                img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
            out = torch.from_numpy(np.array(img.convert("RGB").resize((size, size), Image.BILINEAR, box=box)))
    return out.flip(1) if rng is not None and rng.random() < 0.5 else out


def _torchcodec_crop(path: str, box, size: int, shape: tuple[int, int]) -> Tensor | None:
    """The box of torchcodec's decode resized to uint8 [size, size, 3]; None (Pillow decodes then) if
    torchcodec fails or decodes another shape than Pillow's header gave (e.g. rotated by EXIF)."""
    from torchcodec.decoders import decode_image
    try:
        x = decode_image(path, mode="RGB")                      # [3, H, W] uint8
    except RuntimeError:
        return None
    if tuple(x.shape[1:]) != shape:
        return None
    left, top, right, bottom = box                              # whole pixels, at least 1 x 1
    crop = x[None, :, top:bottom, left:right]
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    return out[0].permute(1, 2, 0).contiguous()


def unreadable() -> tuple[type[Exception], ...]:
    """What Pillow raises for a file it cannot decode (over MAX_IMAGE_PIXELS: a bomb, no OSError)."""
    return (OSError, SyntaxError, ValueError, EOFError, require_pillow().DecompressionBombError)


def why_unreadable(path: str) -> str:
    """Pillow's complaint about a file the workers could not decode (read again here)."""
    try:
        with require_pillow().open(path) as img:
            img.convert("RGB")
    except unreadable() as e:
        return f"{type(e).__name__}: {e}"
    return "it decodes now; was it being written to?"


class FolderDataset(torch.utils.data.Dataset):
    """A split as a map-style data set. Training keys are (epoch, rank, position, index), whence
    the augmentation's seed; evaluation keys are indices. An item is (uint8 image [size, size,
    3], label, index, ok); ok is False, and the image black, if the file could not be decoded."""

    def __init__(self, split: Split, size: int, train: bool, seed: int = 0, augment: bool = True,
                 decoder: str = "pillow"):
        self.split, self.size, self.train, self.seed = split, size, train, seed
        self.augment, self.decoder = augment, decoder

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        epoch, rank, position, index = key if self.train else (None, None, None, key)
        rng = np.random.default_rng((self.seed, epoch, rank, position)) if self.train and self.augment else None
        label = int(self.split.labels[index])
        try:
            image = load_image(self.split.path(index), self.size, rng, decoder=self.decoder)
            return image, label, index, True
        except unreadable():             # called only when something was raised
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), label, index, False


def make_loader(dataset: FolderDataset, batches: list[list], workers: int, pin_memory: bool):
    """A loader of the minibatches (lists of keys) in `batches`, read afresh at each pass: the main
    process replaces its contents (loader.batch_sampler[:] = ...), persistent workers serve them."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


class FolderSource:
    """A scanned folder as train.py's data source: minibatches of the sampler's draw, normalised
    on the device. The in-memory sets have the same interface (train.MemorySource)."""

    def __init__(self, folder: Folder, size: int, workers: int, device, seed: int = 0,
                 rank: int = 0, skip_corrupt: bool = False, augment: bool = True, decoder: str = "auto"):
        require_pillow()
        for split in (folder.train, folder.val):      # a Folder made by hand, not by scan()
            check_labels(split.labels, len(folder.classes), split.root)
        self.decoder = resolve_decoder(decoder)
        self.folder, self.device, self.rank = folder, torch.device(device), rank
        self.skip_corrupt, self.num_classes = skip_corrupt, len(folder.classes)
        self.num_train, self.num_test = len(folder.train), len(folder.val)
        self.digest = folder.digest()     # computed once: checked across ranks and on --resume
        self.norm = Normalizer(IMAGENET_STATS, self.device)
        self.skipped = 0                  # unreadable images met so far, training and validation
        self.wait_seconds = 0.0           # time the training loop spent waiting for a minibatch
        train = FolderDataset(folder.train, size, True, seed, augment, self.decoder)
        val = FolderDataset(folder.val, size, False, decoder=self.decoder)
        pin = self.device.type == "cuda"
        self._train, self._test = make_loader(train, [], workers, pin), make_loader(val, [], workers, pin)
        for loader in (self._train, self._test):    # no batches yet: this forks the workers now,
            list(loader)                            # before torch.compile starts its threads

    def train_batches(self, epoch: int, batches: list[Tensor]) -> Iterator[tuple]:
        """(idx, x, y, keep) per minibatch of indices: keep is None, or (with skip_corrupt) 0/1 floats
        marking the images that were read. The time spent waiting for the loader adds to wait_seconds."""
        position = itertools.count()              # in the epoch
        self._train.batch_sampler[:] = [[(epoch, self.rank, next(position), i) for i in idx.tolist()]
                                        for idx in batches]
        t0 = time.perf_counter()
        loader = iter(self._train)               # hands the running workers the new minibatches
        for idx in batches:
            images, labels, index, ok = next(loader)
            self.wait_seconds += time.perf_counter() - t0
            if not torch.equal(index, idx):
                raise RuntimeError("the loader returned another minibatch than it was given")
            keep = self._keep(self.folder.train, index, ok)
            yield idx, self._to_device(images), labels.to(self.device, non_blocking=True), keep
            t0 = time.perf_counter()

    def test_batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple]:
        """(x, y) for this rank's share of the validation set; y is -1 for skipped images."""
        mine = torch.arange(rank, self.num_test, world_size)
        self._test.batch_sampler[:] = [b.tolist() for b in mine.split(batch_size)]
        for images, labels, index, ok in self._test:
            self._keep(self.folder.val, index, ok)          # raises, or counts the skipped
            yield self._to_device(images), labels.where(ok, -1).to(self.device, non_blocking=True)

    def _to_device(self, images: Tensor) -> Tensor:
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)   # [B, 3, H, W] uint8
        return self.norm(x).contiguous()

    def _keep(self, split: Split, index: Tensor, ok: Tensor) -> Tensor | None:
        if bool(ok.all()):
            return None
        bad = index[~ok].tolist()
        if not self.skip_corrupt:
            path = split.path(bad[0])
            raise DataError(f"cannot read image {path} ({why_unreadable(path)}). Replace it with "
                            f"a good copy, or pass --skip-corrupt to train on without it.")
        self.skipped += len(bad)
        return ok.to(torch.float32)          # on the CPU, beside the indices the sampler reads

    def close(self) -> None:
        """Stops the worker processes now rather than when the loaders are garbage-collected."""
        for loader in (self._train, self._test):
            running = getattr(loader, "_iterator", None)      # persistent workers live here
            if hasattr(running, "_shutdown_workers"):
                running._shutdown_workers()
        self._train = self._test = None


def main(argv: list[str] | None = None) -> int:
    """`python imagefolder.py sort DIR/val LABELS`; exit status 2 and "error: ..." for bad data."""
    import argparse
    p = argparse.ArgumentParser(description="Sorts ImageNet's flat val/ folder into class folders (sort_flat_split).")
    p.add_argument("command", choices=["sort"])
    p.add_argument("split", help="the flat folder, e.g. /data/imagenet/val")
    p.add_argument("labels", help="'<image>,<class>' or '<image> <class>' lines, e.g. LOC_val_solution.csv")
    a = p.parse_args(argv)
    try:
        print(f"moved {sort_flat_split(a.split, a.labels)} images into class folders of {a.split}")
    except (DataError, OSError) as e:
        p.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
