"""The streaming data path (imagefolder.py, --data imagefolder): a tiny ImageFolder of real JPEG
files written by the tests, read by DataLoader workers, end to end through train.py."""

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import imagefolder
import train
from data import DataError

Image = pytest.importorskip("PIL.Image", reason="the streaming path decodes with Pillow")

CLASSES = ("cat", "dog", "owl")


def write_folder(root, train_per_class=6, val_per_class=2, seed=0):
    """DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG: noise images of 40-90 px whose class
    sets one colour channel (learnable, and of assorted sizes and aspect ratios)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name))
            for i in range(n):
                w, h = rng.integers(40, 90, size=2)
                pixels = (rng.random((h, w, 3)) * 120).astype(np.uint8)
                pixels[..., label] += 120
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.JPEG"), quality=90)
    return str(root)


def flatten_val(root):
    """ImageNet's val/ as it ships (val_<class>_<file>, no class folders); {file: class}."""
    truth = {}
    for name in CLASSES:
        for f in sorted(os.listdir(os.path.join(root, "val", name))):
            truth[f"val_{name}_{f}"] = name
            os.rename(os.path.join(root, "val", name, f), os.path.join(root, "val", f"val_{name}_{f}"))
        os.rmdir(os.path.join(root, "val", name))
    return truth


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imagefolder") / "ds")


def flags(data_dir, out, *extra):
    return ["--data", "imagefolder", "--data-dir", data_dir, "--model", "convnet", "--device", "cpu",
            "--no-compile", "--image-size", "32", "--workers", "2", "--batch-size", "4", "--T", "2",
            "--lr", "0.05", "--quiet", "--out", str(out), *extra]


def run(*argv):
    return train.run(train.parse_args(list(argv)))


# -- The layout ---------------------------------------------------------------------------------

def test_scan_lists_classes_files_and_labels_in_a_fixed_order(folder, tmp_path):
    f = imagefolder.scan(folder)
    assert f.classes == CLASSES
    assert len(f.train) == 18 and len(f.val) == 6
    for split in (f.train, f.val):
        for i in range(len(split)):
            path = split.path(i)
            assert os.path.isfile(path)
            assert os.path.basename(os.path.dirname(path)) == CLASSES[int(split.labels[i])]
    assert imagefolder.scan(folder).digest() == f.digest()
    copy = write_folder(tmp_path / "copy")
    os.rename(os.path.join(copy, "train", "owl", "5.JPEG"), os.path.join(copy, "train", "owl", "9.JPEG"))
    assert imagefolder.scan(copy).digest() != f.digest()          # another file: another digest


def _no_val(root):
    os.rename(os.path.join(root, "val"), os.path.join(root, "validation"))


def _empty_class(root):
    os.makedirs(os.path.join(root, "train", "emu"))
    os.makedirs(os.path.join(root, "val", "emu"))


def _class_missing_from_val(root):
    for f in os.listdir(os.path.join(root, "val", "dog")):
        os.remove(os.path.join(root, "val", "dog", f))
    os.rmdir(os.path.join(root, "val", "dog"))


@pytest.mark.parametrize("break_it, message", [
    (None, "not a folder"),
    (_no_val, "has no val/ folder"),
    (flatten_val, "outside class folders"),
    (_empty_class, "hold no image"),
    (_class_missing_from_val, "have no folder in"),
])
def test_a_wrong_layout_is_named_before_any_training(tmp_path, capsys, break_it, message):
    root = tmp_path / "ds"
    if break_it is not None:                 # None: no folder at all
        write_folder(root, 2, 1)
        break_it(str(root))
    with pytest.raises(DataError, match=message):
        imagefolder.scan(root)
    assert train.main(flags(str(root), tmp_path / "run")) == 2
    err = capsys.readouterr()
    assert message in err.err and str(root) in err.err
    assert "epoch" not in err.out                                  # nothing trained
    assert not os.path.exists(tmp_path / "run" / "results.json")


def test_a_flat_val_folder_is_sorted_by_a_labels_file_and_then_scans(tmp_path):
    import subprocess
    root = write_folder(tmp_path / "ds", 2, 2)
    truth = flatten_val(root)
    with pytest.raises(DataError, match="imagefolder.py sort"):
        imagefolder.scan(root)
    # Kaggle's LOC_val_solution.csv: a header, ids without extension, the class + boxes
    lines = ["ImageId,PredictionString"] + [f"{os.path.splitext(f)[0]},{c} 1 2 3 4 {c} 5 6 7 8"
                                            for f, c in truth.items()]
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("\n".join(lines[:-1]) + "\n")           # one image unlabelled
    with pytest.raises(DataError, match="no label for 1 of the 6 images"):
        imagefolder.sort_flat_split(os.path.join(root, "val"), labels)
    assert len(os.listdir(os.path.join(root, "val"))) == 6      # nothing moved
    labels.write_text("\n".join(lines) + "\n")
    cli = subprocess.run([sys.executable, "imagefolder.py", "sort", os.path.join(root, "val"), str(labels)],
                         cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    assert cli.returncode == 0 and "moved 6 images" in cli.stdout, cli.stderr
    f = imagefolder.scan(root)
    for i in range(len(f.val)):
        assert truth[os.path.basename(f.val.path(i))] == f.classes[int(f.val.labels[i])]
    assert imagefolder.sort_flat_split(os.path.join(root, "val"), labels) == 0   # again: nothing


def test_images_anywhere_below_a_class_folder_belong_to_it_as_in_torchvision(tmp_path):
    root = write_folder(tmp_path / "ds", 2, 1)
    owl = os.path.join(root, "train", "owl")
    os.makedirs(os.path.join(owl, "2024", "night"))
    os.replace(os.path.join(owl, "0.JPEG"), os.path.join(owl, "2024", "a.JPEG"))
    os.replace(os.path.join(owl, "1.JPEG"), os.path.join(owl, "2024", "night", "b.JPEG"))
    os.symlink(os.path.join(root, "val", "owl"), os.path.join(owl, "linked"))    # followed
    os.makedirs(os.path.join(owl, ".cache"))                                     # hidden: skipped
    Image.new("RGB", (8, 8)).save(os.path.join(owl, ".cache", "thumb.JPEG"))
    f = imagefolder.scan(root)
    owls = [p.decode() for p, y in zip(f.train.paths, f.train.labels) if f.classes[y] == "owl"]
    assert owls == ["owl/2024/a.JPEG", "owl/2024/night/b.JPEG", "owl/linked/0.JPEG"]
    assert len(f.train) == 2 + 2 + 3


def _no_permission(owl, monkeypatch):
    os.makedirs(os.path.join(owl, "locked"))
    real = os.scandir
    def scandir(path="."):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)      # tests run as root, which chmod cannot stop


@pytest.mark.parametrize("break_it, name, message", [
    (lambda owl, _: os.symlink("..", os.path.join(owl, "up")), "up", "symbolic link loop"),
    (lambda owl, _: os.symlink("self", os.path.join(owl, "self")), "self", "Too many levels of symbolic"),
    (lambda owl, _: os.symlink("/nowhere/9.JPEG", os.path.join(owl, "9.JPEG")), "9.JPEG", "broken symbolic"),
    (_no_permission, "locked", "Permission denied"),
])
def test_an_entry_that_cannot_be_read_is_named_not_skipped_or_walked_forever(tmp_path, monkeypatch,
                                                                              break_it, name, message):
    root = write_folder(tmp_path / "ds", 2, 1)
    owl = os.path.join(root, "train", "owl")
    break_it(owl, monkeypatch)
    with pytest.raises(DataError, match=message) as err:
        imagefolder.scan(root)
    assert os.path.join(owl, name) in str(err.value)


def test_a_single_class_is_refused_at_the_scan(tmp_path):
    root = write_folder(tmp_path / "ds", 2, 1)
    for split in ("train", "val"):
        for name in ("dog", "owl"):
            for f in os.listdir(os.path.join(root, split, name)):
                os.remove(os.path.join(root, split, name, f))
            os.rmdir(os.path.join(root, split, name))
    with pytest.raises(DataError, match="at least 2 classes") as err:
        imagefolder.scan(root)
    assert os.path.join(root, "train") in str(err.value)


def labels_file(truth, renamed=(), encoding="utf-8"):
    """A header, then "<file>,<class>" per image, with the classes in `renamed` renamed."""
    renamed = dict(renamed)
    lines = ["ImageId,PredictionString"] + [f"{f},{renamed.get(c, c)}" for f, c in truth.items()]
    return "\n".join(lines).encode(encoding)


@pytest.mark.parametrize("write, message", [
    (lambda t: labels_file(t, {"dog": "d\xf6g"}, "latin-1"), "is not UTF-8 text (line 4"),
    (lambda t: bytes(range(256)) * 4, "is not UTF-8 text (line 3, byte 115"),   # after \n, \r
    (lambda t: labels_file(t, {"dog": "d\0g"}), "a NUL byte"),
    (lambda t: labels_file(t, {"owl": "o" * 300}), "300 bytes, over the"),
    (lambda t: labels_file(t, {"cat": ".."}), "not folder names"),
])
def test_sort_checks_the_whole_labels_file_before_moving_anything(tmp_path, write, message):
    root = write_folder(tmp_path / "ds", 2, 2)
    truth = flatten_val(root)
    labels = tmp_path / "labels.txt"
    labels.write_bytes(write(truth))
    with pytest.raises(DataError, match=re.escape(message)) as err:
        imagefolder.sort_flat_split(os.path.join(root, "val"), labels)
    assert str(labels) in str(err.value) and "nothing was moved" in str(err.value)
    assert sorted(os.listdir(os.path.join(root, "val"))) == sorted(truth)


def test_sort_reads_a_labels_file_with_a_byte_order_mark(tmp_path):
    root = write_folder(tmp_path / "ds", 2, 1)
    truth = flatten_val(root)
    labels = tmp_path / "labels.csv"                  # what Excel's "CSV UTF-8" writes
    labels.write_text("".join(f"{f},{c}\n" for f, c in truth.items()), encoding="utf-8-sig")
    assert imagefolder.sort_flat_split(os.path.join(root, "val"), labels) == 3


def test_sort_interrupted_midway_says_so_and_a_rerun_moves_the_rest(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "ds", 2, 2)
    truth = flatten_val(root)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{f} {c}\n" for f, c in truth.items()))
    replace, calls = os.replace, []
    def failing(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(DataError, match="2 of the 6 images were moved") as err:
        imagefolder.sort_flat_split(os.path.join(root, "val"), labels)
    assert "Input/output error" in str(err.value) and "run the same command again" in str(err.value)
    monkeypatch.setattr(os, "replace", replace)
    assert imagefolder.sort_flat_split(os.path.join(root, "val"), labels) == 4
    assert len(imagefolder.scan(root).val) == 6


def test_sort_never_replaces_an_image_already_in_a_class_folder(tmp_path):
    root = write_folder(tmp_path / "ds", 2, 1)
    truth = flatten_val(root)
    first = next(iter(truth))
    os.makedirs(os.path.join(root, "val", truth[first]))
    with open(os.path.join(root, "val", truth[first], first), "wb") as f:
        f.write(b"another image")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{f} {c}\n" for f, c in truth.items()))
    with pytest.raises(DataError, match="already"):
        imagefolder.sort_flat_split(os.path.join(root, "val"), labels)
    with open(os.path.join(root, "val", truth[first], first), "rb") as f:
        assert f.read() == b"another image"


def test_sort_command_reports_a_bad_labels_file_as_an_error_not_a_traceback(tmp_path):
    import subprocess
    root = write_folder(tmp_path / "ds", 2, 1)
    flatten_val(root)
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"val_cat_0.JPEG caf\xe9\n")
    cli = subprocess.run([sys.executable, "imagefolder.py", "sort", os.path.join(root, "val"), str(labels)],
                         cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.startswith("error: ") and "Traceback" not in cli.stderr


# -- Decoding and augmentation -------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_crop_box_lies_in_the_image_with_an_allowed_aspect_ratio(width, height, seed):
    left, top, right, bottom = imagefolder.crop_box(width, height, np.random.default_rng(seed))
    w, h = right - left, bottom - top
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    lo, hi = imagefolder.CROP_RATIO
    if min(width, height) >= 8:       # up to rounding: w = a h for some allowed a, or the whole side
        assert lo * h - 1 <= w <= hi * h + 1 or w == width or h == height


def test_crop_box_area_and_aspect_follow_their_distributions():
    rng = np.random.default_rng(0)
    boxes = np.array([imagefolder.crop_box(400, 400, rng) for _ in range(8000)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    share, log_aspect = w * h / 400**2, np.log(w / h)
    assert share.min() >= 0.075 and share.max() <= 1.0
    assert np.log(3 / 4) - 0.02 <= log_aspect.min() and log_aspect.max() <= np.log(4 / 3) + 0.02
    assert abs(log_aspect.mean()) < 0.01                          # a square image: symmetric
    # every draw with area share <= 3/4 * 3/4 fits a square at any allowed aspect, so the
    # accepted shares are uniform there: four equal bins hold equal counts
    counts, _ = np.histogram(share, bins=4, range=(0.08, 0.5625))
    assert counts.sum() > 0.5 * len(share)
    assert (abs(counts / counts.mean() - 1) < 0.1).all(), counts
    centre = (boxes[:, 0] + boxes[:, 2]) / 2
    assert abs(centre.mean() - 200) < 4                            # placed without bias


def smooth_photo(path, width=800, height=600, detail=1.0):
    """A smooth, photo-like JPEG: colour fields of low frequency (times `detail`), where DCT
    downscaling and either decoder's resize are exact enough to compare against each other."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height) * detail
    pixels = np.stack([np.sin(6 * x + 1) * np.cos(5 * y), np.cos(7 * x * y + 2 * y),
                       np.sin(4 * (x + y))], -1)
    Image.fromarray(((pixels + 1) * 127.5).astype(np.uint8)).save(path, quality=95)
    return str(path)


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3, 4, 5])    # None: the evaluation crop
def test_reduced_size_jpeg_decoding_gives_the_image_full_decoding_gives(tmp_path, seed):
    path = smooth_photo(tmp_path / "photo.jpg")
    rng = lambda: None if seed is None else np.random.default_rng(seed)   # the same draws twice
    fast = imagefolder.load_image(path, 64, rng(), draft=True).float()
    full = imagefolder.load_image(path, 64, rng(), draft=False).float()
    assert fast.shape == full.shape == (64, 64, 3)
    assert (fast - full).abs().mean() < 3.0                         # of 255; a misplaced box: > 20


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_torchcodec_decoding_gives_the_image_pillow_gives(tmp_path, seed):
    pytest.importorskip("torchcodec.decoders", reason="the torchcodec decoder is optional")
    path = smooth_photo(tmp_path / "photo.jpg", 480, 360, detail=6)   # ImageNet-sized: full decode
    rng = lambda: None if seed is None else np.random.default_rng(seed)
    # at 224 px no crop of this photo is twice the output: torchcodec decodes every one
    codec = imagefolder.load_image(path, 224, rng(), decoder="torchcodec").float()
    pillow = imagefolder.load_image(path, 224, rng(), decoder="pillow").float()
    assert codec.shape == pillow.shape == (224, 224, 3)
    assert (codec - pillow).abs().mean() < 1.0         # the same pixels; another crop: > 50


def test_decoder_auto_falls_back_to_pillow_and_a_missing_torchcodec_is_named(monkeypatch):
    for name in ("torchcodec", "torchcodec.decoders"):          # the import fails
        monkeypatch.setitem(sys.modules, name, None)
    assert imagefolder.resolve_decoder("auto") == "pillow"
    with pytest.raises(DataError, match="pip install torchcodec"):
        imagefolder.resolve_decoder("torchcodec")


def test_evaluation_crop_is_the_centre_of_the_shorter_side_resize(tmp_path):
    # 400 x 300, size 64: the shorter side resized to 64 / 0.875 and the centre 64 x 64 kept is
    # the centre 262 x 262 of the original: rows 19-281, columns 69-331
    def crop_of(frame):
        pixels = np.full((300, 400, 3), (255, 0, 0), np.uint8)   # a red frame around grey
        pixels[frame:-frame, frame:-frame] = 128
        pixels[frame:-frame, 200:] = 255                        # right of the centre line white
        Image.fromarray(pixels).save(tmp_path / "frame.png")
        return imagefolder.load_image(str(tmp_path / "frame.png"), 64, None).int()
    inside = crop_of(15)                  # the frame lies outside the crop: no red in it
    assert ((inside[:, :31] - 128).abs() <= 2).all() and (inside[:, 33:] >= 253).all()
    edge = crop_of(25)                    # the frame reaches 6 px into the crop, top and bottom
    assert (edge[0] == torch.tensor([255, 0, 0], dtype=torch.int32)).all(-1).any()
    assert ((edge[32, :31] - 128).abs() <= 2).all()


def test_the_odd_files_of_imagenet_decode_to_rgb_and_a_bomb_is_unreadable(tmp_path, monkeypatch):
    # ImageNet's train set holds grayscale and CMYK JPEGs and a PNG named .JPEG
    pixels = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert("L").save(tmp_path / "gray.JPEG")
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.JPEG")
    Image.fromarray(pixels).save(tmp_path / "png.JPEG", format="PNG")
    for name in ("gray.JPEG", "cmyk.JPEG", "png.JPEG"):
        for rng in (None, np.random.default_rng(1)):
            out = imagefolder.load_image(str(tmp_path / name), 32, rng)
            assert out.shape == (32, 32, 3) and out.dtype == torch.uint8
    # over Pillow's pixel limit: DecompressionBombError, which is no OSError, is "unreadable" too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    split = imagefolder.Split(str(tmp_path), np.array([b"png.JPEG"]), torch.tensor([0]))
    image, label, index, ok = imagefolder.FolderDataset(split, 32, train=False)[0]
    assert not ok and not image.any()
    assert "DecompressionBombError" in imagefolder.why_unreadable(str(tmp_path / "png.JPEG"))


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped_white(tmp_path, monkeypatch, mode, fmt):
    grey = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)   # a dark-to-light ramp
    wide = Image.frombytes(mode, (64, 48), grey.astype(">u2" if mode == "I;16B" else "<u2" if
                                                       mode == "I;16" else "<i4").tobytes())
    wide.save(tmp_path / f"wide.{fmt}", format=fmt)
    Image.fromarray(np.round(grey / 257).astype(np.uint8)).save(tmp_path / "narrow.png")
    assert Image.open(tmp_path / f"wide.{fmt}").mode == mode
    narrow = imagefolder.load_image(str(tmp_path / "narrow.png"), 32, None).float()
    # torchcodec, where it applies, leaves 16-bit files to Pillow
    monkeypatch.setattr(imagefolder, "_torchcodec_crop", lambda *a: pytest.fail("torchcodec on 16 bits"))
    for decoder in ("pillow", "torchcodec"):
        out = imagefolder.load_image(str(tmp_path / f"wide.{fmt}"), 32, None, decoder=decoder).float()
        assert (out - narrow).abs().max() <= 1                           # clipped: white where it is not


def test_unreadable_validation_images_come_labelled_minus_1_under_skip_corrupt(tmp_path):
    root = write_folder(tmp_path / "ds", 2, 2)                # train.py's evaluate counts y < 0
    with open(os.path.join(root, "val", "dog", "1.JPEG"), "wb") as f:
        f.write(b"not a JPEG")
    folder = imagefolder.scan(root)
    bad = folder.val.paths.tolist().index(b"dog/1.JPEG")
    source = imagefolder.FolderSource(folder, 16, workers=0, device="cpu", skip_corrupt=True)
    y = torch.cat([y for _, y in source.test_batches(0, 1, 4)])
    assert y.tolist() == [-1 if i == bad else int(folder.val.labels[i]) for i in range(6)]
    strict = imagefolder.FolderSource(folder, 16, workers=0, device="cpu")
    with pytest.raises(DataError, match="cannot read image .*dog/1.JPEG"):
        list(strict.test_batches(0, 1, 4))


def test_folder_labels_outside_the_classes_are_refused_at_load(folder):
    """A Folder built or altered by hand (not by scan) is range-checked like every data set."""
    f = imagefolder.scan(folder)
    labels = f.val.labels.clone()
    labels[4] = 3
    bad = f._replace(val=imagefolder.Split(f.val.root, f.val.paths, labels))
    with pytest.raises(DataError, match=r"val.*labels outside \[0, 3\).* 3"):
        imagefolder.FolderSource(bad, 16, workers=0, device="cpu")


def test_augmentation_depends_on_the_key_only_not_on_workers(folder):
    split = imagefolder.scan(folder).train
    ds = imagefolder.FolderDataset(split, 32, train=True, seed=3)
    a, b = ds[(1, 0, 5, 7)], ds[(1, 0, 5, 7)]
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:] == (int(split.labels[7]), 7, True)
    epochs = torch.stack([ds[(e, 0, 5, 7)][0] for e in range(4)])
    assert len({bytes(e.numpy()) for e in epochs}) == 4               # each epoch its own crop
    keys = [[(2, 0, 4 * b + j, (5 * b + j) % 18) for j in range(4)] for b in range(4)]

    def read(workers):
        return [batch[0] for batch in imagefolder.make_loader(ds, keys, workers, pin_memory=False)]
    for x0, x2 in zip(read(0), read(2)):
        assert torch.equal(x0, x2)


# -- Through train.py -----------------------------------------------------------------------------

def test_one_epoch_end_to_end_with_two_workers(folder, tmp_path):
    # the README's command, with the SEW-ResNet-34 of --data imagenet (flags' last --model wins)
    s = run(*flags(folder, tmp_path / "run", "--epochs", "1", "--ratio", "0.3", "--model", "sew_resnet34"))
    assert s["model"] == "sew_resnet34"
    assert s["data"] == "imagefolder" and s["epochs_done"] == 1
    assert s["example_passes"] == round(0.7 * 18)
    assert 0.0 <= s["final_test_acc"] <= 1.0 and math.isfinite(s["history"][0]["train_loss"])
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["args"]["image_size"] == 32


def test_resume_with_workers_equals_an_uninterrupted_run(folder, tmp_path, assert_same_checkpoint):
    common = ("--epochs", "3", "--ratio", "0.3")
    run(*flags(folder, tmp_path / "straight", *common))
    run(*flags(folder, tmp_path / "split", *common, "--stop-after", "1"))
    run(*flags(folder, tmp_path / "split", *common, "--resume"))
    assert_same_checkpoint(tmp_path / "straight", tmp_path / "split", epoch=3)


def test_a_corrupt_jpeg_stops_the_run_naming_it_and_keeps_the_checkpoint(tmp_path, capsys):
    root = write_folder(tmp_path / "ds")
    argv = flags(root, tmp_path / "run", "--epochs", "2", "--method", "full")
    assert train.main(argv + ["--stop-after", "1"]) == 0
    bad = os.path.join(root, "train", "dog", "2.JPEG")
    with open(bad, "r+b") as f:
        f.truncate(300)                                           # cut off mid-scan
    capsys.readouterr()
    assert train.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {bad}" in err and "--skip-corrupt" in err
    assert "checkpoint (after epoch 1) is kept" in err
    assert train.load_checkpoint(str(tmp_path / "run"), "cpu")["epoch"] == 1


def test_resume_refuses_a_folder_whose_files_changed(tmp_path, capsys):
    root = write_folder(tmp_path / "ds")
    argv = flags(root, tmp_path / "run", "--epochs", "2")
    assert train.main(argv + ["--stop-after", "1"]) == 0
    os.remove(os.path.join(root, "train", "owl", "3.JPEG"))
    capsys.readouterr()
    assert train.main(argv + ["--resume"]) == 2
    assert "are not those this run started with" in capsys.readouterr().err
    assert train.load_checkpoint(str(tmp_path / "run"), "cpu")["epoch"] == 1


@pytest.mark.parametrize("score", ["head", "network"])
def test_skip_corrupt_trains_on_with_the_image_counted_and_unscored(tmp_path, score):
    root = write_folder(tmp_path / "ds")
    with open(os.path.join(root, "train", "dog", "2.JPEG"), "wb") as f:
        f.write(b"not a JPEG at all")
    bad = imagefolder.scan(root).train.paths.tolist().index(b"dog/2.JPEG")
    s = run(*flags(root, tmp_path / "run", "--epochs", "2", "--method", "sadp", "--ratio", "0.0",
                   "--skip-corrupt", "--score", score))
    assert [row["skipped"] for row in s["history"]] == [1, 1]     # ratio 0: every image, every epoch
    seen = train.load_checkpoint(str(tmp_path / "run"), "cpu")["sampler"]["seen"]
    assert not seen[bad] and int(seen.sum()) == 17                # the black stand-in left no score


@pytest.mark.parametrize("argv, message", [
    (["--data", "synthetic", "--image-size", "64"], "--image-size is for --data imagenet"),
    (["--data", "cifar10", "--skip-corrupt"], "--skip-corrupt is for --data imagenet"),
    (["--data", "imagefolder"], "--data imagefolder needs --data-dir"),
    (["--data", "imagefolder", "--data-dir", ".", "--workers", "-1"], "--workers must be at least 0"),
    (["--data", "imagefolder", "--data-dir", ".", "--image-size", "4"], "--image-size must be at least 8"),
])
def test_streaming_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_folder_sets_default_to_the_imagenet_recipe():
    args = train.parse_args(["--data", "imagenet"])
    assert (args.model, args.epochs, args.batch_size, args.image_size) == ("sew_resnet34", 320, 256, 224)
    assert args.data_dir == os.path.join("data", "imagenet")
    cifar = train.parse_args([])
    assert (cifar.model, cifar.epochs, cifar.batch_size, cifar.weight_decay) == ("resnet19", 200, 128, 5e-4)
