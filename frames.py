"""Event-camera data sets (CIFAR10-DVS, DVS128 Gesture, N-MNIST) as frames, held in memory.

    ds, info = load_frames("data/CIFAR10DVS", T=10)    # uint8 counts [N, T, 2, H, W], int64 labels
    x = augment_frames(ds.x_train[idx].to(device).float(), generator)   # same shift for all T

Reads SpikingJelly's frames (`CIFAR10DVS(root, data_type='frame', frames_number=T, split_by=
'number')`, DVS128Gesture, NMNIST): ROOT/frames_number_{T}_split_by_number/[train|test/]<class>/
*.npz, float64 counts [T, 2, H, W] under the key `frames`. Or events, integrated as SpikingJelly
does: its ROOT/events_np/[train|test/]<class>/*.npz (t, x, y, p), or tonic's structured arrays
saved with np.save (*.npy, fields x, y, p, t). Nothing is unpickled.

Layout: train/ and test/ with the same class folders, or class folders only (CIFAR10-DVS has no
official split). Then `test_share` of each class (rounded; at least one, never all) is held out:
the files whose sha256(f"{seed}:{file name}") sorts first, the same split on every rank, process,
resume, library version and file system. Classes: the folder names, sorted; numerically if all are
integers (DVS128 Gesture's 0..10; SpikingJelly sorts them as strings, so its label 2 is gesture 10).
"""

from __future__ import annotations

import hashlib
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data import ArrayDataset, DataError, augment

# Defaults per data set. T: frames; sensor_size: the camera's (H, W); size: the network's input,
# to which frames are resized per batch on the device; model: the nearest network of models.py;
# shift, flip: augment_frames' arguments for training (shift 0 and no flip: no augmentation).
RECIPES = {
    # TET (Deng et al., ICLR 2022) and its released code: T=10, frames resized to 48x48, VGGSNN
    # (VGG-11's 8 conv layers), random flip and shift of up to 5 px. 90/10 split: PLIF's code.
    "cifar10dvs": dict(T=10, sensor_size=(128, 128), size=(48, 48), model="vgg11", shift=5, flip=True),
    # PLIF (Fang et al., ICCV 2021): T=20 at 128x128, no augmentation (a flip would turn the
    # left-hand gestures into right-hand ones). SEW ResNet (Fang et al., NeurIPS 2021): T=16.
    "dvs128gesture": dict(T=20, sensor_size=(128, 128), size=(128, 128), model="vgg11", shift=0, flip=False),
    # PLIF (Fang et al., ICCV 2021): T=10 at 34x34, no augmentation.
    "nmnist": dict(T=10, sensor_size=(34, 34), size=(34, 34), model="vgg11", shift=0, flip=False),
}
FRAMES_FOLDER = re.compile(r"frames_number_(\d+)_split_by_(number|time)")
SUFFIXES = (".npz", ".npy")


def load_frames(root, T: int | None = None, *, test_share: float = 0.1, seed: int = 0,
                sensor_size: tuple[int, int] | None = None) -> tuple[ArrayDataset, dict]:
    """The frames under `root` (SpikingJelly's data set root, a frames folder or a folder of events)
    as CPU tensors, and info: T, size (H, W), classes, layout, source ("frames"/"events"), folder,
    bytes (in memory), file_bytes (read), max_count, and clipped (counts above 255, clipped to uint8).
    T: frames per sample; required for events, checked against frames files if given. sensor_size:
    (H, W), checked against frames files; for events, else the largest y and x of the set + 1."""
    if (T is not None and int(T) < 1) or not 0 < test_share < 1:
        raise ValueError(f"load_frames needs T >= 1 and 0 < test_share < 1; got {T}, {test_share}")
    folder = find_folder(Path(root), T)
    layout, train, test, classes = scan(folder, test_share, seed)
    files = [path for path, _ in train + test]
    if "frames" in _load(files[0], ("frames",)):
        source, read, (T0, _, H, W) = "frames", _read_frames, _read_frames(files[0]).shape
    elif T is None:
        raise DataError(f"{files[0]} has no `frames` array: if {folder} holds events, pass T, the "
                        f"number of frames to integrate each sample into (e.g. 10; see frames.RECIPES).")
    else:
        source, T0, (H, W) = "events", T, sensor_size or _largest_xy(files)
        read = lambda path: integrate_events(*_load(path, ("t", "x", "y", "p"), required=True).values(), T, H, W)
    want = (int(T or T0), 2, *(sensor_size or (H, W)))
    origin = f"T and sensor_size if passed, else as in {files[0]}"
    info = {"clipped": 0, "max_count": 0, "file_bytes": 0}
    x_train, x_test = (_stack([p for p, _ in part], want, origin, read, info) for part in (train, test))
    labels = lambda part: torch.tensor([label for _, label in part], dtype=torch.int64)
    info.update(T=want[0], size=want[2:], classes=classes, layout=layout, source=source,
                folder=str(folder), bytes=x_train.nbytes + x_test.nbytes)
    return ArrayDataset(x_train, labels(train), x_test, labels(test), len(classes), source=str(folder)), info


def find_folder(root: Path, T: int | None) -> Path:
    """root's frames_number_{T}_split_by_* folder (the only one if T is None), else events_np, else root."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass SpikingJelly's data set root, a "
                        f"frames_number_*_split_by_* folder or a folder of event files.")
    found = sorted(d for d in root.iterdir() if d.is_dir() and FRAMES_FOLDER.fullmatch(d.name))
    pick = [d for d in found if T is None or int(FRAMES_FOLDER.fullmatch(d.name)[1]) == T]
    events = root / "events_np"
    if len(pick) == 1:
        return pick[0]
    if found and (pick or not events.is_dir()):
        raise DataError(f"{root} holds {', '.join(d.name for d in found)}, {len(pick)} of them for "
                        f"T={T}: pass the T of one, or the folder itself.")
    return events if events.is_dir() else root


def scan(folder: Path, test_share: float, seed: int):
    """(layout, train, test, classes); train, test: lists of (file, label), by class then name."""
    subfolders = lambda d: {p.name: p for p in d.iterdir() if p.is_dir()} if d.is_dir() else {}
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        parts, layout = {s: subfolders(folder / s) for s in ("train", "test")}, "train/test"
        if missing := sorted(set(parts["train"]) ^ set(parts["test"])):
            lack = "test" if missing[0] in parts["train"] else "train"
            raise DataError(f"{folder / lack / missing[0]} is missing: train/ and test/ need the same class folders.")
    else:
        parts, layout = {"": subfolders(folder)}, f"classes only, {test_share:g} of each held out (seed {seed})"
    names = list(parts.values())[0]
    classes = sorted(names, key=int if all(n.isdigit() for n in names) else str)
    if not classes:
        raise DataError(f"{folder} has no class folders: expected <class>/*.npz, or train/ and "
                        f"test/ holding them (SpikingJelly's layout).")
    train, test = [], []
    for label, name in enumerate(classes):
        files = [sorted(f for f in d[name].iterdir() if f.suffix.lower() in SUFFIXES) for d in parts.values()]
        for d, f in zip(parts.values(), files):
            if len(f) < 1 + (len(parts) == 1):
                raise DataError(f"{d[name]} holds {len(f)} .npz/.npy files; a class needs one in train/ and "
                                f"in test/, or two or more to be split.")
        if len(parts) == 1:
            order = sorted(files[0], key=lambda f: hashlib.sha256(f"{seed}:{f.name}".encode()).digest())
            n_test = min(max(round(test_share * len(order)), 1), len(order) - 1)
            files = sorted(order[n_test:]), sorted(order[:n_test])
        train += [(f, label) for f in files[0]]
        test += [(f, label) for f in files[1]]
    return layout, train, test, classes


def _load(path: Path, keys, required: bool = False) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz, or fields of a structured .npy, in that order: those present, or all."""
    try:
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.lib.npyio.NpzFile):
            with z:
                found = {k: z[k] for k in keys if k in z.files}
        else:
            found = {k: z[k] for k in keys if k in (z.dtype.names or ())}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}): truncated, damaged or not "
                        f"a numpy file (nothing is unpickled). Copy or write it again.") from e
    if required and len(found) < len(keys):
        raise DataError(f"{path} has no {', '.join(sorted(set(keys) - set(found)))} array: a set's files hold "
                        f"all `frames` (SpikingJelly's frames) or all t, x, y, p (events). Remove it.")
    return found


def _read_frames(path: Path) -> np.ndarray:
    a = _load(path, ("frames",), required=True)["frames"]
    if a.ndim != 4 or a.shape[1] != 2:
        raise DataError(f"{path}: frames of shape {a.shape}, expected [T, 2 polarities, H, W]: not a "
                        f"SpikingJelly frames file; remove it.")
    if a.dtype.kind not in "iuf" or not np.isfinite(a).all() or (a < 0).any() or (a != np.round(a)).any():
        raise DataError(f"{path}: its {a.dtype} frames hold negative, fractional, NaN or infinite values, "
                        f"not the event counts SpikingJelly writes (normalised?); write the counts again.")
    return a


def _largest_xy(paths: list[Path]) -> tuple[int, int]:
    """(H, W): the largest y and x over all files + 1."""
    H = W = 0
    for path in paths:
        ev = _load(path, ("x", "y"), required=True)
        if ev["x"].size and ev["y"].size:
            H, W = max(H, int(ev["y"].max()) + 1), max(W, int(ev["x"].max()) + 1)
    return H, W


def integrate_events(t, x, y, p, T: int, H: int, W: int) -> np.ndarray:
    """Events -> int64 frames [T, 2, H, W]: SpikingJelly's integrate_events_by_fixed_frames_number
    (events, 'number', T, H, W). The N events, in stored (time) order, go in runs of N // T to
    frames 0..T-2, the rest to frame T-1; channel 0 counts those with p == 0, channel 1 those with
    p == 1, at [y, x]. t serves only to check the length: the split is by event count."""
    t, x, y, p = (np.asarray(a).reshape(-1) for a in (t, x, y, p))
    n = len(t)
    if not len(x) == len(y) == len(p) == n:
        raise ValueError(f"t, x, y, p have different lengths ({n}, {len(x)}, {len(y)}, {len(p)})")
    xi, yi = x.astype(np.int64), y.astype(np.int64)
    if (xi != x).any() or (yi != y).any() or not np.isin(p, (0, 1)).all():
        raise ValueError("x and y must be whole numbers and p 0 (OFF) or 1 (ON): map them so first")
    if n and (min(xi.min(), yi.min()) < 0 or xi.max() >= W or yi.max() >= H):
        raise ValueError(f"events at x in [{xi.min()}, {xi.max()}], y in [{yi.min()}, {yi.max()}] lie outside "
                         f"the {H}x{W} sensor: pass the camera's sensor_size=(H, W) (frames.RECIPES)")
    frame = np.minimum(np.arange(n) // (n // T), T - 1) if n >= T else np.full(n, T - 1)
    index = ((frame * 2 + (p != 0)) * H + yi) * W + xi
    return np.bincount(index, minlength=T * 2 * H * W).reshape(T, 2, H, W)


def _stack(paths: list[Path], want: tuple, origin: str, read, info: dict) -> Tensor:
    """Every file's frames, checked against `want` and clipped into uint8 [N, *want]."""
    out = np.empty((len(paths), *want), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            a = read(path)
        except ValueError as e:         # integrate_events' bad events
            raise DataError(f"{path}: {e}") from e
        if a.shape != want:
            raise DataError(f"{path}: frames of shape {a.shape} [T, 2, H, W], expected {want} ({origin}): "
                            f"a set's files must agree; pass the T (and sensor size) they hold, or remove it.")
        info["max_count"] = max(info["max_count"], int(a.max(initial=0)))
        info["clipped"] += int(np.count_nonzero(a > 255))
        np.minimum(a, 255, out=out[i], casting="unsafe")
        info["file_bytes"] += path.stat().st_size
    return torch.from_numpy(out)


def resize_frames(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 counts [B, T, 2, H, W] -> float32 [B, T, 2, *size] on x's device by area interpolation: each
    pixel the mean count over the sensor pixels it covers (none dropped, as sampling would drop some)."""
    if x.shape[-2:] == tuple(size):
        return x.float()
    return F.interpolate(x.flatten(0, 1).float(), size=tuple(size), mode="area").unflatten(0, x.shape[:2])


def augment_frames(x: Tensor, generator: torch.Generator | None, *, shift: int = 5, flip: bool = True) -> Tensor:
    """A random shift by up to +-shift pixels and horizontal flip of a batch x [B, T, 2, H, W] on x's
    device, drawn per example from `generator`, the same for all its frames and polarities. Zero fill,
    not TET's roll, which would move events across the border. Apply after resizing (TET: +-5 px at 48x48)."""
    B, T, C, H, W = x.shape
    return augment(x.reshape(B, T * C, H, W), generator, pad=shift, flip=flip).view(B, T, C, H, W)
