"""End-to-end tests of train.py on the synthetic data set (CPU, eager, seconds each)."""

import contextlib
import io
import json
import math
import os

import pytest
import torch

import data
import train

SMALL = ["--data", "synthetic", "--model", "convnet", "--device", "cpu", "--no-compile",
         "--train-size", "1000", "--test-size", "500", "--batch-size", "64", "--T", "2",
         "--quiet"]


def run(tmp_path, *extra, name="run"):
    args = train.parse_args(SMALL + ["--out", str(tmp_path / name), *extra])
    return train.run(args)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """sadp and full on the same small problem; shared by the tests that read their results."""
    tmp = tmp_path_factory.mktemp("runs")
    common = ["--epochs", "3", "--train-size", "2000", "--lr", "0.1", "--batch-size", "32"]
    return {m: run(tmp, *common, "--method", m, name=m) | {"out": str(tmp / m)} for m in ("sadp", "full")}


@pytest.mark.parametrize("method", ["sadp", "full"])
def test_learns_clearly_above_chance(learned, method):
    assert learned[method]["final_test_acc"] > 0.5      # chance is 0.1


def test_summary_fields_and_budget(learned):
    s = learned["sadp"]
    with open(os.path.join(s["out"], "results.json")) as f:
        on_disk = json.load(f)
    for key in ("method", "ratio", "example_passes", "full_data_passes", "wall_seconds",
                "train_seconds", "best_test_acc", "final_test_acc", "theoretical_speedup", "history"):
        assert key in on_disk, key
    assert on_disk["final_test_acc"] == s["final_test_acc"]
    assert s["theoretical_speedup"] == pytest.approx(1 / 0.7)
    # example-passes: (1 - r) of full data, within one batch
    assert abs(s["example_passes"] - 0.7 * s["full_data_passes"]) <= 32
    assert learned["full"]["example_passes"] == learned["full"]["full_data_passes"]
    for row in s["history"]:
        assert set(row) >= {"epoch", "examples", "seconds", "train_loss", "test_acc", "spike_rate"}
        assert 0 < row["spike_rate"] < 1


@pytest.mark.parametrize("method", ["uniform", "infobatch", "ann"])
def test_baselines_run_with_their_budgets(tmp_path, method):
    s = run(tmp_path, "--epochs", "2", "--method", method, "--ratio", "0.5")
    if method == "infobatch":
        # the first epoch is full data (all scores equal), then prunes part of the below-mean half
        assert s["history"][0]["examples"] == 1000
        assert 1000 * 0.5 < s["history"][1]["examples"] < 1000
    else:
        assert all(r["examples"] == 500 for r in s["history"])
    # the passes made, not 1 / (1 - r): InfoBatch's first epoch is full data (issue 17, item 7)
    assert s["theoretical_speedup"] == pytest.approx(s["full_data_passes"] / s["example_passes"])


def test_score_network_runs_and_records_the_network_bound(tmp_path):
    """One epoch with --score network: the same draw and training as --score head (the score
    does not change the gradient), so every seen example's network score must be at least its
    head score (S_net includes the head's term). Shown to catch a wiring that keeps the head scores."""
    runs = {}
    for score in ("head", "network"):
        run(tmp_path, "--epochs", "1", "--ratio", "0.5", "--score", score, name=score)
        runs[score] = train.load_checkpoint(str(tmp_path / score), "cpu")["sampler"]
    seen = runs["head"]["seen"]
    assert torch.equal(seen, runs["network"]["seen"]) and int(seen.sum()) == 500
    head, net = runs["head"]["scores"][seen], runs["network"]["scores"][seen]
    assert torch.isfinite(net).all()
    assert torch.all(net >= head * (1 - 1e-4)) and torch.all(net > head * 1.001)


def test_resume_of_a_checkpoint_from_before_an_option_existed(tmp_path, capsys):
    """A checkpoint saved before --score existed resumes as --score head (the default then) and
    refuses --score network. Shown to catch comparing a missing setting (None) with the default."""
    run(tmp_path, "--epochs", "2", "--stop-after", "1", name="old")
    state = train.load_checkpoint(str(tmp_path / "old"), "cpu")
    del state["args"]["score"]
    train.save_checkpoint(str(tmp_path / "old"), state)
    code = train.main(SMALL + ["--out", str(tmp_path / "old"), "--epochs", "2", "--resume",
                               "--score", "network"])
    assert code == 2 and "--score 'head' -> 'network'" in capsys.readouterr().err
    assert train.main(SMALL + ["--out", str(tmp_path / "old"), "--epochs", "2", "--resume"]) == 0


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch, assert_same_checkpoint):
    """Stop after epoch 2 of 3 (the process dies right after the checkpoint), resume, and
    compare with an uninterrupted run: the same sampler state and the same weights."""
    flags = ["--epochs", "3", "--method", "sadp"]
    run(tmp_path, *flags, name="straight")

    real_save = train.save_checkpoint

    def save_then_die(out, state):
        real_save(out, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt        # as if killed after writing epoch 2's checkpoint

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *flags, name="killed")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed = run(tmp_path, *flags, "--resume", name="killed")

    a = assert_same_checkpoint(tmp_path / "straight", tmp_path / "killed", epoch=3)
    assert resumed["example_passes"] == a["example_passes"]
    assert [r["examples"] for r in resumed["history"]] == [r["examples"] for r in a["history"]]


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real_loss = train.spike_aware_loss
    calls = {"n": 0}
    steps_per_epoch = -(-700 // 64)          # 700 draws per epoch in batches of 64

    def loss_goes_nan(*a, **k):
        loss, scores = real_loss(*a, **k)
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 3:     # epoch 2, step 3
            loss = loss * float("nan")
        return loss, scores

    monkeypatch.setattr(train, "spike_aware_loss", loss_goes_nan)
    with pytest.raises(train.Diverged, match=r"epoch 2, step 3 of 11"):
        run(tmp_path, "--epochs", "3")
    manifest = train.read_manifest(str(tmp_path / "run"))
    assert manifest["epoch"] == 1                  # epoch 1's checkpoint is kept, nothing later
    state = train.load_checkpoint(str(tmp_path / "run"), "cpu")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(SMALL + ["--out", out, "--epochs", "1"]) == 0
    assert train.main(SMALL + ["--out", out, "--epochs", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert train.main(SMALL + ["--out", str(tmp_path / "empty"), "--epochs", "1", "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert train.main(SMALL + ["--out", out, "--epochs", "2", "--resume", "--lr", "0.3"]) == 2
    assert "--lr" in capsys.readouterr().err


def test_corrupt_checkpoint_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train.main(SMALL + ["--out", str(out), "--epochs", "1"]) == 0
    manifest = train.read_manifest(str(out))
    path = out / manifest["file"]
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))

    def no_load(*a, **k):
        raise AssertionError("torch.load called on an unverified checkpoint")

    monkeypatch.setattr(torch, "load", no_load)
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2", "--resume"]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous file and no temporary file behind."""
    path = tmp_path / "x.bin"
    train.atomic_write_bytes(str(path), b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        train.atomic_write_bytes(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


@pytest.mark.parametrize("flags, message", [
    (["--ratio", "1.0"], "--ratio"),
    (["--ratio", "-0.2"], "--ratio"),
    (["--method", "full", "--ratio", "0.3"], "--method full"),
    (["--method", "magic"], "--method"),
    (["--epochs", "0"], "--epochs"),
    (["--T", "0"], "--T"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "nan"], "--lr"),
    (["--epsilon", "0"], "--epsilon"),
    (["--smoothing", "0.5"], "unrecognized arguments: --smoothing"),   # removed: docs/variants.md
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--data", "cifar10", "--train-size", "10"], "--train-size"),
    (["--exact-score", "--method", "ann"], "--exact-score"),
    (["--score", "network", "--method", "ann"], "--score network"),
    (["--score", "network", "--exact-score"], "--score network"),
    (["--data", "tinyimagenet"], "--data"),
    (["--data", "mnist1d", "--model", "convnet"], "--model convnet does not take"),
    (["--data", "synthetic", "--model", "conv1d"], "--model conv1d does not take"),
    # issue 12, defect 4: each of these crashed with a traceback
    (["--momentum", "0"], "--momentum"),
    (["--momentum", "-1"], "--momentum"),
    (["--momentum", "nan"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--method", "infobatch", "--seed", "100000000000000"], "--seed"),
    (["--data", "synthetic", "--train-size", "1", "--ratio", "0.6"], "leaves no example"),
    (["--device", "meta"], "--device"),
    # issue 17, item 5: a RuntimeError traceback at the first step
    (["--data", "imagefolder", "--data-dir", ".", "--model", "vgg11", "--image-size", "16"],
     "--image-size 16 is below the minimum 32 of --model vgg11"),
])
def test_invalid_flags_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_offline_cifar_gives_the_hand_placement_message(tmp_path, capsys, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code = train.main(["--data", "cifar10", "--data-dir", str(tmp_path), "--device", "cpu",
                       "--no-compile", "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and str(tmp_path) in err


def test_mnist1d_end_to_end(tmp_path):
    pytest.importorskip("mnist1d", reason="--data mnist1d needs `pip install mnist1d`")
    args = train.parse_args(["--data", "mnist1d", "--model", "conv1d", "--device", "cpu",
                             "--no-compile", "--epochs", "3", "--ratio", "0.5", "--quiet",
                             "--out", str(tmp_path / "m1d")])
    s = train.run(args)
    assert s["pass_fraction"] == pytest.approx(0.5)
    assert s["final_test_acc"] > 0.25                    # chance is 0.1; full data: ~0.45 here


@pytest.mark.parametrize("method, flags, factor", [("sadp", [], 1 / 0.4), ("uniform", [], 1 / 0.4),
                                                   ("sadp", ["--lr-scale", "none"], 1.0),
                                                   ("infobatch", [], 1.0)])
def test_lr_scale_budget_is_one_over_keep(method, flags, factor):
    """budget (the default for sadp, ann, uniform): lr x 1 / (1 - r); none: lr as given."""
    args = train.parse_args(SMALL + ["--method", method, "--ratio", "0.6"] + flags)
    m = train.make_method(args, None, 1000, 0, 1)
    assert m.begin_epoch(0) == pytest.approx(factor)


def test_lr_scale_refuses_methods_it_does_not_apply_to(capsys):
    for flags in (["--method", "full", "--lr-scale", "budget"], ["--method", "infobatch", "--lr-scale", "budget"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(SMALL + flags)
        assert e.value.code == 2 and "--lr-scale" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Issue 12: nothing lost, nothing crashes
# ---------------------------------------------------------------------------------------------

def test_unwritable_out_is_found_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    """--out that is a file, or under /proc: exit 2 with a message, before data is loaded."""
    def no_data(*a, **k):
        raise AssertionError("data loaded before --out was checked")

    monkeypatch.setattr(train.data, "load_dataset", no_data)
    (tmp_path / "afile").write_text("x")
    for out in (str(tmp_path / "afile"), str(tmp_path / "afile" / "run"), "/proc/sadp-run"):
        assert train.main(SMALL + ["--out", out, "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and out in err and "Traceback" not in err


def test_data_dir_that_is_a_file_or_unwritable_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data-dir", str(tmp_path / "afile")])
    assert e.value.code == 2 and str(tmp_path / "afile") in capsys.readouterr().err
    code = train.main(["--data", "cifar10", "--data-dir", "/proc/sadp-data", "--device", "cpu",
                       "--no-compile", "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert code == 2 and "--data-dir /proc/sadp-data" in capsys.readouterr().err


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """Both runs exited 0 and the second overwrote the first (issue 12, defect 2)."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:            # as a run in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train.main(SMALL + ["--out", str(out), "--epochs", "1"]) == 2
        assert "in use by another run" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    flags = SMALL + ["--out", str(out), "--epochs", "2"]
    assert train.main(flags + ["--stop-after", "1"]) == 0           # released: runs
    assert train.main(flags + ["--resume"]) == 0                      # its own lock released too


@pytest.mark.parametrize("bad_epoch, kept", [(0, None), (1, 1)])
def test_non_finite_parameters_are_never_checkpointed(tmp_path, monkeypatch, capsys, bad_epoch, kept):
    """A NaN weight with a finite loss was saved as a good checkpoint, and the message named a
    checkpoint that did not exist (issue 12, defect 3)."""
    real_epoch = train.train_epoch

    def poisoned(r, epoch):
        row = real_epoch(r, epoch)
        if epoch == bad_epoch:
            with torch.no_grad():
                next(r.model.parameters()).view(-1)[0] = float("nan")
        return row

    monkeypatch.setattr(train, "train_epoch", poisoned)
    out = tmp_path / "run"
    assert train.main(SMALL + ["--out", str(out), "--epochs", "3"]) == 3
    err = capsys.readouterr().err
    manifest = train.read_manifest(str(out))
    if kept is None:
        assert manifest is None and "No checkpoint was written yet" in err
        assert "last good checkpoint" not in err
    else:
        assert manifest["epoch"] == kept and f"after epoch {kept}" in err
        state = train.load_checkpoint(str(out), "cpu")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import errno
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync_until_full(fd):
        calls["n"] += 1
        if calls["n"] > 2:                          # epoch 1: checkpoint + manifest; then full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    out = tmp_path / "run"
    assert train.main(SMALL + ["--out", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "after epoch 1" in err and "Traceback" not in err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert train.read_manifest(str(out))["epoch"] == 1
    assert train.load_checkpoint(str(out), "cpu")["epoch"] == 1
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == \
        ["checkpoint-e1.pt", "checkpoint.json"]


def test_full_disk_during_a_download_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import errno
    import io
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"x" * (3 << 20)))
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    code = train.main(["--data", "cifar10", "--data-dir", str(tmp_path / "d"), "--device", "cpu",
                       "--no-compile", "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert os.listdir(tmp_path / "d") == []          # the partial download is removed


@pytest.mark.parametrize("forge", ["other pickle", "garbage", "wrong keys"])
def test_forged_checkpoint_with_a_recomputed_sha_is_not_a_checkpoint(tmp_path, capsys, forge):
    """A tampered checkpoint whose manifest SHA was recomputed gave a raw UnpicklingError or
    KeyError (issue 12, defect 6)."""
    import hashlib
    import io
    import json as json_
    out = tmp_path / "run"
    assert train.main(SMALL + ["--out", str(out), "--epochs", "1"]) == 0
    manifest = train.read_manifest(str(out))
    buffer = io.BytesIO()
    if forge == "other pickle":
        torch.save({"weights": torch.ones(3)}, buffer)
    elif forge == "wrong keys":
        state = train.load_checkpoint(str(out), "cpu")
        del state["sampler"]
        torch.save(state, buffer)
    else:
        buffer.write(os.urandom(4096))
    payload = buffer.getvalue()
    (out / manifest["file"]).write_bytes(payload)
    manifest["sha256"] = hashlib.sha256(payload).hexdigest()
    (out / "checkpoint.json").write_text(json_.dumps(manifest))
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2", "--resume"]) == 2
    assert "not a checkpoint of this program" in capsys.readouterr().err


def test_resume_of_a_finished_run_leaves_it_and_wall_seconds_cover_every_part(tmp_path, capsys):
    """--resume of a finished run rewrote results.json with wall_seconds ~ 0; output files
    were mode 0600 (issue 12, defect 7)."""
    out = tmp_path / "run"
    first = run(tmp_path, "--epochs", "2", "--stop-after", "1")
    second = run(tmp_path, "--epochs", "2", "--resume")
    assert second["wall_seconds"] > first["wall_seconds"] >= first["train_seconds"] > 0
    before = (out / "results.json").read_bytes()
    assert train.main(SMALL[:-1] + ["--out", str(out), "--epochs", "2", "--resume"]) == 0
    assert "is finished" in capsys.readouterr().out
    assert (out / "results.json").read_bytes() == before
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "checkpoint.json", "checkpoint-e2.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_checkpoint_names_count_epochs_as_the_rows_do(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2"]) == 0
    assert (out / "checkpoint-e2.pt").exists()
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "after epoch 2" in err and "another --out" in err and f"delete {out}" in err


@pytest.mark.parametrize("tty", [True, False])
def test_progress_line_on_a_terminal_only(tmp_path, capsys, monkeypatch, tty):
    import sys
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    args = train.parse_args(SMALL[:-1] + ["--out", str(tmp_path / "run"), "--epochs", "1"])
    train.run(args)
    out = capsys.readouterr().out
    assert ("\r" in out) == tty and ("examples/s" in out) == tty


# ---------------------------------------------------------------------------------------------
# Issue 16 item 3 and issue 17 (train side): the loop, its messages and its corners
# ---------------------------------------------------------------------------------------------

def test_a_training_step_makes_no_host_device_sync(tmp_path, count_host_syncs):
    """An epoch of 6 steps reads as many scalars off tensors as one of 2: the steps read none,
    only the epoch's end does (on a GPU each read would stall the host until the device is done)."""
    def syncs(steps: int) -> int:
        args = train.parse_args(SMALL + ["--out", str(tmp_path / str(steps)), "--ratio", "0.5",
                                         "--train-size", str(2 * 64 * steps)])     # 64 * steps draws
        r = train.setup(args, 0, 1, torch.device("cpu"))
        with count_host_syncs() as mode:
            row = train.train_epoch(r, 0)
        assert row["examples"] == 64 * steps
        return mode.count
    assert syncs(2) == syncs(6)


def test_run_takes_only_what_a_user_passes_and_the_help_quotes_no_measured_figure():
    import inspect
    import re
    assert list(inspect.signature(train.run).parameters) == ["args"]
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as help_text:
        train.parse_args(["--help"])
    flags_help = help_text.getvalue().split("\noptions:")[1]           # after the module docstring
    assert "--replacement" in flags_help
    assert not re.search(r"\d\s?x\b|\d\s?%", flags_help)        # figures go stale: docs/ has them


def test_the_synthetic_data_do_not_follow_seed(tmp_path, monkeypatch):
    """Runs paired by --seed must train on the same data; only the draws and the weights differ."""
    loaded, real_load = [], train.data.load_dataset
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    for seed in ("0", "1"):
        assert train.main(SMALL + ["--out", str(tmp_path / seed), "--epochs", "1", "--train-size", "100",
                                   "--test-size", "50", "--seed", seed]) == 0
    assert torch.equal(loaded[0].x_train, loaded[1].x_train) and torch.equal(loaded[0].y_test, loaded[1].y_test)


def test_resume_with_another_number_of_processes_is_refused(tmp_path, capsys):
    """A checkpoint of a 2-process run (one augmentation stream per process) resumed by one
    process continued silently, its draw split for another world size (issue 17, item 3)."""
    out = str(tmp_path / "run")
    assert train.main(SMALL + ["--out", out, "--epochs", "2", "--stop-after", "1"]) == 0
    state = train.load_checkpoint(out, "cpu")
    state["aug_rng"] = state["aug_rng"] * 2                  # as rank 0 and rank 1 save it
    train.save_checkpoint(out, state)
    capsys.readouterr()
    assert train.main(SMALL + ["--out", out, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained by 2 process(es), this run has 1" in err and "--nproc_per_node=2" in err
    assert train.read_manifest(out)["epoch"] == 1


def test_unreadable_validation_images_are_counted_and_left_out_of_the_accuracy(tmp_path):
    from test_imagefolder import flags, write_folder
    root = write_folder(tmp_path / "ds")
    with open(os.path.join(root, "val", "owl", "1.JPEG"), "wb") as f:
        f.write(b"not a JPEG")
    s = train.run(train.parse_args(flags(root, tmp_path / "run", "--epochs", "1", "--skip-corrupt")))
    assert s["history"][0]["val_skipped"] == 1 and s["val_skipped"] == 1
    assert s["history"][0]["skipped"] == 0
    # 5 readable validation images: the accuracy is a multiple of 1/5
    assert s["final_test_acc"] * 5 == pytest.approx(round(s["final_test_acc"] * 5))


def test_a_corrupt_image_before_any_checkpoint_says_to_rerun(tmp_path, capsys):
    from test_imagefolder import flags, write_folder
    root = write_folder(tmp_path / "ds")
    with open(os.path.join(root, "train", "cat", "0.JPEG"), "wb") as f:
        f.write(b"not a JPEG")
    assert train.main(flags(root, tmp_path / "run", "--epochs", "1", "--ratio", "0.0")) == 2
    err = capsys.readouterr().err
    assert "No checkpoint was written yet, so there is nothing to resume: rerun" in err
    assert "last good checkpoint" not in err


def test_resume_of_a_run_stopped_where_stop_after_asks_says_how_to_continue(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = SMALL[:-1] + ["--out", out, "--epochs", "3", "--stop-after", "2"]
    assert train.main(flags) == 0
    capsys.readouterr()
    assert train.main(flags + ["--resume"]) == 0
    said = capsys.readouterr().out
    assert "already stopped after epoch 2 of 3" in said and "--stop-after" in said
    assert "another --out" not in said and train.read_manifest(out)["epoch"] == 2


def test_resume_of_a_finished_run_without_results_json_rewrites_it(tmp_path, capsys):
    out = tmp_path / "run"
    first = run(tmp_path, "--epochs", "1")
    (out / "results.json").unlink()
    capsys.readouterr()
    assert train.main(SMALL[:-1] + ["--out", str(out), "--epochs", "1", "--resume"]) == 0
    assert "rewritten from the last checkpoint" in capsys.readouterr().out
    rewritten = json.loads((out / "results.json").read_text())
    for key in ("history", "example_passes", "final_test_acc", "wall_seconds"):
        assert rewritten[key] == first[key], key


def test_a_checkpoint_without_its_manifest_is_named_and_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2"]) == 0
    (out / "checkpoint.json").unlink()
    before = (out / "checkpoint-e2.pt").read_bytes()
    capsys.readouterr()
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-e2.pt" in err and "checkpoint.json" in err and "without --resume" not in err
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2"]) == 2          # a new run
    assert "checkpoint-e2.pt" in capsys.readouterr().err
    assert (out / "checkpoint-e2.pt").read_bytes() == before


@pytest.mark.parametrize("epoch", ["1e400", "-1", "true", "\"1\""])
def test_a_manifest_of_another_shape_is_a_clear_error(tmp_path, capsys, epoch):
    out = tmp_path / "run"
    assert train.main(SMALL + ["--out", str(out), "--epochs", "1"]) == 0
    manifest = (out / "checkpoint.json").read_text()
    (out / "checkpoint.json").write_text(manifest.replace('"epoch": 1', f'"epoch": {epoch}'))
    capsys.readouterr()
    assert train.main(SMALL + ["--out", str(out), "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint manifest of this program" in err and "Traceback" not in err


def test_ctrl_c_ends_with_one_line_naming_the_checkpoint_and_the_command(tmp_path, monkeypatch, capsys):
    import shlex
    out = tmp_path / "run"
    argv = SMALL + ["--out", str(out), "--epochs", "2"]
    real_epoch = train.train_epoch

    def interrupted_in_epoch_2(r, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(r, epoch)

    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
    try:
        code = train.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left main() as a KeyboardInterrupt, with its traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "after epoch 1" in err and str(out) in err
    command = shlex.split(err.split("this command: ")[1].rstrip(". \n"))
    assert command[:2] == ["python", os.path.relpath(train.__file__)] and command[-1] == "--resume"
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    assert train.main(command[2:]) == 0
    assert train.read_manifest(str(out))["epoch"] == 2


def test_loading_and_compiling_each_print_a_line_when_they_start_and_end(tmp_path, capsys, monkeypatch):
    import models
    real_build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: real_build(*a, **{**k, "compile": False}))
    flags = [f for f in SMALL if f not in ("--no-compile", "--quiet")] + ["--epochs", "2"]
    train.run(train.parse_args(flags + ["--out", str(tmp_path / "run")]))
    said = capsys.readouterr().out
    assert said.index("loading --data synthetic") < said.index("loaded 1000 training and 500 test examples")
    assert said.count("compiling the LIF loop") == 1 and said.count("compiled in") == 1
    assert said.index("compiling") < said.index("compiled in") < said.index("\n    1 ")


def test_in_memory_sets_carry_a_digest_every_rank_compares():
    """make_source compares it across ranks, as it does a folder's file list: a node with
    another copy of the data stops instead of training on other examples."""
    def digest(labels):
        x = torch.zeros(len(labels), 2)
        ds = data.ArrayDataset(x, torch.tensor(labels), x[:1], torch.tensor(labels[:1]), 3)
        return train.MemorySource(ds, torch.device("cpu"), None, None).digest
    assert digest([0, 1, 2]) == digest([0, 1, 2])
    assert digest([0, 1, 2]) != digest([0, 2, 1]) != digest([0, 1])
