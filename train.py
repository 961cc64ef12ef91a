"""Train a spiking network on CIFAR with spike-aware data pruning (SADP) or a baseline.

    python train.py --data cifar10 --ratio 0.3                  # spiking ResNet-19, SADP, r = 0.3
    python train.py --data synthetic --model convnet --epochs 5 --device cpu --no-compile
    python train.py --data cifar10 --method full                # the baselines: full, uniform,
    python train.py --data cifar10 --method infobatch --ratio 0.3   # infobatch, ann
    torchrun --nproc_per_node=4 train.py --data cifar10 --ratio 0.3   # several GPUs (DDP)
    torchrun --nproc_per_node=8 train.py --data imagenet --data-dir DIR --ratio 0.3 --amp
    python train.py --data imagefolder --data-dir DIR --model spiking_resnet34   # any such folder

Defaults follow the usual recipe for spiking ResNet-19 on CIFAR in the SNN literature: T = 4
timesteps, direct input encoding, SGD (momentum 0.9) at lr 0.1 with a cosine schedule, weight
decay 5e-4, batch 128, random crop + flip, 200 epochs. imagenet and imagefolder (DIR/train/<class>/,
DIR/val/<class>/, streamed from disk by imagefolder.py) default to SEW ResNet's: SEW-ResNet-34,
batch 256, no weight decay, 320 epochs, 224 px random-resized crops. Each epoch prints one row; the run ends
with a summary, written as JSON to --out with a checkpoint after every epoch (--resume continues).

Budget accounting is the same for every method: an "example-pass" is one example through one
forward and backward pass. Full data uses N per epoch; SADP, ann and uniform use
round((1 - r) N); InfoBatch uses what its pruning rule leaves, and full data in its last 12.5%
of epochs.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import functools
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

try:
    import fcntl                     # the --out lock; absent on Windows, where runs go unlocked
except ImportError:
    fcntl = None

import baselines
import data
import imagefolder
import models
from baselines import baseline_loss
from netbound import NetworkTap
from sadp import HeadTap, SADPSampler, all_gather_cat, spike_aware_loss

METHODS = ("sadp", "uniform", "infobatch", "ann", "full")
SEEDS = 2**32                        # --seed lies in [0, 2**32), as numpy's seeds do
FOLDER_SETS = ("imagenet", "imagefolder")   # streamed from disk (imagefolder.py); the rest: in memory

# Each family's defaults: the recipe the SNN literature trains its usual network with (README:
# "Training script" for CIFAR, "ImageNet and other folders of images"). A flag given wins.
RECIPES = {
    "cifar": dict(model="resnet19", epochs=200, batch_size=128, weight_decay=5e-4),  # tdBN / TET
    "mnist1d": dict(model="conv1d", epochs=40, batch_size=128, weight_decay=5e-4),
    "folder": dict(model="sew_resnet34", epochs=320, batch_size=256, weight_decay=0.0,
                   image_size=224),                                                 # SEW ResNet
}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=data.DATASETS + FOLDER_SETS, default="cifar10",
                   help="data set (default cifar10; synthetic needs no download; mnist1d needs "
                        "`pip install mnist1d`; imagenet and imagefolder stream DIR/train/<class>/ "
                        "and DIR/val/<class>/ from --data-dir and need `pip install pillow`)")
    p.add_argument("--data-dir", default=None,
                   help="where data sets are cached (default ./data); for imagenet (default "
                        "./data/imagenet) and imagefolder (required) the folder holding train/ and val/")
    p.add_argument("--train-size", type=int, default=None,
                   help="synthetic only: training examples (default 10000)")
    p.add_argument("--test-size", type=int, default=None,
                   help="synthetic only: test examples (default 2000)")
    add_folder_options(p)
    p.add_argument("--model", choices=models.MODELS, default=None,
                   help="network (default resnet19, the usual CIFAR SNN; conv1d for mnist1d, the "
                        "only one that takes its 1-D signals; sew_resnet34 for imagenet and "
                        "imagefolder; convnet for CPU demos)")
    p.add_argument("--T", type=int, default=4, help="timesteps (default 4, as in tdBN/TET on CIFAR)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default 200; 40 for mnist1d, where full data has converged by "
                        "then; 320 for imagenet/imagefolder)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size, split over DDP ranks (default 128; 256 for "
                        "imagenet/imagefolder)")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay (default 5e-4; 0 for imagenet/imagefolder)")
    p.add_argument("--no-augment", action="store_true",
                   help="no random crop + flip (on by default for the image sets, as for CIFAR; "
                        "mnist1d has none)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default 0)")
    p.add_argument("--per-timestep", action="store_true",
                   help="TET-style loss: mean over t of CE(o_t) instead of CE of the mean output")
    add_method_options(p)
    p.add_argument("--seed", type=int, default=0, help="random seed in [0, 2**32) (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--no-compile", action="store_true", help="run the LIF timestep loop eagerly")
    p.add_argument("--out", default=None,
                   help="run directory for results.json and checkpoints "
                        "(default runs/<data>-<model>-<method>-r<ratio>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="checkpoint and exit after this epoch (e.g. to fit a job's time limit); "
                        "continue later with --resume")
    p.add_argument("--quiet", action="store_true", help="no per-epoch rows")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    one_d = args.data == "mnist1d"
    resolve_defaults(parser, args)
    if (args.model == "conv1d") != one_d:
        parser.error(f"--model {args.model} does not take --data {args.data}: conv1d is the network "
                     f"for mnist1d's 1-D signals, the others are for images")
    for name, low in (("T", 1), ("epochs", 1), ("batch_size", 1), ("image_size", 8), ("workers", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}; got {getattr(args, name)}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.epochs:
        parser.error(f"--stop-after must lie in [1, --epochs = {args.epochs}]; got {args.stop_after}")
    for name in ("train_size", "test_size"):
        value = getattr(args, name)
        if value is not None and args.data != "synthetic":
            parser.error(f"--{name.replace('_', '-')} is for --data synthetic only")
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive; got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number; got {args.lr}")
    if not (math.isfinite(args.momentum) and 0 < args.momentum < 1):
        parser.error(f"--momentum must lie in (0, 1) (Nesterov SGD needs momentum > 0); got {args.momentum}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be a number >= 0; got {args.weight_decay}")
    if not 0 <= args.seed < SEEDS:
        parser.error(f"--seed must lie in [0, 2**32); got {args.seed}")
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} is a file, not a folder; choose another --data-dir")
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error(f"--label-smoothing must lie in [0, 1); got {args.label_smoothing}")
    check_method_args(parser, args)
    if args.train_size is not None and round((1.0 - args.ratio) * args.train_size) < 1:
        parser.error(f"--ratio {args.ratio:g} leaves no example of --train-size {args.train_size} "
                     f"to train on per epoch; lower --ratio or raise --train-size")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            parser.error(f"--device {args.device!r} is not supported; use auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda, but this machine has no CUDA GPU (or this torch build has "
                         "no CUDA); use --device cpu")
    if args.out is None:
        args.out = os.path.join("runs", f"{args.data}-{args.model}-{args.method}-r{args.ratio:g}-s{args.seed}")
    return args


def add_folder_options(p: argparse.ArgumentParser) -> None:
    """The streaming path's settings (--data imagenet / imagefolder only)."""
    p.add_argument("--image-size", type=int, default=None,
                   help="imagenet/imagefolder: crop size in pixels (default 224)")
    p.add_argument("--workers", type=int, default=None,
                   help="imagenet/imagefolder: decoding processes per GPU/process (default: the "
                        "CPU cores shared among the processes of this machine, at most 8)")
    p.add_argument("--decoder", choices=imagefolder.DECODERS, default=None,
                   help="imagenet/imagefolder: JPEG decoder (default auto: torchcodec where it is "
                        "installed, else Pillow; large JPEGs go to Pillow's reduced-size decoding)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="imagenet/imagefolder: train on past an image that cannot be decoded (it "
                        "gets weight 0 and is counted in the epoch's row) instead of stopping")


def resolve_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fills the flags left unset from the data set's RECIPES entry and --data-dir's default;
    refuses the streaming path's flags for the in-memory sets."""
    folder = args.data in FOLDER_SETS
    family = "folder" if folder else "mnist1d" if args.data == "mnist1d" else "cifar"
    for key, value in RECIPES[family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not folder:
        for flag in ("image_size", "workers", "skip_corrupt", "decoder"):
            if getattr(args, flag) not in (None, False):
                parser.error(f"--{flag.replace('_', '-')} is for --data imagenet / imagefolder only")
    else:
        args.decoder = args.decoder or "auto"
        if args.workers is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            args.workers = max(1, min(8, (os.cpu_count() or 1) // local))
    if args.data_dir is None:
        if args.data == "imagefolder":
            parser.error("--data imagefolder needs --data-dir DIR, the folder holding train/<class>/ "
                         "and val/<class>/")
        args.data_dir = os.path.join("data", "imagenet") if args.data == "imagenet" else "data"


def add_method_options(p: argparse.ArgumentParser) -> None:
    """--method and its settings, the variants included."""
    p.add_argument("--method", choices=METHODS, default="sadp",
                   help="sadp (default); baselines: full data, uniform random subset, "
                        "infobatch (Qin et al. ICLR 2024), ann (spike-blind logit-gradient score)")
    p.add_argument("--ratio", type=float, default=None,
                   help="pruning ratio r in [0, 1): fraction of example-passes saved per epoch "
                        "(default 0.3; not used with --method full)")
    p.add_argument("--epsilon", type=float, default=0.1,
                   help="sadp/ann: uniform share of the sampling distribution (default 0.1)")
    p.add_argument("--replacement", action=argparse.BooleanOptionalAction, default=False,
                   help="sadp/ann: draw the epoch i.i.d. from p (--replacement, as in the method's "
                        "derivation) or without replacement, each example at most once and with "
                        "probability (1 - r) N p_i (default: without; bench.py measures about 4x "
                        "lower variance of the epoch's gradient estimate at r = 0.3)")
    p.add_argument("--lr-scale", choices=("none", "budget"), default=None,
                   help="budget: multiply the learning rate by 1 / (1 - r), so that an epoch's summed "
                        "update equals a full-data epoch's in expectation, as InfoBatch's rescaling "
                        "does (default for sadp, ann and uniform; docs/results.md shows what it is "
                        "worth); none (default for full and infobatch)")
    p.add_argument("--exact-score", action="store_true",
                   help="sadp: exact head-gradient norm instead of the spike-aware bound")
    p.add_argument("--score", choices=("head", "network"), default="head",
                   help="sadp: the spike-aware bound on the head's gradient (default), or the "
                        "whole-network bound over every conv and linear weight, read off the "
                        "backward pass (sadp.NetworkTap; BN in train mode makes it approximate)")


def check_method_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--ratio's default, and errors (exit 2) for method settings out of range."""
    if args.method == "full":
        if args.ratio not in (None, 0.0):
            parser.error("--method full trains on all the data: drop --ratio (or pick a pruning method)")
        args.ratio = 0.0
    elif args.ratio is None:
        args.ratio = 0.3
    if not 0.0 <= args.ratio < 1.0:
        parser.error(f"--ratio must lie in [0, 1) (the fraction of example-passes saved); got {args.ratio}")
    if not 0.0 < args.epsilon <= 1.0:
        parser.error(f"--epsilon must lie in (0, 1]; got {args.epsilon}")
    if args.exact_score and args.method != "sadp":
        parser.error("--exact-score only applies to --method sadp")
    if args.score == "network" and (args.method != "sadp" or args.exact_score):
        parser.error("--score network only applies to --method sadp, without --exact-score")
    if args.lr_scale is None:
        args.lr_scale = "budget" if args.method in ("sadp", "ann", "uniform") else "none"
    if args.lr_scale == "budget" and args.method not in ("sadp", "ann", "uniform"):
        parser.error(f"--lr-scale budget applies to sadp, ann and uniform; not to {args.method}")


# ---------------------------------------------------------------------------------------------
# The method, picked once: a sampler and a loss-and-score function
# ---------------------------------------------------------------------------------------------

class Method(NamedTuple):
    """What --method decides, once. `sampler` (set_epoch, iter, weights, update, state_dict)
    picks each epoch's examples and weights; `begin_epoch(epoch)` draws the epoch and returns
    its learning-rate factor; `loss(outputs, targets, head_inputs, weights)` returns the
    minibatch loss and every example's score for the sampler's next epoch;
    `after_backward(scores, weights)` returns the scores to keep once loss.backward() has run
    (the loss's own, or with --score network the whole-network bound read off that backward);
    `close()` detaches any hooks."""
    sampler: object
    begin_epoch: Callable
    loss: Callable
    after_backward: Callable
    close: Callable


def make_method(args, model, num_examples: int, rank: int, world_size: int) -> Method:
    place = dict(seed=args.seed, rank=rank, world_size=world_size)
    readout = dict(per_timestep=args.per_timestep, label_smoothing=args.label_smoothing)
    if args.method == "uniform":
        sampler = baselines.uniform_sampler(num_examples, args.ratio, **place)
    elif args.method == "infobatch":
        sampler = baselines.InfoBatchSampler(num_examples, args.ratio, args.epochs, **place)
    else:   # sadp; ann (the same sampler, a spike-blind score); full (ratio 0: all, weight 1)
        sampler = SADPSampler(num_examples, args.ratio, epsilon=args.epsilon, replacement=args.replacement,
                              **place)

    def begin_epoch(epoch: int) -> float:
        sampler.set_epoch(epoch)
        return 1.0 / (1.0 - args.ratio) if args.lr_scale == "budget" else 1.0

    if args.method == "sadp":
        loss = functools.partial(spike_aware_loss, exact=args.exact_score, **readout)
    else:   # the loss score is what infobatch prunes by; full and uniform ignore scores
        loss = functools.partial(baseline_loss, kind="ann" if args.method == "ann" else "loss", **readout)
    if args.score == "network":     # read off the backward pass, so ready only after it
        tap = NetworkTap(model, T=args.T)
        # the loss's own weights; a --skip-corrupt stand-in (w = 0) gets a score that is dropped
        after_backward = lambda _, w: tap.pop(torch.where(w > 0, w, 1.0))
        return Method(sampler, begin_epoch, loss, after_backward, tap.remove)
    return Method(sampler, begin_epoch, loss, lambda scores, _: scores, lambda: None)


def make_method_or_exit(args, model, num_examples: int, rank: int, world_size: int) -> Method:
    try:
        return make_method(args, model, num_examples, rank, world_size)
    except ValueError as e:      # e.g. a ratio that leaves no example of a small data set
        raise RunError(f"--method {args.method} --ratio {args.ratio:g} on {num_examples} examples: {e}") from e


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, verified by SHA-256 before torch.load(weights_only=True)
# ---------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.
    The file gets the usual mode (0666 less the umask), not mkstemp's private 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(out: str, state: dict) -> None:
    """checkpoint-e<epoch>.pt (epoch: the epochs done, as the rows count them), then the manifest
    that names it and its SHA-256. A run killed, or a write failing (a full disk), at any moment
    leaves the previous manifest and the checkpoint it names intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    name = f"checkpoint-e{state['epoch']}.pt"
    old = read_manifest(out)
    atomic_write_bytes(os.path.join(out, name), payload)
    manifest = {"file": name, "sha256": hashlib.sha256(payload).hexdigest(), "epoch": state["epoch"]}
    try:
        atomic_write_bytes(os.path.join(out, "checkpoint.json"), json.dumps(manifest).encode())
    except BaseException:
        if old is None or old["file"] != name:
            os.unlink(os.path.join(out, name))      # the manifest still names the old one
        raise
    if old is not None and old["file"] != name and os.path.exists(os.path.join(out, old["file"])):
        os.unlink(os.path.join(out, old["file"]))


def read_manifest(out: str) -> dict | None:
    path = os.path.join(out, "checkpoint.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        return {"file": str(manifest["file"]), "sha256": str(manifest["sha256"]), "epoch": int(manifest["epoch"])}
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is corrupt ({e}); delete the run directory {out} to start over.") from e


def load_checkpoint(out: str, map_location) -> dict:
    manifest = read_manifest(out)
    if manifest is None:
        raise RunError(f"--resume: no checkpoint in {out}; run without --resume to start the run.")
    path = os.path.join(out, os.path.basename(manifest["file"]))
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except OSError as e:
        raise RunError(f"--resume: cannot read {path} ({e}); the run directory is incomplete.") from e
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest["sha256"]:
        raise RunError(f"--resume: {path} has SHA-256 {digest} but the manifest expects "
                       f"{manifest['sha256']}: the file is corrupt. Nothing was loaded; delete "
                       f"{out} to start over.")
    try:       # weights_only: tensors and plain containers only, no code runs
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:       # UnpicklingError, RuntimeError, EOFError, ...: all mean "not ours"
        raise RunError(_not_a_checkpoint(path, f"torch.load: {type(e).__name__}")) from e
    if not isinstance(state, dict) or not {"args", "epoch", "model"} <= set(state):
        raise RunError(_not_a_checkpoint(path, "it does not hold a run's state"))
    return state


def _not_a_checkpoint(path: str, why: str) -> str:
    return (f"--resume: {path} matches its manifest but is not a checkpoint of this program ({why}). "
            f"Nothing was restored; start fresh with another --out, or delete its folder.")


def last_good(out: str) -> str:
    """A sentence for error messages: where the last checkpoint is, only if there is one."""
    try:
        manifest = read_manifest(out)
    except RunError:
        manifest = None
    if manifest is None or not os.path.exists(os.path.join(out, manifest["file"])):
        return "No checkpoint was written yet."
    return f"The last good checkpoint (after epoch {manifest['epoch']}) is kept in {out}."


@contextmanager
def own_out(out: str, rank: int, world_size: int):
    """Hold <out>/.lock, exclusively, for the run's lifetime (rank 0 only): a second run into
    the same folder stops with a message instead of overwriting this one's files. flock is
    released by the OS when the process ends, even on kill -9, so a lock is never stale.
    Also checks, before any data is loaded, that --out is a folder this process can write."""
    error, fd = None, None
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
            fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            error = f"--out {out} is not a folder this process can write ({e.strerror or e}); choose another --out."
        if fd is not None and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                fd, error = None, (f"{out} is in use by another run (it holds {out}/.lock); wait for "
                                   f"it to end, or choose another --out.")
    if world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunError(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


class RunError(RuntimeError):
    """A problem the user can fix; train.py prints the message and exits with status 2."""


class Diverged(RuntimeError):
    """The loss, or a parameter or buffer, became NaN or infinite; train.py exits with status 3."""


# ---------------------------------------------------------------------------------------------
# Training: set up, one epoch, evaluate, save/restore, summarise
# ---------------------------------------------------------------------------------------------

def setup_distributed(args):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK in the environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if world_size == 1:
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    if args.batch_size % world_size:
        raise RunError(f"--batch-size {args.batch_size} must be divisible by the {world_size} "
                       f"processes (it is the global batch, split evenly across ranks).")
    return dist.get_rank(), world_size, device


def load_data(args, rank: int, world_size: int) -> data.ArrayDataset:
    """Rank 0 downloads and verifies first; the others then read the verified files.
    (If rank 0 fails, the others pass the barrier, fail the same way and exit too.)"""
    if world_size > 1 and rank != 0:
        dist.barrier()
    try:
        return data.load_dataset(args.data, args.data_dir, **_synthetic_sizes(args), seed=args.seed)
    finally:
        if rank == 0 and world_size > 1:
            dist.barrier()


class MemorySource:
    """A data set held whole on the device (CIFAR, synthetic, MNIST-1D), with batched crop + flip
    there. train.py reads its data through this interface; imagefolder.FolderSource streams
    the sets that do not fit."""

    skipped = 0                                  # nothing here is unreadable
    wait_seconds = 0.0                           # nor waited for

    def __init__(self, dataset: data.ArrayDataset, device, norm, augment: bool, aug_gen):
        self.x_train, self.y_train = dataset.x_train.to(device), dataset.y_train.to(device)
        self.x_test, self.y_test = dataset.x_test.to(device), dataset.y_test.to(device)
        self.num_train, self.num_test, self.num_classes = len(self.x_train), len(self.x_test), dataset.num_classes
        self.device, self.norm, self.augment, self.aug_gen = device, norm, augment, aug_gen

    def train_batches(self, epoch: int, batches: list[torch.Tensor]):
        """(idx, x, y, keep) per minibatch of indices; keep is None (every example is there)."""
        for idx in batches:
            idx_dev = idx.to(self.device, non_blocking=True)
            xb = self.x_train[idx_dev]
            yield idx, self.norm(data.augment(xb, generator=self.aug_gen) if self.augment else xb), \
                self.y_train[idx_dev], None

    def test_batches(self, rank: int, world_size: int, batch_size: int):
        """(x, y) for this rank's share of the test set."""
        for start in range(rank * batch_size, self.num_test, batch_size * world_size):
            yield self.norm(self.x_test[start:start + batch_size]), self.y_test[start:start + batch_size]

    def close(self) -> None:
        pass


def make_source(args, rank: int, world_size: int, device, dataset, stats):
    """The run's data: a FolderSource for imagenet/imagefolder, else a MemorySource."""
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 7919 * rank)
    if args.data not in FOLDER_SETS or dataset is not None:
        if dataset is None:
            dataset = load_data(args, rank, world_size)
        return MemorySource(dataset, device, data.make_normalizer(stats or args.data, device),
                            not args.no_augment and dataset.x_train.dim() == 4, aug_gen), aug_gen
    started = time.perf_counter()
    folder = imagefolder.scan(args.data_dir)
    if rank == 0 and not args.quiet:
        print(f"{args.data_dir}: {len(folder.train)} training and {len(folder.val)} validation images "
              f"in {len(folder.classes)} classes (listed in {time.perf_counter() - started:.1f} s)")
    if args.data == "imagenet" and len(folder.classes) != 1000:
        raise RunError(f"--data imagenet: {args.data_dir} has {len(folder.classes)} classes, "
                       f"ImageNet-1k has 1000; for another set in its layout (ImageNet-100, "
                       f"Tiny-ImageNet, ...) use --data imagefolder.")
    source = imagefolder.FolderSource(folder, args.image_size, args.workers, device, seed=args.seed,
                                      rank=rank, skip_corrupt=args.skip_corrupt,
                                      augment=not args.no_augment, decoder=args.decoder)
    if world_size > 1:    # every rank must index the same files in the same order
        digest = torch.frombuffer(bytearray(source.digest), dtype=torch.uint8)
        if len({bytes(d.tolist()) for d in _every_rank(digest, world_size)}) > 1:
            source.close()
            raise RunError(f"the processes see different files in {args.data_dir}; every node "
                           f"needs the same copy of the data set.")
    if rank == 0 and not args.quiet:
        print(f"decoding with {source.decoder}, {args.workers} worker process(es) per process")
    return source, aug_gen


def setup(args, place, dataset: data.ArrayDataset | None, stats) -> SimpleNamespace:
    """Everything a run holds: its place, its data source, model, optimizer, method, RNGs."""
    rank, world_size, device = place
    manifest = read_manifest(args.out) if os.path.isdir(args.out) else None
    if manifest is not None and not args.resume:
        raise RunError(f"{args.out} already holds a run (checkpoint after epoch {manifest['epoch']}); "
                       f"pass --resume to continue it, or start fresh with another --out (or "
                       f"delete {args.out}).")
    torch.manual_seed(args.seed)
    source, aug_gen = make_source(args, rank, world_size, device, dataset, stats)
    model = models.build_model(args.model, source.num_classes, T=args.T,
                               compile=not args.no_compile).to(device)
    r = SimpleNamespace(
        args=args, rank=rank, world_size=world_size, device=device, main=rank == 0,
        source=source, model=model, tap=HeadTap(model.classifier, T=args.T), train_model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                  nesterov=True, weight_decay=args.weight_decay),
        method=make_method_or_exit(args, model, source.num_train, rank, world_size),
        aug_gen=aug_gen,
        amp_ctx=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else nullcontext,
        local_batch=args.batch_size // world_size,
        progress={"epoch": 0, "history": [], "example_passes": 0, "train_seconds": 0.0,
                  "wall_seconds": 0.0})
    if world_size > 1:
        r.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    r.say = print if r.main and not args.quiet else (lambda *a, **k: None)
    r.tty = r.main and not args.quiet and sys.stdout.isatty()    # progress lines: terminals only
    return r


def cosine_lr(base_lr: float, progress: float) -> float:
    """Cosine decay from base_lr to 0 over training; progress in [0, 1]. The learning rate is
    a pure function of progress, so the schedule needs no state in the checkpoint."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_epoch(r, epoch: int) -> dict:
    """One epoch on the method's sample. Per-step numbers stay on the device: one sync at the end."""
    args, sampler, device = r.args, r.method.sampler, r.device
    lr = args.lr * r.method.begin_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    batches = order.split(r.local_batch)
    loss_sum, rate_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    seen_idx, seen_scores = [], []
    skipped_before, wait_before = r.source.skipped, r.source.wait_seconds
    _sync(device)
    t0 = time.perf_counter()
    show = progress_line(r, len(batches))
    for step, (idx, xb, yb, keep) in enumerate(r.source.train_batches(epoch, batches)):
        for group in r.optimizer.param_groups:
            group["lr"] = cosine_lr(lr, (epoch + step / len(batches)) / args.epochs)
        w = sampler.weights(idx).to(device, non_blocking=True)
        if keep is not None:         # --skip-corrupt: an unreadable image trains with weight 0
            w = w * keep
        with r.amp_ctx():
            r.train_model(xb)
        outputs, head_inputs = r.tap.pop()
        loss, scores = r.method.loss(outputs, yb, head_inputs, w)
        r.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        scores = r.method.after_backward(scores, w)
        r.optimizer.step()
        loss_d = loss.detach()
        bad_step = torch.where(torch.isfinite(loss_d) | (bad_step >= 0), bad_step, step)
        loss_sum += loss_d * len(idx)
        rate_sum += r.model.spike_rate().detach().float()
        if keep is not None:         # no score for a black stand-in
            idx, scores = idx[keep.bool().cpu()], scores[keep.bool()]
        seen_idx.append(idx)         # on the CPU, where sampler.update reads it
        seen_scores.append(scores)
        show(step + 1, (step + 1) * r.local_batch * r.world_size)
    if int(bad_step) >= 0:
        raise Diverged(
            f"the loss became NaN/inf at epoch {epoch + 1}, step {int(bad_step) + 1} of "
            f"{len(batches)} (lr {args.lr}). {last_good(args.out)} Lower --lr, or try "
            f"--no-compile / without --amp to locate the cause.")
    sampler.update(torch.cat(seen_idx), torch.cat(seen_scores))
    skipped = torch.tensor(float(r.source.skipped - skipped_before), device=device)
    waited = torch.tensor(r.source.wait_seconds - wait_before, device=device)
    if r.world_size > 1:
        for total in (loss_sum, rate_sum, skipped, waited):
            dist.all_reduce(total)
    _sync(device)
    examples, seconds = len(order) * r.world_size, time.perf_counter() - t0
    row = {"epoch": epoch + 1, "examples": examples, "seconds": seconds,
           "train_loss": loss_sum.item() / examples,
           "spike_rate": rate_sum.item() / (len(batches) * r.world_size)}
    if args.data in FOLDER_SETS:     # the share of the epoch spent waiting for images (rank mean)
        row["data_wait"] = waited.item() / r.world_size / seconds
    if args.skip_corrupt:
        row["skipped"] = int(skipped.item())
    return row


def progress_line(r, total: int) -> Callable:
    """show(step, examples): one line, rewritten in place with \r, of an epoch's progress. Only
    on a terminal (redirected logs stay one row per epoch), at most twice a second; the last
    step clears it for the epoch's row."""
    if not r.tty:
        return lambda step, examples: None
    t0, shown = time.perf_counter(), [-math.inf]

    def show(step: int, examples: int) -> None:
        now = time.perf_counter()
        if step == total:
            print("\r" + " " * 60 + "\r", end="", flush=True)
        elif now - shown[0] >= 0.5:
            shown[0] = now
            print(f"\r  step {step}/{total}  {now - t0:.0f} s  {examples / max(now - t0, 1e-9):.0f} "
                  f"examples/s", end="", flush=True)
    return show


def check_finite(r, epoch: int) -> None:
    """Diverged unless every floating parameter, buffer and momentum is finite, so that a NaN
    never reaches a checkpoint. One fused kernel (the norms) and one host sync per epoch."""
    tensors = [t for t in r.model.state_dict().values() if t.is_floating_point()]
    tensors += [t for state in r.optimizer.state.values() for t in state.values()
                if torch.is_tensor(t) and t.is_floating_point()]
    if not bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
        raise Diverged(
            f"parameters or buffers became NaN/inf during epoch {epoch + 1}; that epoch was not "
            f"checkpointed. {last_good(r.args.out)} Lower --lr, or check --momentum / --weight-decay.")


def evaluate(r, batch_size: int = 500) -> float:
    """Test accuracy of the rate readout (argmax of the mean over t), sharded over ranks. An
    image skipped as unreadable (label -1) counts in neither the hits nor the total."""
    r.model.eval()
    if r.args.data in FOLDER_SETS:      # decoded images: batches of the training size fit
        batch_size = r.local_batch
    correct = torch.zeros((), dtype=torch.long, device=r.device)
    total = torch.zeros((), dtype=torch.long, device=r.device)
    with torch.no_grad(), r.amp_ctx():
        for xb, yb in r.source.test_batches(r.rank, r.world_size, batch_size):
            outputs = r.model(xb)                      # [T, B, C]; the tap records no no_grad pass
            correct += (outputs.float().mean(0).argmax(-1) == yb).sum()
            total += (yb >= 0).sum()
    if r.world_size > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    r.model.train()
    return correct.item() / max(total.item(), 1)


def run_state(r) -> dict:
    """What a checkpoint holds, key -> (get, set): saving and resuming both read this one table.
    "args" (and for folder sets "files") come first, so a resume with other settings or other
    files fails before anything is loaded."""
    p = r.progress   # epoch (epochs done), history, example_passes, train_seconds, wall_seconds
    table = {"args": (lambda: _args_dict(r.args), lambda saved: _check_same_run(r.args, saved))}
    if r.args.data in FOLDER_SETS:   # the scores are per file: the files must be the same ones
        table["files"] = (lambda: r.source.digest.hex(), functools.partial(_check_same_files, r))
    table.update({k: (functools.partial(p.get, k), functools.partial(p.__setitem__, k)) for k in p})
    table.update({
        "model": (r.model.state_dict, r.model.load_state_dict),
        "optimizer": (r.optimizer.state_dict, r.optimizer.load_state_dict),
        "sampler": (r.method.sampler.state_dict, r.method.sampler.load_state_dict),
        # every rank's augmentation stream, so that a resumed DDP run continues each of them
        "aug_rng": (lambda: _every_rank(r.aug_gen.get_state(), r.world_size),
                    lambda states: r.aug_gen.set_state(states[r.rank])),
        "cpu_rng": (torch.get_rng_state, torch.set_rng_state),
    })
    return table


def save(r) -> None:
    """Checkpoint the run (rank 0 writes; every rank takes part in gathering the RNG states)."""
    state = {key: get() for key, (get, _) in run_state(r).items()}
    if r.main:
        try:
            save_checkpoint(r.args.out, state)
        except OSError as e:     # ENOSPC, EIO, ...: the previous checkpoint is intact
            raise RunError(f"could not write the checkpoint of epoch {state['epoch']} to {r.args.out} "
                           f"({e.strerror or e}). {last_good(r.args.out)} Free space, then "
                           f"continue with --resume.") from e
    if r.world_size > 1:
        dist.barrier()


def restore(r) -> None:
    state = load_checkpoint(r.args.out, map_location="cpu")
    path = os.path.join(r.args.out, read_manifest(r.args.out)["file"])
    table = run_state(r)
    if set(state) != set(table):
        raise RunError(_not_a_checkpoint(path, f"keys {sorted(set(state) ^ set(table))} differ"))
    for key, (_, put) in table.items():
        try:
            put(state[key])
        except RunError:
            raise
        except Exception as e:   # a tensor of the wrong shape, a field of the wrong type, ...
            raise RunError(_not_a_checkpoint(path, f"{key!r}: {type(e).__name__}: {e}")) from e
    r.say(f"resumed {r.args.out} after epoch {state['epoch']}")


def summarise(r) -> dict:
    """The run's summary; rank 0 writes it to <out>/results.json and prints it."""
    args, p = r.args, r.progress
    history, passes, N = p["history"], p["example_passes"], r.source.num_train
    summary = {
        "method": args.method, "ratio": args.ratio, "data": args.data, "model": args.model,
        "T": args.T, "epochs": args.epochs, "seed": args.seed, "world_size": r.world_size,
        "device": str(r.device), "torch": torch.__version__,
        "example_passes": passes, "full_data_passes": N * len(history),
        "pass_fraction": passes / (N * len(history)),
        "theoretical_speedup": 1.0 / (1.0 - args.ratio),
        "train_seconds": p["train_seconds"], "wall_seconds": p["wall_seconds"],
        "epochs_done": len(history),
        "best_test_acc": max(row["test_acc"] for row in history),
        "final_test_acc": history[-1]["test_acc"],
        "history": history, "args": _args_dict(args),
    }
    if r.main:
        try:
            atomic_write_bytes(os.path.join(args.out, "results.json"), json.dumps(summary, indent=1).encode())
        except OSError as e:
            raise RunError(f"could not write {args.out}/results.json ({e.strerror or e}). "
                           f"{last_good(args.out)}") from e
        r.say(f"\n{args.method} r={args.ratio:g}: {passes} example-passes = "
              f"{summary['pass_fraction']:.3f} of full data (theoretical speedup "
              f"{summary['theoretical_speedup']:.2f}x), train time {p['train_seconds']:.1f} s, "
              f"test accuracy best {summary['best_test_acc']:.2%} final {summary['final_test_acc']:.2%}"
              f"\nresults: {os.path.join(args.out, 'results.json')}")
    return summary


def run(args, dataset: data.ArrayDataset | None = None, stats=None) -> dict:
    """Train as `args` say; return the summary (also written to args.out/results.json).

    dataset, stats: a data set already in memory and its normalisation (mean, std), in place
    of loading args.data (bench.py uses this for data sets that train.py does not ship).
    """
    started = time.perf_counter()
    place = setup_distributed(args)
    with own_out(args.out, place[0], place[1]):
        r = setup(args, place, dataset, stats)
        if args.resume:
            restore(r)
        try:
            summary = train_epochs(r, started)
        finally:
            r.tap.remove()
            r.method.close()
            r.source.close()
        if r.world_size > 1:
            dist.barrier()       # no rank tears down its process group while another still uses it
    return summary


def train_epochs(r, started: float) -> dict:
    """The epochs left to do: one row and one checkpoint each, then the summary."""
    args, p = r.args, r.progress
    last_epoch = args.epochs if args.stop_after is None else args.stop_after
    if p["epoch"] >= last_epoch:     # --resume of a finished run: leave its results as they are
        return finished(r)
    r.say(f"{args.method} r={args.ratio:g} on {args.data} ({r.source.num_train} examples), {args.model} "
          f"T={args.T}, {r.world_size} process(es) on {r.device}")
    if not args.no_compile:
        r.say("(the first step compiles the LIF loop with torch.compile: tens of seconds, once)")
    r.say(f"{'epoch':>5} {'examples':>9} {'seconds':>8} {'train_loss':>10} {'test_acc':>8} {'spike_rate':>10}"
          + (f" {'data_wait':>9}" if args.data in FOLDER_SETS else "")
          + (f" {'skipped':>7}" if args.skip_corrupt else ""))
    for row in p["history"]:
        r.say(_row(row))
    wall_before = p["wall_seconds"]  # of the earlier parts of a resumed run
    for epoch in range(p["epoch"], last_epoch):
        try:
            row = train_epoch(r, epoch)
            row["test_acc"] = evaluate(r)
        except data.DataError as e:     # an unreadable image: the last checkpoint is intact
            raise RunError(f"{e} {last_good(args.out)}") from e
        check_finite(r, epoch)
        p["history"].append(row)
        p.update(epoch=epoch + 1, example_passes=p["example_passes"] + row["examples"],
                 train_seconds=p["train_seconds"] + row["seconds"],
                 wall_seconds=wall_before + time.perf_counter() - started)
        r.say(_row(row))
        save(r)
    return summarise(r)


def finished(r) -> dict:
    """The summary of a run that has nothing left to do, as it was written; results.json stays."""
    path = os.path.join(r.args.out, "results.json")
    r.say(f"{r.args.out} is finished ({r.progress['epoch']} of {r.args.epochs} epochs done); "
          f"{path} is left as it is. Start a new run with another --out.")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return summarise(r)          # killed between the last checkpoint and results.json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _every_rank(state: torch.Tensor, world_size: int) -> list:
    """[the state of rank 0, of rank 1, ...] on every rank (a collective under DDP)."""
    # clone: a view's storage offset is lost on the way through torch.save and set_state
    return [state] if world_size == 1 else [s.clone() for s in all_gather_cat(state).chunk(world_size)]


def _synthetic_sizes(args) -> dict:
    if args.data != "synthetic":
        return {}
    return {k: v for k, v in (("num_train", args.train_size), ("num_test", args.test_size)) if v is not None}


_SAME_RUN = ("data", "train_size", "test_size", "model", "T", "epochs", "batch_size", "lr", "momentum",
             "no_augment", "image_size",
             "weight_decay", "label_smoothing", "per_timestep", "method", "ratio", "epsilon",
             "replacement", "exact_score", "score", "seed", "lr_scale")


def _check_same_files(r, saved: str) -> None:
    if saved != r.source.digest.hex():
        raise RunError(f"--resume: the images in {r.args.data_dir} are not those this run started "
                       f"with (an image or class added, removed or renamed); its scores and "
                       f"checkpoint belong to the old list. Restore the folder as it was (replace "
                       f"a damaged image by a good copy of the same name), or start a new run with "
                       f"another --out.")


def _args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def _check_same_run(args, saved: dict) -> None:
    # A setting missing from an older checkpoint had its default then (the option did not exist).
    defaults = build_parser().parse_args([])
    saved = {k: saved.get(k, getattr(defaults, k)) for k in _SAME_RUN}
    differ = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(args, k)!r}"
              for k in _SAME_RUN if saved[k] != getattr(args, k)]
    if differ:
        raise RunError("--resume with settings that differ from the saved run: " + ", ".join(differ)
                       + ". Resume with the original flags, or start a new run with another --out.")


def _row(r: dict) -> str:
    return (f"{r['epoch']:>5} {r['examples']:>9} {r['seconds']:>8.2f} {r['train_loss']:>10.4f} "
            f"{r['test_acc']:>8.2%} {r['spike_rate']:>10.4f}"
            + (f" {r['data_wait']:>9.1%}" if "data_wait" in r else "")
            + (f" {r['skipped']:>7}" if "skipped" in r else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (RunError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
