"""frames.py on files written here exactly as SpikingJelly and tonic write them: frames as
np.savez_compressed(file, frames=float64 counts [T, 2, H, W]), events as SpikingJelly's events_np
.npz (t, x, y, p) or tonic's structured arrays saved with np.save."""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import frames
from data import DataError

HERE = os.path.dirname(os.path.abspath(__file__))


def save_frames(path, a):
    """As SpikingJelly's integrate_events_file_to_frames_file_by_fixed_frames_number saves them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, frames=np.asarray(a, dtype=np.float64))


def save_events(path, t, x, y, p):
    """.npz: SpikingJelly's events_np (np.savez_compressed, keys t, x, y, p); .npy: tonic's
    structured array (fields x, y, p, t), saved with np.save."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez_compressed(path, t=t, x=x, y=y, p=p)
    else:
        ev = np.zeros(len(t), dtype=[("x", "<i2"), ("y", "<i2"), ("p", "?"), ("t", "<i8")])
        ev["x"], ev["y"], ev["p"], ev["t"] = x, y, p, t
        np.save(path, ev)


def marked(i, T=2, H=3, W=4):
    """Frames whose pixel [0, 0, 0, 0] holds i: which file an example came from."""
    a = np.zeros((T, 2, H, W))
    a[0, 0, 0, 0] = i
    a[T - 1, 1, H - 1, W - 1] = 7
    return a


def sj_integrate(t, x, y, p, T, H, W):
    """split_by='number' as SpikingJelly defines it: frame j takes events [j*di, (j+1)*di),
    di = N // T, the last frame [(T-1)*di, N); one event at a time."""
    out, n = np.zeros((T, 2, H, W)), len(t)
    di = n // T
    for j in range(T):
        for i in range(j * di, n if j == T - 1 else (j + 1) * di):
            out[j, 0 if p[i] == 0 else 1, y[i], x[i]] += 1
    return out


def random_events(rng, n, H, W):
    t = np.sort(rng.integers(0, 10**6, n))
    return t, rng.integers(0, W, n), rng.integers(0, H, n), rng.integers(0, 2, n)


# -- integrate_events ---------------------------------------------------------------------------

def test_integrate_events_hand_worked():
    # 7 events, T=3: di = 7 // 3 = 2, so frames take events 0-1, 2-3 and 4-6.
    x = [0, 2, 1, 1, 0, 2, 2]
    y = [0, 1, 0, 0, 1, 0, 0]
    p = [1, 0, 1, 1, 0, 1, 0]
    want = np.zeros((3, 2, 2, 3), dtype=np.int64)     # [T, polarity, y, x]
    want[0, 1, 0, 0] = 1        # event 0: ON at (x=0, y=0)
    want[0, 0, 1, 2] = 1        # event 1: OFF at (x=2, y=1)
    want[1, 1, 0, 1] = 2        # events 2, 3: ON twice at (x=1, y=0)
    want[2, 0, 1, 0] = 1        # event 4: OFF at (x=0, y=1)
    want[2, 1, 0, 2] = 1        # event 5: ON at (x=2, y=0)
    want[2, 0, 0, 2] = 1        # event 6: OFF at (x=2, y=0), in the last frame with the remainder
    got = frames.integrate_events(np.arange(7), np.array(x, np.uint16), np.array(y, np.int16),
                                  np.array(p, bool), T=3, H=2, W=3)
    assert got.shape == (3, 2, 2, 3)
    np.testing.assert_array_equal(got, want)


def test_integrate_events_fewer_events_than_frames_go_to_the_last():
    got = frames.integrate_events([5, 9], [1, 0], [0, 0], [0, 1], T=3, H=1, W=2)
    want = np.zeros((3, 2, 1, 2), dtype=np.int64)
    want[2, 0, 0, 1] = want[2, 1, 0, 0] = 1             # di = 0: SpikingJelly's last frame takes all
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("x, y, p", [([3], [0], [0]), ([0], [2], [0]), ([-1], [0], [1]),    # off the 2x3 sensor
                                     ([0.5], [0], [1]), ([0], [0], [-1]), ([0, 1], [0], [0])])
def test_integrate_events_rejects_bad_events(x, y, p):
    with pytest.raises(ValueError):
        frames.integrate_events(np.zeros(len(p)), x, y, p, T=1, H=2, W=3)


# -- Layouts and the split ----------------------------------------------------------------------

def test_split_layout_dvs128_gesture(tmp_path):
    # SpikingJelly's DVS128 Gesture root: events_np and one frames folder; classes 0..10.
    folder = tmp_path / "frames_number_2_split_by_number"
    (tmp_path / "events_np").mkdir()
    for c in range(11):
        for split, n in (("train", 2), ("test", 1)):
            for k in range(n):
                mark = c * 3 + k + (split == "test") * 2                # train: 3c, 3c+1; test: 3c+2
                save_frames(folder / split / str(c) / f"user{k:02d}_{c}.npz", marked(mark))
    ds, info = frames.load_frames(tmp_path)
    assert info["classes"] == [str(c) for c in range(11)]           # 10 after 9, not after 1
    assert (info["T"], info["size"], info["source"], info["layout"]) == (2, (3, 4), "frames", "train/test")
    assert info["folder"] == str(folder) and ds.num_classes == 11
    assert ds.x_train.shape == (22, 2, 2, 3, 4) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (11, 2, 2, 3, 4) and ds.y_test.dtype == torch.int64
    assert ds.y_train.tolist() == [c for c in range(11) for _ in range(2)]
    assert ds.x_train[:, 0, 0, 0, 0].tolist() == [c * 3 + k for c in range(11) for k in range(2)]
    assert ds.x_test[:, 0, 0, 0, 0].tolist() == [c * 3 + 2 for c in range(11)]
    assert (ds.x_test[:, 1, 1, 2, 3] == 7).all()
    assert info["bytes"] == 33 * 2 * 2 * 3 * 4 and info["file_bytes"] > 0
    assert (info["clipped"], info["max_count"]) == (0, 32)


def make_cifar10dvs(root, sizes, T=2):
    """SpikingJelly's unsplit CIFAR10-DVS frames: <class>/cifar10_<class>_<i>.npz, markers by class."""
    for c, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            save_frames(root / name / f"cifar10_{name}_{i}.npz", marked(c * 50 + i, T=T))


def by_class(ds, split):
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    return {c: sorted(x[y == c][:, 0, 0, 0, 0].tolist()) for c in y.unique().tolist()}


def test_no_split_layout_holds_out_a_share_of_each_class(tmp_path):
    make_cifar10dvs(tmp_path, {"dog": 20, "airplane": 30, "cat": 3, "bird": 2})
    ds, info = frames.load_frames(tmp_path)
    assert info["classes"] == ["airplane", "bird", "cat", "dog"] and info["layout"].startswith("classes only")
    train, test = by_class(ds, "train"), by_class(ds, "test")
    # per class: round(10%), at least one, never all: 30 -> 3, 20 -> 2, 3 -> 1, 2 -> 1
    marks = {0: range(50, 80), 1: range(150, 152), 2: range(100, 103), 3: range(0, 20)}
    for label, n_test in ((0, 3), (1, 1), (2, 1), (3, 2)):
        assert len(test[label]) == n_test
        assert set(train[label]).isdisjoint(test[label])
        assert sorted(train[label] + test[label]) == list(marks[label])
    # the documented rule: the files whose sha256("seed:name") sorts first
    names = [f"cifar10_dog_{i}.npz" for i in range(20)]
    first = sorted(names, key=lambda n: hashlib.sha256(f"0:{n}".encode()).digest())[:2]
    assert test[3] == sorted(int(n.split("_")[2][:-4]) for n in first)
    again, _ = frames.load_frames(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ds[:4], again[:4]))
    other, _ = frames.load_frames(tmp_path, seed=1)
    assert by_class(other, "test") != test


def test_examples_ignore_the_listing_order(tmp_path, monkeypatch):
    make_cifar10dvs(tmp_path / "cifar", {"dog": 20, "cat": 20, "ship": 5})
    for split in ("train", "test"):
        make_cifar10dvs(tmp_path / "nmnist" / split, {"3": 4, "1": 3, "2": 4})
    sets = [frames.load_frames(tmp_path / name)[0] for name in ("cifar", "nmnist")]
    listing = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: reversed(sorted(listing(self))))
    for name, ds in zip(("cifar", "nmnist"), sets):
        again, _ = frames.load_frames(tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(ds[:4], again[:4])), name


def test_split_is_the_same_in_another_process(tmp_path):
    make_cifar10dvs(tmp_path, {"dog": 20, "cat": 20})
    ds, _ = frames.load_frames(tmp_path)
    code = "import frames, sys; print(frames.load_frames(sys.argv[1])[0].x_test[:, 0, 0, 0, 0].tolist())"
    env = dict(os.environ, PYTHONHASHSEED=str(1 + hash("x") % 1000))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=HERE, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(ds.x_test[:, 0, 0, 0, 0].tolist())


def test_root_with_several_frames_folders(tmp_path):
    for T in (2, 3):
        make_cifar10dvs(tmp_path / f"frames_number_{T}_split_by_number", {"a": 2, "b": 2}, T=T)
    with pytest.raises(DataError, match="frames_number_2_split_by_number, frames_number_3_split_by_number"):
        frames.load_frames(tmp_path)
    assert frames.load_frames(tmp_path, T=3)[1]["T"] == 3


# -- Events -------------------------------------------------------------------------------------

def write_event_sets(root, T=3, H=5, W=7, seed=0):
    """The same events as SpikingJelly's events_np (.npz), as tonic's .npy and as frames
    integrated by sj_integrate; train/ and test/, 2 classes. One event sits at (W-1, H-1)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("0", "1"):
            for k in range(n):
                t, x, y, p = random_events(rng, int(rng.integers(T, 60)), H, W)
                x[-1], y[-1] = W - 1, H - 1
                name = f"{split}/{c}/{k}"
                save_events(root / "events_np" / f"{name}.npz", t, x, y, p)
                save_events(root / "tonic" / f"{name}.npy", t, x, y, p)
                save_frames(root / f"frames_number_{T}_split_by_number" / f"{name}.npz",
                            sj_integrate(t, x, y, p, T, H, W))


def test_events_give_the_frames_integrated_from_them(tmp_path):
    write_event_sets(tmp_path)
    want, info = frames.load_frames(tmp_path / "frames_number_3_split_by_number")
    for folder in ("events_np", "tonic"):
        got, got_info = frames.load_frames(tmp_path / folder, T=3)
        assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4])), folder
        assert (got_info["source"], got_info["size"], got_info["T"]) == ("events", (5, 7), 3)
    got, _ = frames.load_frames(tmp_path, T=4)              # no frames folder for T=4: events_np
    assert got.x_train.shape[1:] == (4, 2, 5, 7)
    got, got_info = frames.load_frames(tmp_path / "tonic", T=3, sensor_size=(6, 9))
    assert got_info["size"] == (6, 9) and torch.equal(got.x_train[..., :5, :7], want.x_train)


def test_events_need_T(tmp_path):
    write_event_sets(tmp_path)
    with pytest.raises(DataError, match="pass T"):
        frames.load_frames(tmp_path / "events_np")


def test_reads_what_spikingjelly_writes(tmp_path):
    sj = pytest.importorskip("spikingjelly.datasets")
    rng, T, H, W = np.random.default_rng(1), 4, 6, 5
    for c in ("0", "1"):
        for k in range(3):
            t, x, y, p = random_events(rng, int(rng.integers(1, 80)), H, W)
            events = {"t": t, "x": x, "y": y, "p": p}
            save_frames(tmp_path / "frames" / c / f"{k}.npz",
                        sj.integrate_events_by_fixed_frames_number(events, "number", T, H, W))
            save_events(tmp_path / "events" / c / f"{k}.npz", t, x, y, p)
    want, _ = frames.load_frames(tmp_path / "frames")
    got, _ = frames.load_frames(tmp_path / "events", T=T, sensor_size=(H, W))
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))


def test_counts_above_255_are_clipped_and_counted(tmp_path):
    make_cifar10dvs(tmp_path, {"a": 2, "b": 2})
    for name, count in (("a/cifar10_a_0.npz", 300), ("b/cifar10_b_1.npz", 256)):
        a = marked(0)
        a[1, 0, 2, 1] = count
        save_frames(tmp_path / name, a)
    ds, info = frames.load_frames(tmp_path)
    assert (info["clipped"], info["max_count"]) == (2, 300)
    x = torch.cat([ds.x_train, ds.x_test])
    assert sorted(x[:, 1, 0, 2, 1].tolist()) == [0, 0, 255, 255]


# -- Bad input: a DataError naming the file -----------------------------------------------------

class Boom:
    """Unpickling this would create the folder its __reduce__ names."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def damage(kind, path):
    """Spoil one file of a valid set (T=2, 2 polarities, H=3, W=4); returns the file to name."""
    good = marked(1)
    shapes = {"rank": (2, 3, 4), "channels": (2, 3, 3, 4), "T": (3, 2, 3, 4), "H": (2, 2, 4, 4), "W": (2, 2, 3, 5)}
    values = {"nan": np.nan, "inf": np.inf, "negative": -1.0, "fractional": 0.5}
    if kind in shapes:
        save_frames(path, np.zeros(shapes[kind]))
    elif kind in values:
        good[0, 1, 1, 1] = values[kind]
        save_frames(path, good)
    elif kind == "no frames key":
        np.savez_compressed(path, data=good)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "corrupted":                                    # a bad CRC inside a whole archive
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3:len(raw) // 3 + 20] = bytes(20)
        path.write_bytes(raw)
    elif kind == "not numpy":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif kind == "pickle":
        path.unlink()
        path = path.with_suffix(".npy")
        np.save(path, np.array([Boom(str(path.parent / "unpickled"))], dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize("kind", ["rank", "channels", "T", "H", "W", "nan", "inf", "negative", "fractional",
                                  "no frames key", "truncated", "corrupted", "not numpy", "pickle"])
def test_a_bad_frames_file_is_named(tmp_path, kind):
    make_cifar10dvs(tmp_path, {"a": 3, "b": 3})
    bad = damage(kind, tmp_path / "b" / "cifar10_b_2.npz")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        frames.load_frames(tmp_path)
    assert not (tmp_path / "b" / "unpickled").exists()


def test_a_bad_first_file_is_named(tmp_path):
    make_cifar10dvs(tmp_path, {"a": 3, "b": 3})
    bad = damage("no frames key", tmp_path / "a" / "cifar10_a_0.npz")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        frames.load_frames(tmp_path)


def test_T_asked_differs_from_the_files(tmp_path):
    make_cifar10dvs(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "a")) + r"/cifar10_a_\d\.npz: frames of "
                                        r"shape \(2, 2, 3, 4\).*expected \(5, 2, 3, 4\)"):
        frames.load_frames(tmp_path, T=5)


@pytest.mark.parametrize("folder", ["events_np", "tonic"])
def test_events_off_the_sensor_are_named(tmp_path, folder):
    write_event_sets(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / folder / "train" / "0" / "0")) + r"\.np[zy]: .*4x7"):
        frames.load_frames(tmp_path / folder, T=3, sensor_size=(4, 7))


def test_events_file_without_events(tmp_path):
    write_event_sets(tmp_path)
    bad = tmp_path / "events_np" / "test" / "1" / "1.npz"
    np.savez_compressed(bad, t=np.arange(3), x=np.zeros(3), y=np.zeros(3))
    with pytest.raises(DataError, match=re.escape(str(bad))):
        frames.load_frames(tmp_path / "events_np", T=3, sensor_size=(5, 7))


def test_empty_class_and_class_missing_from_test(tmp_path):
    make_cifar10dvs(tmp_path / "frames", {"a": 3, "b": 3})
    (tmp_path / "frames" / "c").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'frames' / 'c'} holds 0")):
        frames.load_frames(tmp_path / "frames")
    make_cifar10dvs(tmp_path / "one", {"a": 3, "b": 1})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'one' / 'b'} holds 1")):
        frames.load_frames(tmp_path / "one")
    for split in ("train", "test"):
        make_cifar10dvs(tmp_path / "split" / split, {"a": 1, "b": 1})
    make_cifar10dvs(tmp_path / "split" / "train", {"c": 1})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'split' / 'test' / 'c'} is missing")):
        frames.load_frames(tmp_path / "split")
    with pytest.raises(DataError, match="not a folder"):
        frames.load_frames(tmp_path / "nowhere")


# -- Augmentation -------------------------------------------------------------------------------

def test_augment_frames_moves_all_frames_of_an_example_alike():
    B, T, H, W = 64, 3, 8, 9
    base = torch.rand(1, 1, 1, H, W) + 0.5                     # no zeros inside the image
    scale = torch.arange(1, 2 * T + 1, dtype=torch.float32).view(1, T, 2, 1, 1)
    x = (base * scale).expand(B, T, 2, H, W)                   # frame (t, c) = base * (2t + c + 1)
    out = frames.augment_frames(x, torch.Generator().manual_seed(0), shift=2)
    torch.testing.assert_close(out, out[:, :1, :1] * scale)     # same shift and flip for every (t, c)
    assert len({tuple(o[0, 0].flatten().tolist()) for o in out}) > 20    # examples differ


def test_augment_frames_shift_range_and_zero_fill():
    B, H, W, k = 1000, 9, 9, 2
    x = torch.zeros(B, 2, 2, H, W)
    x[:, :, :, 4, 3] = 1.0                                     # one event, left of the centre
    out = frames.augment_frames(x, torch.Generator().manual_seed(0), shift=k)
    assert out.sum(dim=(1, 2, 3, 4)).eq(4).all()                # moved, never wrapped or lost here
    rows, cols = out[:, 0, 0].nonzero()[:, 1:].T
    assert set(rows.tolist()) == set(range(4 - k, 4 + k + 1))
    assert set(cols.tolist()) == set(range(3 - k, 3 + k + 1)) | set(range(5 - k, 5 + k + 1))   # 5: mirrored
    edge = torch.zeros(1, 1, 2, 5, 5)
    edge[..., :, 0] = 1.0                                       # a column of events at the left edge
    sums = {frames.augment_frames(edge, torch.Generator().manual_seed(s), shift=1, flip=False).sum().item()
            for s in range(20)}
    assert 0.0 in sums and sums <= {0.0, 8.0, 10.0}             # shifted out (zero fill, no roll)


def test_augment_frames_reproducible_from_the_generator_state():
    x = torch.rand(8, 4, 2, 10, 10)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = frames.augment_frames(x, g)
    b = frames.augment_frames(x, g)
    g.set_state(state)
    assert torch.equal(frames.augment_frames(x, g), a) and not torch.equal(a, b)
    assert torch.equal(frames.augment_frames(x, g, shift=0, flip=False), x)


def test_resize_frames_keeps_the_total_count_and_each_frame_apart():
    x = torch.zeros(2, 3, 2, 8, 8, dtype=torch.uint8)
    x[0, 1, 0, 2:6, 2:6] = 4                     # frame 1, polarity 0 of example 0 only
    y = frames.resize_frames(x, (4, 4))
    assert y.shape == (2, 3, 2, 4, 4) and y.dtype == torch.float32
    assert y[0, 1, 0].sum() * 4 == pytest.approx(float(x[0, 1, 0].sum()))   # area-averaged: counts / 4
    assert y.sum() == y[0, 1, 0].sum()           # no count leaks to another frame, polarity or example
    assert torch.equal(frames.resize_frames(x, (8, 8)), x.float())


def learnable_nmnist(root, n_train=30, n_test=10, T=4, side=34, seed=0):
    """N-MNIST's layout (train/ and test/ class folders of SpikingJelly frames): class c fires in
    band c of the sensor, at a place that moves over time, plus noise everywhere."""
    rng = np.random.default_rng(seed)
    for split, n in ("train", n_train), ("test", n_test):
        for c in range(3):
            for i in range(n):
                a = rng.poisson(0.05, (T, 2, side, side)).astype(np.float64)
                for t in range(T):
                    rows = slice(c * side // 3, (c + 1) * side // 3)
                    cols = slice(t * side // T, (t + 1) * side // T)
                    a[t, c % 2, rows, cols] += rng.poisson(2.0, a[t, 0, rows, cols].shape)
                save_frames(root / f"frames_number_{T}_split_by_number" / split / str(c) / f"{i}.npz", a)
    return root


FRAMES_RUN = ["--data", "nmnist", "--T", "4", "--model", "convnet", "--image-size", "16", "--epochs", "5",
              "--batch-size", "8", "--ratio", "0.3", "--device", "cpu", "--no-compile", "--quiet"]


def test_train_py_learns_an_event_set_with_sadp(tmp_path):
    import train
    root = learnable_nmnist(tmp_path / "NMNIST")
    assert train.main(FRAMES_RUN + ["--data-dir", str(root), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["final_test_acc"] >= 0.8                      # chance: 1/3
    assert summary["example_passes"] == 5 * round(0.7 * 90)


def test_train_py_event_set_errors_exit_2(tmp_path, capsys):
    import train
    root = learnable_nmnist(tmp_path / "NMNIST", n_train=2, n_test=1)
    assert train.main(FRAMES_RUN + ["--data-dir", str(root), "--T", "5", "--out", str(tmp_path / "a")]) == 2
    assert "frames_number_4_split_by_number" in capsys.readouterr().err      # the T the folder holds
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data", "nmnist"])
    assert e.value.code == 2 and "needs --data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "cifar10", "--image-size", "16"])
    assert "--image-size is for --data imagenet, imagefolder and the event sets" in capsys.readouterr().err


def test_event_batches_are_resized_and_augmented_on_the_device(tmp_path):
    import train
    root = learnable_nmnist(tmp_path / "NMNIST", n_train=2, n_test=1)
    args = train.parse_args(["--data", "cifar10dvs", "--data-dir", str(root), "--T", "4", "--image-size", "24",
                             "--model", "convnet", "--device", "cpu"])
    recipe = dict(frames.RECIPES["cifar10dvs"], sensor_size=(34, 34))
    gen = torch.Generator().manual_seed(0)
    with pytest.MonkeyPatch.context() as m:
        m.setitem(frames.RECIPES, "cifar10dvs", recipe)          # the no-split set's flip + shift
        source = train.event_source(args, torch.device("cpu"), gen, lambda *a: None)
    (idx, x, y, keep), = source.train_batches(0, [torch.arange(6)])
    assert x.shape == (6, 4, 2, 24, 24) and x.dtype == torch.float32 and keep is None
    plain = frames.resize_frames(source.x_train[:6], (24, 24))
    assert not torch.equal(x, plain)                            # flipped or shifted
    (xt, yt), = source.test_batches(0, 1, 100)
    assert torch.equal(xt, frames.resize_frames(source.x_test, (24, 24)))   # test frames: resized only


def test_torchrun_two_processes_train_an_event_set(tmp_path):
    from test_distributed import _torchrun
    root = learnable_nmnist(tmp_path / "NMNIST")
    code, out = _torchrun(FRAMES_RUN + ["--data-dir", str(root), "--out", str(tmp_path / "ddp")], timeout=300)
    assert code == 0, out
    summary = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert summary["final_test_acc"] >= 0.8 and summary["world_size"] == 2


def test_a_set_that_does_not_fit_on_the_device_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import train
    root = learnable_nmnist(tmp_path / "NMNIST", n_train=2, n_test=1)

    real_to = torch.Tensor.to

    def out_of_memory(self, *args, **kwargs):         # the frames [N, T, 2, H, W] do not fit
        if self.dim() == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.05 GiB")
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    assert train.main(FRAMES_RUN + ["--data-dir", str(root), "--out", str(tmp_path / "run")]) == 2
    assert "does not fit in cpu's memory" in capsys.readouterr().err


def test_an_event_set_run_resumes_exactly(tmp_path, assert_same_checkpoint):
    import train
    root = learnable_nmnist(tmp_path / "NMNIST", n_train=8, n_test=2)
    run = FRAMES_RUN + ["--data-dir", str(root), "--data", "cifar10dvs", "--epochs", "3"]   # flip + shift drawn
    with pytest.MonkeyPatch.context() as m:
        m.setitem(frames.RECIPES, "cifar10dvs", dict(frames.RECIPES["cifar10dvs"], sensor_size=(34, 34)))
        assert train.main(run + ["--out", str(tmp_path / "whole")]) == 0
        assert train.main(run + ["--out", str(tmp_path / "split"), "--stop-after", "1"]) == 0
        assert train.main(run + ["--out", str(tmp_path / "split"), "--resume"]) == 0
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "split", 3)
