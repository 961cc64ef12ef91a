"""Train a spiking network with spike-aware data pruning (SADP) or a baseline.

    python train.py --data cifar10 --ratio 0.3                      # spiking ResNet-19, SADP, r = 0.3
    python train.py --data synthetic --model convnet --epochs 5 --device cpu --no-compile
    python train.py --data cifar10 --method infobatch --ratio 0.3   # or full, uniform, ann
    torchrun --nproc_per_node=8 train.py --data imagenet --data-dir DIR --ratio 0.3 --amp   # DDP

Each data set trains by its usual recipe (defaults below). Every epoch prints a row and writes a
checkpoint to --out (--resume continues from it); the summary goes to <out>/results.json.
An example-pass is one example through one forward and backward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import io
import json
import math
import os
import re
import shlex
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

try:
    import fcntl                     # the --out lock; absent on Windows, where runs go unlocked
except ImportError:
    fcntl = None

import baselines
import data
import frames
import imagefolder
import models
from netbound import NetworkTap
from sadp import HeadTap, SADPSampler, all_gather_cat, per_example_loss, spike_aware_loss

FOLDER_SETS = ("imagenet", "imagefolder")   # streamed from disk (imagefolder.py); the rest: in memory
EVENT_SETS = tuple(frames.RECIPES)           # event-camera frames from --data-dir (frames.py)
# Each family's defaults, the recipe its usual network is trained with (README). A flag given wins.
RECIPES = {
    "cifar": dict(model="resnet19", T=4, epochs=200, batch_size=128, weight_decay=5e-4),  # tdBN / TET
    "mnist1d": dict(model="conv1d", T=4, epochs=40, batch_size=128, weight_decay=5e-4),
    "folder": dict(model="sew_resnet34", T=4, epochs=320, batch_size=256, weight_decay=0.0, image_size=224,
                   decoder="auto"),
    # the event sets: CIFAR's optimiser and epochs; network, T and input size from frames.RECIPES
    **{name: dict(model=r["model"], T=r["T"], epochs=200, batch_size=128, weight_decay=5e-4, image_size=r["size"][0])
       for name, r in frames.RECIPES.items()},
}


# -- The command line: every flag in one table, each value checked once -------------------------

def at_least(low: int) -> tuple:
    return f"at least {low}", lambda v: v >= low


SYNTHETIC, STREAMED = "--data synthetic", "--data imagenet / imagefolder"     # groups of data-only flags
# group -> rows of (flag, argparse keywords, valid values as (what, test) or None, help). Unset
# (None) defaults come from RECIPES; sadp.py checks --ratio, --epsilon and --label-smoothing.
FLAGS = {
    "data": [
        ("--data", dict(choices=data.DATASETS + FOLDER_SETS + EVENT_SETS, default="cifar10"), None,
         "data set (default cifar10); mnist1d needs `pip install mnist1d`, the folders `pip install pillow`"),
        ("--data-dir", {}, None, "data cache (default ./data); the folders: the folder of train/, val/; "
         "the event sets: SpikingJelly's root of the set"),
        ("--image-size", dict(type=int), at_least(8), "folders: crop size; event sets: frame side (default per set)"),
        ("--no-augment", dict(action="store_true"), None, "no random crop + flip (on for images)")],
    SYNTHETIC: [
        ("--train-size", dict(type=int), at_least(1), "training examples (default 10000)"),
        ("--test-size", dict(type=int), at_least(1), "test examples (default 2000)")],
    STREAMED: [
        ("--workers", dict(type=int), at_least(0), "decoding processes per process (default: the cores, <= 8)"),
        ("--decoder", dict(choices=imagefolder.DECODERS), None, "JPEG decoder (default auto)"),
        ("--skip-corrupt", dict(action="store_true"), None, "train past unreadable images (weight 0, not scored)")],
    "model and optimiser": [
        ("--model", dict(choices=models.MODELS), None, "network (default resnet19; mnist1d conv1d; the folders "
         "sew_resnet34; convnet for CPU demos)"),
        ("--T", dict(type=int), at_least(1), "timesteps (default 4; event sets: their recipe's)"),
        ("--epochs", dict(type=int), at_least(1), "epochs (default 200; mnist1d 40; the folders 320)"),
        ("--batch-size", dict(type=int), at_least(1), "global batch over all processes (default 128; folders 256)"),
        ("--lr", dict(type=float, default=0.1), ("a positive number", lambda v: math.isfinite(v) and v > 0),
         "peak learning rate (default 0.1)"),
        ("--momentum", dict(type=float, default=0.9), ("in (0, 1)", lambda v: 0 < v < 1),
         "Nesterov SGD momentum (default 0.9)"),
        ("--weight-decay", dict(type=float), ("a number >= 0", lambda v: math.isfinite(v) and v >= 0),
         "weight decay (default 5e-4; the folders 0)"),
        ("--label-smoothing", dict(type=float, default=0.0), None, "label smoothing (default 0)"),
        ("--per-timestep", dict(action="store_true"), None, "TET loss: the mean over t of CE(o_t)")],
    "method": [
        ("--method", dict(choices=("sadp", "uniform", "infobatch", "ann", "full"), default="sadp"), None,
         "sadp (default); baselines: uniform random subset, infobatch (Qin et al. 2024), ann (spike-blind score)"),
        ("--ratio", dict(type=float), None, "r in [0, 1), the share of example-passes saved (default 0.3)"),
        ("--epsilon", dict(type=float, default=0.1), None, "sadp/ann: the uniform share of p (default 0.1)"),
        ("--replacement", dict(action=argparse.BooleanOptionalAction, default=False), None,
         "sadp/ann: draw i.i.d. from p, or each example at most once (default)"),
        ("--lr-scale", dict(choices=("budget", "none")), None, "budget: lr x 1 / (1 - r) (default for sadp, ann, "
         "uniform); none (default for full, infobatch)"),
        ("--score", dict(choices=("head", "network"), default="head"), None, "sadp: bound the head's gradient "
         "(default) or every conv and linear weight's (netbound.py)"),
        ("--exact-score", dict(action="store_true"), None, "sadp: the exact head-gradient norm")],
    "run": [
        ("--seed", dict(type=int, default=0), ("in [0, 2**32)", lambda v: 0 <= v < 2**32), "seed (default 0)"),
        ("--device", dict(default="auto"), None, "auto (cuda if available), cpu, cuda, cuda:1, ..."),
        ("--amp", dict(action="store_true"), None, "bfloat16 autocast"),
        ("--no-compile", dict(action="store_true"), None, "run the LIF timestep loop eagerly"),
        ("--out", {}, None, "run folder (default runs/<data>-<model>-<method>-r<ratio>-s<seed>)"),
        ("--resume", dict(action="store_true"), None, "continue the run in --out from its last checkpoint"),
        ("--stop-after", dict(type=int, metavar="EPOCH"), None, "checkpoint and exit after this epoch"),
        ("--quiet", dict(action="store_true"), None, "print errors only")],
}


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, the unset ones filled from the data set's recipe, each value checked (exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for group, rows in FLAGS.items():
        arguments = parser.add_argument_group(group)
        for flag, keywords, _, help_text in rows:
            arguments.add_argument(flag, help=help_text, **keywords)
    args = parser.parse_args(argv)
    folder = args.data in FOLDER_SETS
    family = "folder" if folder else args.data if args.data in RECIPES else "cifar"
    for key, value in RECIPES[family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data_dir is None and (args.data == "imagefolder" or args.data in EVENT_SETS):
        parser.error(f"--data {args.data} needs --data-dir DIR: the folder of train/<class>/ and val/<class>/, "
                     f"or the event set's SpikingJelly root")
    args.data_dir = args.data_dir or (os.path.join("data", "imagenet") if args.data == "imagenet" else "data")
    if folder and args.workers is None:     # the machine's cores, shared among its processes
        args.workers = max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if args.method == "full" and args.ratio not in (None, 0.0):
        parser.error("--method full trains on all the data: drop --ratio (or pick a pruning method)")
    if args.ratio is None:
        args.ratio = 0.0 if args.method == "full" else 0.3
    if args.lr_scale is None:
        args.lr_scale = "budget" if args.method in ("sadp", "ann", "uniform") else "none"
    validate(parser, args)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.data}-{args.model}-{args.method}-r{args.ratio:g}-s{args.seed}")
    return args


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2, naming the flag) for a flag whose value or combination cannot run."""
    for group, rows in FLAGS.items():
        for flag, _, valid, _ in rows:
            value = getattr(args, flag[2:].replace("-", "_"))
            if value is not None and value is not False and group in (SYNTHETIC, STREAMED) \
                    and args.data not in (("synthetic",) if group == SYNTHETIC else FOLDER_SETS):
                parser.error(f"{flag} is for {group} only")
            if valid is not None and value is not None and not valid[1](value):
                parser.error(f"{flag} must be {valid[0]}; got {value}")
    if args.image_size is not None and args.data not in FOLDER_SETS + EVENT_SETS:
        parser.error(f"--image-size is for --data imagenet, imagefolder and the event sets, not --data {args.data}")
    if (args.model == "conv1d") != (args.data == "mnist1d"):
        parser.error(f"--model {args.model} does not take --data {args.data}: conv1d is for mnist1d, the rest images")
    if args.image_size is not None and args.image_size < models.min_image_size(args.model):
        parser.error(f"--image-size {args.image_size} is below the minimum "
                     f"{models.min_image_size(args.model)} of --model {args.model}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.epochs:
        parser.error(f"--stop-after must lie in [1, --epochs = {args.epochs}]; got {args.stop_after}")
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} is a file, not a folder; choose another --data-dir")
    for flag, wrong in (("--exact-score", args.exact_score and args.method != "sadp"),
                        ("--score network", args.score == "network" and (args.method != "sadp" or args.exact_score)),
                        ("--lr-scale budget", args.lr_scale == "budget" and args.method in ("full", "infobatch"))):
        if wrong:
            parser.error(f"{flag} does not apply to --method {args.method}"
                         + (" with --exact-score" if args.method == "sadp" else ""))
    n = args.train_size or 10**6     # a data set's own size is checked once it is loaded (make_method)
    for flag, value, check in (   # sadp.py owns what a valid ratio, epsilon and label smoothing are: ask it
            ("--ratio", args.ratio, lambda: SADPSampler(n, args.ratio)),
            ("--epsilon", args.epsilon, lambda: SADPSampler(n, 0.0, epsilon=args.epsilon)),
            ("--label-smoothing", args.label_smoothing, lambda: per_example_loss(
                torch.zeros(1, 1, 2), torch.zeros(1, dtype=torch.long), label_smoothing=args.label_smoothing))):
        try:
            check()
        except ValueError as e:
            parser.error(f"{flag} {value}: {e}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but this machine has no CUDA GPU (or this torch has no CUDA); use --device cpu")


def make_method(args, model, num_examples: int, rank: int, world_size: int) -> SimpleNamespace:
    """What --method decides: `sampler`; `begin_epoch(epoch)` draws the epoch, returns its lr factor;
    `loss(outputs, targets, head_inputs, weights)` -> (loss, every example's score);
    `after_backward(scores, weights)` the scores to keep once backward has run; `close()`."""
    place = dict(seed=args.seed, rank=rank, world_size=world_size)
    readout = dict(per_timestep=args.per_timestep, label_smoothing=args.label_smoothing)
    try:
        if args.method == "uniform":
            sampler = baselines.uniform_sampler(num_examples, args.ratio, **place)
        elif args.method == "infobatch":
            sampler = baselines.InfoBatchSampler(num_examples, args.ratio, args.epochs, **place)
        else:   # sadp; ann (the same sampler, a spike-blind score); full (ratio 0: all, weight 1)
            sampler = SADPSampler(num_examples, args.ratio, epsilon=args.epsilon, replacement=args.replacement,
                                  **place)
    except ValueError as e:      # a ratio that leaves no example of a small data set
        raise RunError(f"--ratio {args.ratio:g} on {num_examples} examples: {e}") from e

    def begin_epoch(epoch: int) -> float:
        sampler.set_epoch(epoch)
        return 1.0 / (1.0 - args.ratio) if args.lr_scale == "budget" else 1.0

    if args.method == "sadp":
        loss = functools.partial(spike_aware_loss, exact=args.exact_score, **readout)
    else:   # the loss score is what infobatch prunes by; full and uniform ignore scores
        loss = functools.partial(baselines.baseline_loss, kind="ann" if args.method == "ann" else "loss", **readout)
    method = SimpleNamespace(sampler=sampler, begin_epoch=begin_epoch, loss=loss,
                             after_backward=lambda scores, w: scores, close=lambda: None)
    if args.score == "network":     # read off the backward pass; a stand-in's (w = 0) score is dropped
        tap = NetworkTap(model, T=args.T)
        method.after_backward, method.close = lambda _, w: tap.pop(torch.where(w > 0, w, 1.0)), tap.remove
    return method


# -- Checkpoints: written atomically, verified by SHA-256 before torch.load(weights_only=True) ---

class RunError(RuntimeError):
    """A problem the user can fix; train.py prints the message and exits with status 2."""


class Diverged(RuntimeError):
    """The loss, or a parameter or buffer, became NaN or infinite; train.py exits with status 3."""


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write `path` (mode 0666 less the umask) so that a reader finds the old file or the new one, whole."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(out: str, state: dict) -> None:
    """checkpoint-e<epochs done>.pt, then the manifest naming it and its SHA-256. A kill or a failed
    write (a full disk) at any moment leaves the previous manifest and its checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    name, old = f"checkpoint-e{state['epoch']}.pt", read_manifest(out)
    atomic_write_bytes(os.path.join(out, name), buffer.getvalue())
    manifest = {"file": name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "epoch": state["epoch"]}
    try:
        atomic_write_bytes(os.path.join(out, "checkpoint.json"), json.dumps(manifest).encode())
    except BaseException:
        if old is None or old["file"] != name:
            os.unlink(os.path.join(out, name))      # the manifest still names the old one
        raise
    if old is not None and old["file"] != name and os.path.exists(os.path.join(out, old["file"])):
        os.unlink(os.path.join(out, old["file"]))


def read_manifest(out: str) -> dict | None:
    """<out>/checkpoint.json, {"file": "checkpoint-e<epoch>.pt", "sha256": ..., "epoch": int >= 1};
    None if --out holds no checkpoint; a RunError if it is not ours, or a checkpoint has none."""
    path = os.path.join(out, "checkpoint.json")
    if not os.path.exists(path):
        listed = os.listdir(out) if os.path.isdir(out) else []
        files = sorted(f for f in listed if re.fullmatch(r"checkpoint-e\d+\.pt", f))
        if files:
            raise RunError(f"{out} holds {', '.join(files)} but not checkpoint.json, its manifest, so it can be "
                           f"neither verified nor replaced: restore checkpoint.json, delete them or use another --out.")
        return None
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read())
        if type(m["epoch"]) is int and m["epoch"] >= 1 and m["file"] == f"checkpoint-e{m['epoch']}.pt" \
                and re.fullmatch("[0-9a-f]{64}", m["sha256"]):
            return m
    except (OSError, ValueError, KeyError, TypeError):    # unreadable, not JSON, not this layout
        pass
    raise RunError(f"{path} is corrupt: not a checkpoint manifest of this program; nothing was loaded. "
                   f"Restore it from a backup, or start a new run with another --out.")


def load_checkpoint(out: str, map_location) -> dict:
    """The state in <out>'s last checkpoint, loaded only once its SHA-256 matches the manifest's."""
    manifest = read_manifest(out)
    if manifest is None:
        raise RunError(f"--resume: no checkpoint in {out}; run without --resume to start the run.")
    path = os.path.join(out, manifest["file"])
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except OSError as e:
        raise RunError(f"--resume: cannot read {path} ({e}); the run directory is incomplete.") from e
    if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
        raise RunError(f"--resume: {path} is corrupt (not the SHA-256 of its manifest); nothing was loaded. "
                       f"Delete {out} to start over.")
    try:       # weights_only: tensors and plain containers only, no code runs
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:       # UnpicklingError, RuntimeError, EOFError, ...: all mean "not ours"
        raise RunError(not_a_checkpoint(path, f"torch.load: {type(e).__name__}")) from e


def not_a_checkpoint(path: str, why: str) -> str:
    return (f"--resume: {path} matches its manifest but is not a checkpoint of this program ({why}). "
            f"Nothing was restored; start fresh with another --out, or delete its folder.")


def last_good(out: str, resume: str = "", rerun: str = "") -> str:
    """For messages: where the last checkpoint is and how to go on from it (`resume`), or if none, `rerun`."""
    try:
        manifest = read_manifest(out)
    except RunError:
        manifest = None
    if manifest is None or not os.path.exists(os.path.join(out, manifest["file"])):
        return "No checkpoint was written yet" + (f", so there is nothing to resume: {rerun}" if rerun else ".")
    return (f"The last good checkpoint (after epoch {manifest['epoch']}) is kept in {out}"
            + (f"; continue from it with {resume}" if resume else "."))


# -- Every process: the same outcome, one owner of --out -------------------------------------------

def agree(world_size: int, action, *args):
    """action(*args); a RunError on any rank is raised on every rank (a collective): none waits for one stopped."""
    result, error = None, None
    try:
        result = action(*args)
    except RunError as e:
        error = str(e)
    if world_size > 1:
        errors = [None] * world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise RunError(error)
    return result


def claim_out(args, rank: int) -> int | None:
    """On rank 0, before any data is loaded: a new run overwrites no checkpoint, --out is writable, and
    <out>/.lock is held while the run lasts (the OS releases it when the process ends, even on kill -9)."""
    if rank != 0:
        return None
    manifest = read_manifest(args.out)
    if manifest is not None and not args.resume:
        raise RunError(f"{args.out} already holds a run (checkpoint after epoch {manifest['epoch']}); pass "
                       f"--resume to continue it, or start fresh with another --out (or delete {args.out}).")
    try:
        os.makedirs(args.out, exist_ok=True)
        fd = os.open(os.path.join(args.out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"--out {args.out} is not a folder this process can write ({e.strerror or e}); "
                       f"choose another --out.") from e
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"{args.out} is in use by another run (it holds {args.out}/.lock); wait for it to end, "
                           f"or choose another --out.") from None
    return fd


def setup_distributed(args):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK in the environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    if args.batch_size % world_size:
        raise RunError(f"--batch-size {args.batch_size} must be divisible by the {world_size} "
                       f"processes (it is the global batch, split evenly across ranks).")
    return dist.get_rank(), world_size, device


def every_rank(state: torch.Tensor, world_size: int) -> list:
    """[the state of rank 0, of rank 1, ...] on every rank (a collective under DDP)."""
    # clone: a view's storage offset is lost on the way through torch.save and set_state
    return [state] if world_size == 1 else [s.clone() for s in all_gather_cat(state).chunk(world_size)]


# -- The data, the model and what the run holds -----------------------------------------------------

class MemorySource:
    """A data set held on the device, batches transformed there; imagefolder.FolderSource streams the rest."""

    skipped, wait_seconds = 0, 0.0               # nothing here is unreadable, nor waited for

    def __init__(self, dataset: data.ArrayDataset, device, train, test):
        try:
            self.x_train, self.y_train, self.x_test, self.y_test = (t.to(device) for t in dataset[:4])
        except torch.OutOfMemoryError as e:
            size = (dataset.x_train.nbytes + dataset.x_test.nbytes) / 2**30
            raise RunError(f"the data set ({size:.2f} GiB) does not fit in {device}'s memory beside "
                           f"other processes' ({e}): free the device, or use one with more memory.") from e
        self.num_train, self.num_test, self.num_classes = len(self.x_train), len(self.x_test), dataset.num_classes
        self.device, self.train, self.test = device, train, test
        # what every rank must agree on, as FolderSource's file list: the shapes and the labels
        labels = torch.cat([dataset.y_train, dataset.y_test]).cpu().numpy().tobytes()
        self.digest = hashlib.sha256(repr((dataset.x_train.shape, dataset.x_test.shape)).encode() + labels).digest()

    def train_batches(self, epoch: int, batches: list[torch.Tensor]):
        """(idx, x, y, keep) per minibatch of CPU indices; keep: None (FolderSource: 0 for a stand-in)."""
        for idx in batches:
            idx_dev = idx.to(self.device, non_blocking=True)
            yield idx, self.train(self.x_train[idx_dev]), self.y_train[idx_dev], None

    def test_batches(self, rank: int, world_size: int, batch_size: int):
        for start in range(rank * batch_size, self.num_test, batch_size * world_size):
            yield self.test(self.x_test[start:start + batch_size]), self.y_test[start:start + batch_size]

    def close(self) -> None:
        pass


def make_source(args, rank: int, world_size: int, device, say):
    """(the run's data source, the augmentation's generator)."""
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 7919 * rank)
    started = time.perf_counter()
    say(f"loading --data {args.data} ...")
    if args.data in EVENT_SETS:
        source = event_source(args, device, aug_gen, say)
    elif args.data not in FOLDER_SETS:
        if world_size > 1 and rank != 0:
            dist.barrier()           # rank 0 downloads and verifies first; the others then read
        try:    # the synthetic set keeps its own seed 0, not --seed: runs paired by seed see the same data
            dataset = data.load_dataset(args.data, args.data_dir, num_train=args.train_size, num_test=args.test_size)
        finally:
            if rank == 0 and world_size > 1:
                dist.barrier()       # (if rank 0 failed, the others fail the same way)
        norm = data.make_normalizer(args.data, device)
        augment = not args.no_augment and dataset.x_train.dim() == 4
        train = (lambda x: norm(data.augment(x, generator=aug_gen))) if augment else norm
        source = MemorySource(dataset, device, train, norm)
    else:
        folder = imagefolder.scan(args.data_dir)
        if args.data == "imagenet" and len(folder.classes) != 1000:
            raise RunError(f"--data imagenet: {args.data_dir} has {len(folder.classes)} classes, ImageNet-1k has "
                           f"1000; for another set in its layout (ImageNet-100, ...) use --data imagefolder.")
        source = imagefolder.FolderSource(folder, args.image_size, args.workers, device, seed=args.seed, rank=rank,
                                          skip_corrupt=args.skip_corrupt, augment=not args.no_augment,
                                          decoder=args.decoder)
    digest = torch.frombuffer(bytearray(source.digest), dtype=torch.uint8)
    if len({bytes(d.tolist()) for d in every_rank(digest, world_size)}) > 1:     # the same data, in order
        source.close()
        raise RunError(f"the processes see different files in {args.data_dir}; every node needs the same copy.")
    streamed = args.data in FOLDER_SETS
    decoding = f"; decoding with {source.decoder}, {args.workers} worker process(es) each" if streamed else ""
    say(f"loaded {source.num_train} training and {source.num_test} test examples of {source.num_classes} classes "
        f"in {time.perf_counter() - started:.1f} s{decoding}")
    return source, aug_gen


def event_source(args, device, aug_gen, say) -> MemorySource:
    """An event set's frames, resized on the device per batch, flipped and shifted as its recipe says."""
    recipe = frames.RECIPES[args.data]
    dataset, info = frames.load_frames(args.data_dir, args.T, sensor_size=recipe["sensor_size"])
    say(f"{info['folder']}: T = {info['T']}, {info['size'][0]}x{info['size'][1]} px, {info['layout']}, "
        f"{info['bytes'] / 2**20:.1f} MiB as uint8 counts ({info['clipped']} counts above 255 clipped)")
    resize = functools.partial(frames.resize_frames, size=(args.image_size, args.image_size))
    augment = not args.no_augment and (recipe["shift"] or recipe["flip"])
    train = (lambda x: frames.augment_frames(resize(x), aug_gen, shift=recipe["shift"], flip=recipe["flip"]))
    return MemorySource(dataset, device, train if augment else resize, resize)


def setup(args, rank: int, world_size: int, device) -> SimpleNamespace:
    """Everything a run holds: its place, its data source, model, optimizer, method, RNGs."""
    say = functools.partial(print, flush=True) if rank == 0 and not args.quiet else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    source, aug_gen = make_source(args, rank, world_size, device, say)
    model = models.build_model(args.model, source.num_classes, T=args.T, compile=not args.no_compile,
                               in_channels=2 if args.data in EVENT_SETS else None).to(device)
    return SimpleNamespace(
        args=args, rank=rank, world_size=world_size, device=device, main=rank == 0, say=say,
        tty=rank == 0 and not args.quiet and sys.stdout.isatty(),   # progress lines: terminals only
        source=source, model=model, tap=HeadTap(model.classifier, T=args.T), aug_gen=aug_gen,
        method=make_method(args, model, source.num_train, rank, world_size),
        train_model=model if world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None),
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                                  weight_decay=args.weight_decay),
        amp_ctx=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext,
        compiling=not args.no_compile, local_batch=args.batch_size // world_size,
        progress={"epoch": 0, "history": [], "example_passes": 0, "train_seconds": 0.0, "wall_seconds": 0.0})


# -- Training: a step, an epoch, evaluation ------------------------------------------------------

def train_step(r, idx, xb, yb, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """One update: (the loss, every example's score), left on the device. No host-device sync: the
    weights come from the sampler, on the CPU, finite by construction."""
    w = r.method.sampler.weights(idx).to(r.device, non_blocking=True)
    if keep is not None:                 # --skip-corrupt: a stand-in image trains with weight 0
        w = w * keep.to(r.device, non_blocking=True)
    with r.amp_ctx():
        r.train_model(xb)
    outputs, head_inputs = r.tap.pop()
    loss, scores = r.method.loss(outputs, yb, head_inputs, w)
    r.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    scores = r.method.after_backward(scores, w)
    r.optimizer.step()
    return loss.detach(), scores


def train_epoch(r, epoch: int) -> dict:
    """One epoch on the method's sample, its row. Only the epoch's end reads numbers off the device."""
    args, device = r.args, r.device
    lr = args.lr * r.method.begin_epoch(epoch)
    batches = torch.tensor(list(r.method.sampler), dtype=torch.long).split(r.local_batch)
    loss_sum, rate_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    first_bad = torch.full((), len(batches), device=device)     # the first step whose loss is NaN/inf
    seen_idx, seen_scores, seen_keep = [], [], []
    skipped_before, wait_before, t0 = r.source.skipped, r.source.wait_seconds, time.perf_counter()
    show = progress_line(r, len(batches))
    for step, (idx, xb, yb, keep) in enumerate(r.source.train_batches(epoch, batches)):
        for group in r.optimizer.param_groups:   # cosine decay to 0, a function of progress only
            group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * (epoch + step / len(batches)) / args.epochs))
        if r.compiling:              # on the first forward; the host waits for the compiler, no device sync
            r.say("compiling the LIF loop with torch.compile ...")
            compile_t0 = time.perf_counter()
        loss, scores = train_step(r, idx, xb, yb, keep)
        if r.compiling:
            r.say(f"compiled in {time.perf_counter() - compile_t0:.1f} s")
            r.compiling = False
        first_bad = torch.where(torch.isfinite(loss) | (first_bad < step), first_bad, step)
        loss_sum += loss * len(idx)
        rate_sum += r.model.spike_rate().detach().float()
        seen_idx.append(idx)         # on the CPU, where sampler.update reads it
        seen_scores.append(scores)
        seen_keep.append(torch.ones(len(idx)) if keep is None else keep)
        show(step + 1, (step + 1) * r.local_batch * r.world_size)
    host = torch.tensor([r.source.skipped - skipped_before, r.source.wait_seconds - wait_before], device=device)
    totals = torch.cat([torch.stack([loss_sum, rate_sum]), host])
    if r.world_size > 1:
        dist.all_reduce(totals)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    loss_total, rate_total, skipped, waited = totals.tolist()
    if first_bad < len(batches):
        raise Diverged(f"the loss became NaN/inf at epoch {epoch + 1}, step {int(first_bad) + 1} of {len(batches)} "
                       f"(lr {args.lr}). {last_good(args.out)} Lower --lr, or try --no-compile / no --amp.")
    kept = torch.cat([k.cpu() for k in seen_keep]) > 0        # a stand-in's score is dropped
    r.method.sampler.update(torch.cat(seen_idx)[kept], torch.cat(seen_scores).cpu()[kept])
    seconds, examples = time.perf_counter() - t0, sum(map(len, batches)) * r.world_size
    return {"epoch": epoch + 1, "examples": examples, "seconds": seconds, "train_loss": loss_total / examples,
            "spike_rate": rate_total / (len(batches) * r.world_size), "data_wait": waited / r.world_size / seconds,
            "skipped": round(skipped)}


def progress_line(r, total: int):
    """show(step, examples): on a terminal, the epoch's progress rewritten in place at most twice a
    second, cleared at the last step (logs keep one row an epoch)."""
    t0, shown = time.perf_counter(), [-math.inf]

    def show(step: int, examples: int) -> None:
        now = time.perf_counter()
        if r.tty and (step == total or now - shown[0] >= 0.5):
            shown[0] = now
            rate = examples / max(now - t0, 1e-9)
            text = "" if step == total else f"  step {step}/{total}  {now - t0:.0f} s  {rate:.0f} examples/s"
            print(f"\r{text:<60}\r", end="", flush=True)
    return show


def check_finite(r, epoch: int) -> None:
    """Diverged unless every floating parameter, buffer and momentum is finite: no NaN is checkpointed.
    One fused kernel (the norms) and one host sync per epoch."""
    tensors = [t for t in r.model.state_dict().values() if t.is_floating_point()]
    tensors += [t for state in r.optimizer.state.values() for t in state.values()
                if torch.is_tensor(t) and t.is_floating_point()]
    if not bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
        raise Diverged(f"parameters or buffers became NaN/inf during epoch {epoch + 1}; that epoch was not "
                       f"checkpointed. {last_good(r.args.out)} Lower --lr, or check --momentum / --weight-decay.")


def evaluate(r) -> tuple[float, int]:
    """(test accuracy of the rate readout, test images skipped as unreadable: label -1), over every rank."""
    r.model.eval()
    batch_size = r.local_batch if r.args.data in FOLDER_SETS + EVENT_SETS else 500   # large inputs: the training's
    counts = torch.zeros(3, dtype=torch.long, device=r.device)       # hits, scored, skipped
    with torch.no_grad(), r.amp_ctx():
        for xb, yb in r.source.test_batches(r.rank, r.world_size, batch_size):
            hits = r.model(xb).float().mean(0).argmax(-1) == yb    # [T, B, C]; no_grad: the tap records nothing
            counts += torch.stack([hits.sum(), (yb >= 0).sum(), (yb < 0).sum()])
    if r.world_size > 1:
        dist.all_reduce(counts)
    r.model.train()
    hits, total, skipped = counts.tolist()
    return hits / max(total, 1), skipped


# -- The run: resume, epochs, checkpoints, summary -------------------------------------------------

def run_state(r) -> dict:
    """What a checkpoint holds, key -> (get, set): saving and resuming both read this one table."""
    p = r.progress   # epoch (epochs done), history, example_passes, train_seconds, wall_seconds
    table = {"args": (lambda: plain_vars(r.args), lambda saved: None)}      # restore compares them first
    if r.args.data in FOLDER_SETS:   # the scores are per file: restore checks they are the same files
        table["files"] = (lambda: r.source.digest.hex(), lambda saved: None)
    table.update({k: (functools.partial(p.get, k), functools.partial(p.__setitem__, k)) for k in p})
    table.update({
        "model": (r.model.state_dict, r.model.load_state_dict),
        "optimizer": (r.optimizer.state_dict, r.optimizer.load_state_dict),
        "sampler": (r.method.sampler.state_dict, r.method.sampler.load_state_dict),
        # every rank's augmentation stream, so that a resumed DDP run continues each of them
        "aug_rng": (lambda: every_rank(r.aug_gen.get_state(), r.world_size),
                    lambda states: r.aug_gen.set_state(states[r.rank])),
        "cpu_rng": (torch.get_rng_state, torch.set_rng_state)})
    return table


def plain_vars(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


# Flags a resumed run may change: where things are and how they run, not what is trained.
MAY_DIFFER = {"data_dir", "workers", "decoder", "skip_corrupt", "device", "amp", "no_compile", "out",
              "resume", "stop_after", "quiet"}


def restore(r) -> None:
    """Continue the run in --out once its world size, settings and files match this run's."""
    args, table = r.args, run_state(r)
    state, path = load_checkpoint(args.out, "cpu"), os.path.join(args.out, read_manifest(args.out)["file"])
    if not (isinstance(state, dict) and set(state) == set(table) and isinstance(state["aug_rng"], list)
            and isinstance(state["args"], dict)):
        raise RunError(not_a_checkpoint(path, f"it holds {sorted(state) if isinstance(state, dict) else state!r}"))
    if len(state["aug_rng"]) != r.world_size:        # one augmentation stream per process
        n = len(state["aug_rng"])
        raise RunError(f"--resume: {args.out} was trained by {n} process(es), this run has {r.world_size}; resume "
                       f"with torchrun --nproc_per_node={n} (python for 1), or start a new run with another --out.")
    # A setting missing from an older checkpoint had its default then (the option did not exist).
    defaults = {flag[2:].replace("-", "_"): kw.get("default") for rows in FLAGS.values() for flag, kw, *_ in rows}
    differ = [f"--{k.replace('_', '-')} {state['args'].get(k, v)!r} -> {getattr(args, k)!r}"
              for k, v in defaults.items() if k not in MAY_DIFFER and state["args"].get(k, v) != getattr(args, k)]
    if differ:
        raise RunError("--resume with settings that differ from the saved run: " + ", ".join(differ)
                       + ". Resume with the original flags, or start a new run with another --out.")
    if "files" in state and state["files"] != r.source.digest.hex():
        raise RunError(f"--resume: the images in {args.data_dir} are not those this run started with (added, "
                       f"removed or renamed); restore the folder as it was, or start a new run with another --out.")
    for key, (_, put) in table.items():
        try:
            put(state[key])
        except Exception as e:   # a tensor of the wrong shape, a field of the wrong type, ...
            raise RunError(not_a_checkpoint(path, f"{key!r}: {type(e).__name__}: {e}")) from e
    r.say(f"resumed {args.out} after epoch {state['epoch']}")


def write_on_rank0(r, write, what: str) -> None:
    """write() on rank 0; if it fails (a full disk), every rank stops with the same message."""
    def attempt() -> None:
        try:
            if r.main:
                write()
        except OSError as e:     # ENOSPC, EIO, ...: the previous checkpoint is intact
            raise RunError(f"could not write {what} ({e.strerror or e}); free space there. "
                           f"{last_good(r.args.out, resume='--resume.', rerun='rerun.')}") from e
    agree(r.world_size, attempt)


def summarise(r) -> dict:
    """The run's summary; rank 0 writes it to <out>/results.json and prints it."""
    args, p = r.args, r.progress
    history, passes, full = p["history"], p["example_passes"], r.source.num_train * len(p["history"])
    summary = {
        "method": args.method, "ratio": args.ratio, "data": args.data, "model": args.model, "T": args.T,
        "epochs": args.epochs, "seed": args.seed, "world_size": r.world_size, "device": str(r.device),
        "torch": torch.__version__, "example_passes": passes, "full_data_passes": full,
        "pass_fraction": passes / full, "theoretical_speedup": full / passes,   # of the passes made
        "train_seconds": p["train_seconds"], "wall_seconds": p["wall_seconds"], "epochs_done": len(history),
        "best_test_acc": max(row["test_acc"] for row in history), "final_test_acc": history[-1]["test_acc"],
        **({"val_skipped": history[-1]["val_skipped"]} if args.skip_corrupt else {}),
        "history": history, "args": plain_vars(args)}
    path = os.path.join(args.out, "results.json")
    write_on_rank0(r, lambda: atomic_write_bytes(path, json.dumps(summary, indent=1).encode()), path)
    r.say(f"\n{args.method} r={args.ratio:g}: {passes} example-passes = {passes / full:.3f} of full data "
          f"(theoretical speedup {full / passes:.2f}x), train time {p['train_seconds']:.1f} s, test accuracy "
          f"best {summary['best_test_acc']:.2%} final {summary['final_test_acc']:.2%}\nresults: {path}")
    return summary


# The epoch row, column -> (width, format): data_wait for the streamed sets; under --skip-corrupt
# skipped (unreadable training images) and val_skipped (unreadable validation images).
COLUMNS = {"epoch": (5, "d"), "examples": (9, "d"), "seconds": (8, ".2f"), "train_loss": (10, ".4f"),
           "test_acc": (8, ".2%"), "spike_rate": (10, ".4f"), "data_wait": (9, ".1%"), "skipped": (7, "d"),
           "val_skipped": (11, "d")}


def train_epochs(r, started: float) -> dict:
    """The epochs left to do: one row and one checkpoint each, then the summary."""
    args, p = r.args, r.progress
    if p["epoch"] >= (args.stop_after or args.epochs):
        return finished(r)
    columns = [*list(COLUMNS)[:6], *["data_wait"] * (args.data in FOLDER_SETS),
               *["skipped", "val_skipped"] * args.skip_corrupt]
    r.say(f"{args.method} r={args.ratio:g} on {args.data} ({r.source.num_train} examples), {args.model} "
          f"T={args.T}, {r.world_size} process(es) on {r.device}")
    r.say(" ".join(f"{k:>{COLUMNS[k][0]}}" for k in columns))
    for row in p["history"]:
        r.say(" ".join(f"{row[k]:>{COLUMNS[k][0]}{COLUMNS[k][1]}}" for k in row))
    wall_before = p["wall_seconds"]  # of the earlier parts of a resumed run
    for epoch in range(p["epoch"], args.stop_after or args.epochs):
        try:
            row = train_epoch(r, epoch)
            row["test_acc"], row["val_skipped"] = evaluate(r)
        except data.DataError as e:     # an unreadable image: the last checkpoint is intact
            skip = " (add --skip-corrupt to train on past the image)."
            raise RunError(f"{e} {last_good(args.out, resume='--resume' + skip, rerun='rerun' + skip)}") from e
        check_finite(r, epoch)
        row = {k: row[k] for k in columns}
        p["history"].append(row)
        p.update(epoch=epoch + 1, example_passes=p["example_passes"] + row["examples"],
                 train_seconds=p["train_seconds"] + row["seconds"],
                 wall_seconds=wall_before + time.perf_counter() - started)
        r.say(" ".join(f"{row[k]:>{COLUMNS[k][0]}{COLUMNS[k][1]}}" for k in row))
        state = {key: get() for key, (get, _) in run_state(r).items()}   # every rank: aug_rng is gathered
        write_on_rank0(r, lambda: save_checkpoint(args.out, state), f"epoch {epoch + 1}'s checkpoint to {args.out}")
    return summarise(r)


def finished(r) -> dict:
    """The summary of a run with nothing left to do: its results.json, else rewritten from the checkpoint."""
    args, done = r.args, r.progress["epoch"]
    if done < args.epochs:
        r.say(f"{args.out} already stopped after epoch {done} of {args.epochs}; to continue, resume with "
              f"a later --stop-after (up to {args.epochs}) or without --stop-after.")
    else:
        r.say(f"{args.out} is finished ({done} of {args.epochs} epochs done). Start a new run with another --out.")
    path = os.path.join(args.out, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        r.say(f"{path} could not be read ({type(e).__name__}); it is rewritten from the last checkpoint.")
        return summarise(r)


def run(args) -> dict:
    """Train as `args` (from parse_args) say; return the summary, also in <out>/results.json."""
    started = time.perf_counter()
    rank, world_size, device = setup_distributed(args)
    with contextlib.ExitStack() as cleanup:     # run in reverse: the hooks, the source, the lock
        lock = agree(world_size, claim_out, args, rank)
        if lock is not None:
            cleanup.callback(os.close, lock)
        r = setup(args, rank, world_size, device)
        cleanup.callback(r.source.close)
        cleanup.callback(r.method.close)
        cleanup.callback(r.tap.remove)
        if args.resume:
            agree(world_size, restore, r)
        summary = train_epochs(r, started)
        if world_size > 1:
            dist.barrier()       # no rank tears down its process group while another still uses it
    return summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        run(args)
        return 0
    except (RunError, data.DataError, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:    # Ctrl-C: one line, from rank 0, instead of a traceback
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            launcher = f"torchrun --nproc_per_node={world_size}" if world_size > 1 else "python"
            command = f"{launcher} {os.path.relpath(__file__)} {shlex.join(a for a in argv if a != '--resume')}"
            where = last_good(args.out, resume=f"this command: {command} --resume", rerun=f"start again: {command}")
            print(("\n" if sys.stdout.isatty() else "") + "interrupted. " + where, file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
