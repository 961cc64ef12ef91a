"""The measurements behind every number in README.md, side by side in one run.

    python bench.py --quick                 # a few minutes on 2 CPU cores
    python bench.py --out bench.json        # everything (tens of minutes on a CPU)
    python bench.py --only variance,lif     # some sections

Sections (each prints a markdown table; all of them go to --out as JSON):
  speedup   training time of sadp at r in {0.3, 0.5, 0.7} vs full data, runs interleaved
            A/B/A/B, median of the ratios, against the theoretical 1/(1 - r); and where the gap goes
  overhead  one training step with the spike-aware score vs the same step with a plain loss
  variance  per-example gradients of *all* parameters on a partly trained SNN: variance of the
            re-weighted gradient estimator under each score, as a ratio to uniform sampling and
            to the oracle p ~ ||grad||, and each score's rank correlation with the true norm
  lif       LIF forward+backward: eager vs compiled, and SpikingJelly / snnTorch when installed
  accuracy  full, uniform, infobatch, ann, sadp at r in {0.3, 0.5, 0.7}, several seeds, on the
            synthetic data set and on scikit-learn's digits (when scikit-learn is installed)
  evidence  the paired comparison that decides whether SADP beats a random subset: MNIST-1D
            (and the synthetic set), full / uniform / ann / sadp / InfoBatch at its nominal ratio
            and at the ratio that matches the others' example-passes, r in {0.3, 0.5, 0.7}, the
            same seeds for every method; then the method variants at r in {0.5, 0.7}. Runs go to
            a pool of single-threaded worker processes; each finished run is appended to
            --evidence-log, and a rerun with the same log skips the runs already there
  throughput  (GPU; skipped on a CPU unless --set throughput=true) images/s of a CIFAR-shaped
            training run of ResNet-19, T=4, bf16: compiled vs eager LIF, full vs sadp at r = 0.3
  netbound  MNIST-1D, conv1d: the whole-network bound (sadp.NetworkTap) vs the head bound, ann
            and loss: rank correlation with the true per-example norm over all conv + linear
            weights, estimator variance vs uniform and the oracle, and its cost per step
  datapath  the streaming path of --data imagenet/imagefolder on generated ImageNet-like JPEGs
            at 224 px: decoding + augmentation per process (full-size vs reduced-size JPEG
            decoding), the DataLoader with 1 and 2 workers, and the share of a SADP epoch spent
            waiting for data (convnet on a CPU; SEW-ResNet-34, bf16, compiled on a GPU)

Nothing here asserts: the benchmark reports. Timings are ratios measured in one process,
interleaved, because these machines are shared and noisy; absolute times are only meaningful
on a dedicated GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import data
import models
import train
from baselines import baseline_loss
from netbound import NetworkTap
from sadp import (HeadTap, SADPSampler, head_gradient_bound, head_gradient_norm,
                  spike_aware_loss)

# The accuracy section's methods at each ratio: train.py's, plus sadp drawn i.i.d. (with
# replacement, the derivation as written in sadp.py) next to its default without replacement.
METHODS = ("uniform", "infobatch", "ann", "sadp-iid", "sadp")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def table(title: str, header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by order, fine for continuous scores)."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def digits_dataset(seed: int = 0) -> tuple[data.ArrayDataset, tuple]:
    """scikit-learn's handwritten digits (1797 8x8 images, 10 classes), upscaled 2x to 16x16
    RGB uint8 (16x16), split 80/20 with a fixed permutation. Needs scikit-learn (not a requirement of
    the project; bench.py skips it when absent)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) * (255.0 / 16.0)
    x = x.round().to(torch.uint8).repeat_interleave(2, 1).repeat_interleave(2, 2)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    mean = (x[tr].float() / 255).mean().item()
    std = (x[tr].float() / 255).std().item()
    return data.ArrayDataset(x[tr], y[tr], x[te], y[te], 10), ((mean,) * 3, (std,) * 3)


def bench_args(cfg: dict, out: str, **over) -> argparse.Namespace:
    """train.py's arguments for one benchmark run."""
    flags = {"data": "synthetic", "model": "convnet", "device": cfg["device"], "T": cfg["T"],
             "epochs": cfg["epochs"], "batch-size": cfg["batch_size"], "lr": cfg["lr"],
             "method": "sadp", "ratio": None, "seed": 0, "out": out}
    flags.update({k.replace("_", "-"): v for k, v in over.items()})
    argv = ["--quiet"] + ([] if cfg["compile"] else ["--no-compile"])
    if cfg.get("amp"):
        argv.append("--amp")
    for k, v in flags.items():
        if v is None:
            continue
        if v is True:
            argv.append(f"--{k}")
        elif v is not False:
            argv += [f"--{k}", str(v)]
    return train.parse_args(argv)


def train_once(cfg, dataset, stats, **over) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return train.run(bench_args(cfg, os.path.join(tmp, "run"), **over), dataset=dataset, stats=stats)


# ---------------------------------------------------------------------------------------------
# 1. Speedup vs the theoretical 1 / (1 - r)
# ---------------------------------------------------------------------------------------------

def bench_speedup(cfg, results):
    ds = data.make_synthetic(cfg["speed_train"], 500, seed=0)
    ratios = cfg["speed_ratios"]
    model = cfg["speed_model"]
    train_once(cfg, ds, None, method="full", epochs=1, model=model)   # warm-up: compile, caches
    per_ratio = {r: [] for r in ratios}
    times = {r: [] for r in ratios}
    for rep in range(cfg["speed_reps"]):
        for r in ratios:                                          # A/B interleaved
            full = train_once(cfg, ds, None, method="full", seed=rep, model=model)
            sadp = train_once(cfg, ds, None, method="sadp", ratio=r, seed=rep, model=model)
            per_ratio[r].append(full["train_seconds"] / sadp["train_seconds"])
            times[r].append((full["train_seconds"], sadp["train_seconds"]))
    rows, out = [], []
    for r in ratios:
        measured = statistics.median(per_ratio[r])
        theory = 1 / (1 - r)
        rows.append([r, round(measured, 3), round(theory, 3), round(measured / theory, 3),
                     f"{min(per_ratio[r]):.3f}-{max(per_ratio[r]):.3f}"])
        out.append({"ratio": r, "measured_speedup": measured, "theoretical": theory,
                    "fraction_of_theoretical": measured / theory, "all_ratios": per_ratio[r],
                    "seconds_full_sadp": times[r]})
    results["speedup"] = {"runs": out, "config": {k: cfg[k] for k in ("speed_train", "speed_model", "epochs", "T", "batch_size")}}
    table(f"Speedup of sadp over full data (synthetic, {cfg['speed_train']} examples, {cfg['speed_model']}, "
          f"T={cfg['T']}, {cfg['epochs']} epochs, median of {cfg['speed_reps']} interleaved pairs)",
          ["ratio r", "measured speedup", "1/(1-r)", "measured / theoretical", "range"], rows)

    # Where the gap goes: the per-epoch sampler work, timed alone, at this N and at ImageNet's N.
    rows = []
    for N in (cfg["speed_train"], 1_281_167):
        s = SADPSampler(N, 0.3)
        s.update(torch.arange(N), torch.rand(N))
        t_epoch = statistics.median(timeit(lambda: (s.set_epoch(1), list(s)), torch.device("cpu")) for _ in range(3))
        idx, sc = torch.randint(0, N, (round(0.7 * N),)), torch.rand(round(0.7 * N))
        t_update = statistics.median(timeit(lambda: s.update(idx, sc), torch.device("cpu")) for _ in range(3))
        w_idx = torch.randint(0, N, (cfg["batch_size"],))
        t_weights = statistics.median(timeit(lambda: s.weights(w_idx), torch.device("cpu")) for _ in range(50))
        rows.append([N, round(t_epoch * 1e3, 2), round(t_update * 1e3, 2), round(t_weights * 1e6, 1)])
        results["speedup"].setdefault("sampler_ms", []).append(
            {"N": N, "set_epoch_and_iter_ms": t_epoch * 1e3, "update_epoch_ms": t_update * 1e3,
             "weights_per_batch_us": t_weights * 1e6})
    table("Sampler cost per epoch (CPU): freeze p + draw, one update with a whole epoch of scores, "
          "weights of one batch", ["N", "set_epoch + iter (ms)", "update (ms)", "weights (us/batch)"], rows)


# ---------------------------------------------------------------------------------------------
# 2. Score overhead per training step
# ---------------------------------------------------------------------------------------------

def bench_overhead(cfg, results):
    device = torch.device(cfg["device"])
    ds = data.make_synthetic(cfg["batch_size"], 10, seed=0)
    norm = data.Normalizer("synthetic", device)
    x, y = norm(ds.x_train.to(device)), ds.y_train.to(device)
    w = torch.ones(len(y), device=device)
    rows, out = [], {}
    for name in cfg["overhead_models"]:
        torch.manual_seed(0)
        model = models.build_model(name, 10, T=cfg["T"], compile=cfg["compile"]).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        tap = HeadTap(model.classifier, T=cfg["T"])
        bs = len(y) if name == "convnet" else cfg["big_batch"]
        xb, yb, wb = x[:bs], y[:bs], w[:bs]
        amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.get("amp") else nullcontext

        def step(kind):
            def run():
                with amp():
                    model(xb)
                outputs, head_inputs = tap.pop()
                if kind == "plain":
                    loss = F.cross_entropy(outputs.float().mean(0), yb)
                elif kind == "bound":
                    loss, _ = spike_aware_loss(outputs, yb, head_inputs, wb)
                else:
                    loss, _ = spike_aware_loss(outputs, yb, head_inputs, wb, exact=True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return run

        kinds = ("plain", "bound", "exact")
        for _ in range(3):                                        # warm-up, compile
            for k in kinds:
                step(k)()
        samples = {k: [] for k in kinds}
        for _ in range(cfg["overhead_reps"]):                    # interleaved
            for k in kinds:
                samples[k].append(timeit(step(k), device))
        plain = statistics.median(samples["plain"])
        ratios = {k: statistics.median(a / b for a, b in zip(samples[k], samples["plain"])) for k in kinds}
        t_bound, t_exact = _score_alone(model, tap, xb, yb, cfg["T"], amp, device)
        tap.remove()
        rows.append([name, bs, round(plain * 1e3, 1), f"{(ratios['bound'] - 1) * 100:+.2f}%",
                     f"{(ratios['exact'] - 1) * 100:+.2f}%", round(t_bound * 1e6, 1),
                     f"{t_bound / plain * 100:.3f}%", round(t_exact * 1e6, 1), f"{t_exact / plain * 100:.3f}%"])
        out[name] = {"batch": bs, "plain_step_ms": plain * 1e3, "bound_overhead": ratios["bound"] - 1,
                     "exact_overhead": ratios["exact"] - 1, "bound_alone_us": t_bound * 1e6,
                     "exact_alone_us": t_exact * 1e6, "samples": samples}
    results["overhead"] = out
    table(f"Score overhead per training step ({device.type}, T={cfg['T']}, median of "
          f"{cfg['overhead_reps']} interleaved steps)",
          ["model", "batch", "plain step (ms)", "step with bound", "step with exact",
           "bound alone (us)", "bound / step", "exact alone (us)", "exact / step"], rows)


def _score_alone(model, tap, xb, yb, T: int, amp, device) -> tuple[float, float]:
    """Seconds of the bound and of the exact head norm alone, on one batch's head inputs: what
    the per-step overhead is made of."""
    with torch.no_grad(), amp():
        model(xb)
    outputs, head_inputs = tap.pop()
    g = (outputs.float().mean(0).softmax(-1) - F.one_hot(yb, 10)).div(T).expand_as(outputs.float())
    t_bound = statistics.median(timeit(lambda: head_gradient_bound(g, head_inputs), device) for _ in range(50))
    t_exact = statistics.median(timeit(lambda: head_gradient_norm(g, head_inputs), device) for _ in range(50))
    return t_bound, t_exact


# ---------------------------------------------------------------------------------------------
# 3. Gradient variance vs the oracle
# ---------------------------------------------------------------------------------------------

def per_example_grads(model, x, y, params=None):
    """Flattened gradient of every parameter (or of `params`) for each example (BN in eval
    mode: independent)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    for i in range(len(x)):
        out = model(x[i:i + 1])
        loss = F.cross_entropy(out.float().mean(0), y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def estimator_variance(G: torch.Tensor, p: torch.Tensor, m: int = 1) -> float:
    """Closed form: trace of Cov of (1/m) sum_j w_{i_j} g_{i_j}, i_j ~ p i.i.d., w = 1/(N p):
    (sum_i ||g_i||^2 / (N^2 p_i) - ||mean g||^2) / m. Rows of G are per-example gradients."""
    N = G.shape[0]
    return float((G.square().sum(1) / (N * N * p)).sum() - G.mean(0).square().sum()) / m


def sampled_variance(G, scores, ratio, eps, replacement, epochs) -> float:
    """Trace of the covariance of (1/m) sum_j w_j g_j over `epochs` draws of SADPSampler."""
    N = G.shape[0]
    s = SADPSampler(N, ratio, seed=123, epsilon=eps, replacement=replacement)
    s.update(torch.arange(N), scores.double().clamp_min(0))
    estimates = []
    for e in range(epochs):
        s.set_epoch(e)
        idx = torch.tensor(list(s))
        estimates.append((s.weights(idx).double()[:, None] * G[idx]).mean(0))
    return float(torch.stack(estimates).var(0).sum())


def score_table(model, tap, x, y, T):
    """Every score for every example, from one batched forward (eval mode)."""
    with torch.no_grad():
        model(x)
    outputs, head_inputs = tap.pop()
    _, bound = spike_aware_loss(outputs, y, head_inputs)
    _, exact = spike_aware_loss(outputs, y, head_inputs, exact=True)
    _, ann = baseline_loss(outputs, y, kind="ann")
    _, loss = baseline_loss(outputs, y, kind="loss")
    return {"sadp": bound, "sadp-exact": exact, "ann": ann, "loss": loss}


def data_sets(cfg, num_train, num_test) -> list[dict]:
    """The data sets of the variance and accuracy sections, with how each is trained.

    digits is small and 16x16: batch 32 (enough steps per epoch) and no crop/flip (a 4-pixel
    shift of a 16-pixel digit, or a mirrored digit, is another digit)."""
    sets = [{"name": "synthetic", "data": data.make_synthetic(num_train, num_test, seed=0),
             "stats": None, "batch_size": cfg["batch_size"], "augment": True,
             "epochs": cfg["epochs_acc"], "var_epochs": cfg["var_epochs"]}]
    if _has_sklearn():
        ds, stats = digits_dataset()
        sets.append({"name": "digits", "data": ds, "stats": stats, "batch_size": 32, "augment": False,
                     "epochs": cfg["epochs_digits"], "var_epochs": cfg["var_epochs_digits"]})
    return sets


def trained_models(cfg, spec, directory):
    """(epoch, model) after each epoch in spec["var_epochs"] of one full-data train.py run (its
    cosine schedule spans the last of them), read back from the run's checkpoint at each stop.
    spec["model"]: the network (default convnet)."""
    ds, stops, out = spec["data"], spec["var_epochs"], os.path.join(directory, "run")
    name = spec.get("model", "convnet")
    model = models.build_model(name, ds.num_classes, T=cfg["T"], compile=cfg["compile"])
    for k, stop in enumerate(stops):
        args = bench_args(cfg, out, method="full", model=name, epochs=stops[-1], stop_after=stop,
                          resume=k > 0, batch_size=spec["batch_size"], no_augment=not spec["augment"])
        train.run(args, dataset=ds, stats=spec["stats"])
        model.load_state_dict(train.load_checkpoint(out, "cpu")["model"])
        yield stop, model


def variance_snapshot(cfg, model, xp, yp, epoch: int) -> dict:
    """Every score's estimator variance (closed form, vs uniform and the oracle), its rank
    correlation with the true gradient norm, and the epoch estimator's variance as the sampler
    draws it, on the pool (xp, yp) with all parameters' per-example gradients (BN in eval mode)."""
    model.eval()
    tap = HeadTap(model.classifier, T=cfg["T"])
    scores = score_table(model, tap, xp, yp, cfg["T"])
    tap.remove()
    G = per_example_grads(model, xp, yp)
    truth = G.norm(dim=1)
    N = len(yp)
    v_uni = estimator_variance(G, torch.full((N,), 1.0 / N, dtype=torch.float64))
    snap = {"epoch": epoch, "uniform": v_uni, "oracle": estimator_variance(G, truth / truth.sum()) / v_uni,
            "scores": {}}
    for sname, s in list(scores.items()) + [("oracle", truth)]:
        s = s.double().clamp_min(0)
        for eps in (0.0, 0.1):
            p = (1 - eps) * s / s.sum() + eps / N
            snap["scores"].setdefault(sname, {})[f"eps={eps}"] = estimator_variance(G, p) / v_uni
        snap["scores"][sname]["spearman"] = spearman(s, truth)
    # The epoch's estimator (1/m) sum_j w_j g_j as the sampler really draws it, with and
    # without replacement: Monte Carlo over many epochs with the pool as the data set.
    mc = {}
    for label, sc, eps in (("uniform", torch.ones(N), 1.0), ("sadp", scores["sadp"], 0.1),
                           ("oracle", truth, 0.1)):
        for replacement in (True, False):
            v = sampled_variance(G, sc, cfg["var_ratio"], eps, replacement, cfg["var_mc"])
            mc[f"{label}, {'with' if replacement else 'without'}"] = v
    snap["epoch_estimator"] = {k: v / mc["uniform, with"] for k, v in mc.items()}
    return snap


def bench_variance(cfg, results):
    out = {}
    for spec in data_sets(cfg, cfg["var_train"], 500):
        name, ds = spec["name"], spec["data"]
        norm = data.Normalizer(spec["stats"] or "synthetic")
        pool = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(1))[: cfg["var_pool"]]
        xp, yp = norm(ds.x_train[pool]), ds.y_train[pool]
        with tempfile.TemporaryDirectory() as tmp:
            snaps = [variance_snapshot(cfg, model, xp, yp, stop) for stop, model in trained_models(cfg, spec, tmp)]
        names = ["loss", "ann", "sadp", "sadp-exact", "oracle"]
        rows_var = [["uniform"] + ["1"] * len(snaps)]
        rows_var += [[n] + [f"{s['scores'][n]['eps=0.0']:.3f} / {s['scores'][n]['eps=0.1']:.3f}" for s in snaps]
                     for n in names]
        rows_rho = [[n] + [round(s["scores"][n]["spearman"], 3) for s in snaps] for n in names]
        heads = [f"epoch {s['epoch']}" for s in snaps]
        table(f"Gradient variance vs uniform, {name} ({cfg['var_pool']} examples, all parameters, "
              f"BN in eval mode; p = score, eps = 0 / eps = 0.1 mix; lower is better, oracle is the floor)",
              ["score"] + heads, rows_var)
        table(f"Spearman rank correlation of each score with the true gradient norm, {name}",
              ["score"] + heads, rows_rho)
        rows_mc = [[k] + [round(s["epoch_estimator"][k], 3) for s in snaps] for k in snaps[0]["epoch_estimator"]]
        table(f"Variance of an epoch's gradient estimate as the sampler draws it, with vs without "
              f"replacement ({name}, r = {cfg['var_ratio']}, eps = 0.1, Monte Carlo over "
              f"{cfg['var_mc']} epochs; relative to uniform with replacement)", ["sampling"] + heads, rows_mc)
        out[name] = snaps
    results["variance"] = out


def _has_sklearn() -> bool:
    try:
        import sklearn  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# 4. LIF throughput
# ---------------------------------------------------------------------------------------------

def lif_candidates(results) -> dict:
    """name -> LIF module stepping [T, ...] inputs: ours eager and compiled, and SpikingJelly's
    LIFNode and snnTorch's Leaky when installed (why not, in results["lif_skipped"])."""
    candidates = {"ours eager": models.LIF(compile=False), "ours compiled": models.LIF(compile=True)}
    try:
        from spikingjelly.activation_based import neuron as sj_neuron
        from spikingjelly.activation_based import surrogate as sj_surrogate
        kw = dict(tau=2.0, step_mode="m", surrogate_function=sj_surrogate.ATan())
        try:
            node = sj_neuron.LIFNode(backend="torch", **kw)     # SpikingJelly 0.0.0.0.x
        except TypeError:
            node = sj_neuron.LIFNode(**kw)                      # 2.x: no backend argument
        candidates["SpikingJelly LIFNode"] = node
    except Exception as e:                                            # optional
        results.setdefault("lif_skipped", []).append(f"spikingjelly: {type(e).__name__}: {e}")
    try:
        import snntorch

        class SnnTorchLeaky(torch.nn.Module):
            """snnTorch's Leaky stepped over T (beta = 1 - 1/tau = 0.5), its usual loop."""

            def __init__(self):
                super().__init__()
                self.lif = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero")

            def forward(self, x):
                mem = self.lif.init_leaky()
                out = []
                for t in range(x.shape[0]):
                    s, mem = self.lif(x[t], mem)
                    out.append(s)
                return torch.stack(out)

        candidates["snnTorch Leaky"] = SnnTorchLeaky()
    except Exception as e:
        results.setdefault("lif_skipped", []).append(f"snntorch: {type(e).__name__}: {e}")
    return candidates


def bench_lif(cfg, results):
    device = torch.device(cfg["device"])
    shape = cfg["lif_shape"]
    x0 = torch.randn(*shape, device=device) * 1.5
    candidates = {k: m.to(device) for k, m in lif_candidates(results).items()}

    def step(m):
        def run():
            x = x0.detach().requires_grad_()
            if hasattr(m, "reset"):
                m.reset()
            s = m(x)
            s.sum().backward()
        return run

    for m in candidates.values():                                   # warm-up, compile
        for _ in range(2):
            step(m)()
    samples = {k: [] for k in candidates}
    for _ in range(cfg["lif_reps"]):
        for k, m in candidates.items():
            samples[k].append(timeit(step(m), device))
    base = samples["ours eager"]
    rows, out = [], {}
    for k in candidates:
        med = statistics.median(samples[k])
        rel = statistics.median(b / a for a, b in zip(samples[k], base))
        rows.append([k, round(med * 1e3, 2), f"{rel:.2f}x"])
        out[k] = {"median_ms": med * 1e3, "speed_vs_ours_eager": rel}
    versions = {}
    for pkg in ("spikingjelly", "snntorch"):
        try:
            from importlib.metadata import version
            versions[pkg] = version(pkg)
        except Exception:
            pass
    results["lif"] = {"shape": list(shape), "device": str(device), "results": out, "versions": versions}
    table(f"LIF forward+backward on {list(shape)} ({device.type}; median of {cfg['lif_reps']} "
          f"interleaved reps; {', '.join(f'{k} {v}' for k, v in versions.items()) or 'no other SNN library installed'})",
          ["implementation", "ms", "speed vs ours eager"], rows)


# ---------------------------------------------------------------------------------------------
# 5. Accuracy at matched budgets
# ---------------------------------------------------------------------------------------------

def bench_accuracy(cfg, results):
    out = {}
    for spec in data_sets(cfg, cfg["acc_train"], cfg["acc_test"]):
        name, ds, stats, epochs = spec["name"], spec["data"], spec["stats"], spec["epochs"]
        common = {"epochs": epochs, "batch_size": spec["batch_size"], "no_augment": not spec["augment"]}
        runs = []
        for seed in range(cfg["seeds"]):
            runs.append(("full", 0.0, seed, train_once(cfg, ds, stats, method="full", seed=seed, **common)))
            for r in cfg["acc_ratios"]:
                for method in METHODS:
                    flags = {"method": "sadp", "replacement": True} if method == "sadp-iid" else {"method": method}
                    runs.append((method, r, seed, train_once(cfg, ds, stats, ratio=r, seed=seed,
                                                             **flags, **common)))
            print(f"  [{name}] seed {seed} done", file=sys.stderr, flush=True)
        rows, summary = [], []
        keys = [("full", 0.0)] + [(m, r) for r in cfg["acc_ratios"] for m in METHODS]
        for method, r in keys:
            sel = [s for m, rr, _, s in runs if m == method and rr == r]
            final = [s["final_test_acc"] * 100 for s in sel]
            best = [s["best_test_acc"] * 100 for s in sel]
            frac = statistics.mean(s["pass_fraction"] for s in sel)
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            rows.append([method, r, f"{statistics.mean(final):.2f} ± {sd(final):.2f}",
                         f"{statistics.mean(best):.2f} ± {sd(best):.2f}", round(frac, 3)])
            summary.append({"method": method, "ratio": r, "final": final, "best": best, "pass_fraction": frac})
        out[name] = {"epochs": epochs, "train_size": len(ds.y_train), "rows": summary}
        table(f"Accuracy at matched budgets, {name} ({len(ds.y_train)} train / {len(ds.y_test)} test "
              f"examples, convnet, T={cfg['T']}, batch {spec['batch_size']}, {epochs} epochs, "
              f"{cfg['seeds']} seeds; mean ± sd, %)",
              ["method", "ratio", "final test acc", "best test acc", "example-passes / full"], rows)
    results["accuracy"] = out


# ---------------------------------------------------------------------------------------------
# 6. The evidence: paired seeds, matched budgets, MNIST-1D
# ---------------------------------------------------------------------------------------------

# Label -> train.py flags. The core methods run at every ratio; the variants (each one idea from
# the evidence issue, as a train.py option) at the ratios where pruning costs accuracy.
CORE = {"uniform": {"method": "uniform"}, "ann": {"method": "ann"}, "sadp": {"method": "sadp"},
        "infobatch": {"method": "infobatch"}}
VARIANTS = {
    "sadp-iid": {"method": "sadp", "replacement": True},          # the i.i.d. draw as derived
    "sadp-ema": {"method": "sadp", "smoothing": 0.5},             # smoothed scores
    "sadp-warmup": {"method": "sadp", "schedule": "warmup"},      # epoch 1 on all data
    "sadp-anneal": {"method": "sadp", "schedule": "anneal"},      # + last 12.5% on all data
    "uniform-anneal": {"method": "uniform", "schedule": "anneal"},  # the schedule without scores
    "sadp-lr": {"method": "sadp", "lr_scale": "gain"},            # lr x estimated variance gain
    "sadp-w0.5": {"method": "sadp", "weight_power": 0.5},         # BIASED: w^0.5
    # Controls for sadp-lr: is it the scores, or only the larger step? The same lr x 2 cap.
    "sadp-lr2": {"method": "sadp", "lr": 0.2},
    "uniform-lr2": {"method": "uniform", "lr": 0.2},
    "full-lr2": {"method": "full", "lr": 0.2},
    # lr x 1 / (1 - r): each epoch's summed update equals a full-data epoch's in expectation,
    # which is what InfoBatch's 1 / (1 - r) rescaling of the kept examples amounts to.
    "sadp-lrb": {"method": "sadp", "lr_scale": "budget"},
    "uniform-lrb": {"method": "uniform", "lr_scale": "budget"},
}
# t quantiles (0.975) for a 95% confidence interval of a mean of n paired differences, df = n - 1
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def t975(df: int) -> float:
    return _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]


def evidence_sets(cfg) -> dict:
    """name -> train.py flags of the data set's recipe (the network, epochs, batch)."""
    sets = {"mnist1d": {"data": "mnist1d", "model": "conv1d", "epochs": cfg["ev_epochs"],
                        "batch_size": 128}}
    if cfg["ev_synthetic_seeds"]:
        sets["synthetic"] = {"data": "synthetic", "model": "convnet", "epochs": cfg["epochs_acc"],
                             "batch_size": 128, "train_size": cfg["acc_train"], "test_size": cfg["acc_test"]}
    return sets


_WORKER_DATA = {}


def _evidence_worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _evidence_run(job: dict) -> dict:
    """One training run in a worker process; the data set is loaded once per worker."""
    flags = dict(job["flags"])
    key = (flags["data"], flags.get("train_size"), flags.get("test_size"), job["seed"])
    if flags["data"] == "synthetic":
        key = key[:3] + (0,)                   # the same synthetic set for every seed
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = data.load_dataset(
            flags["data"], seed=0, **({"num_train": flags["train_size"], "num_test": flags["test_size"]}
                                      if flags["data"] == "synthetic" else {}))
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--quiet", "--device", "cpu", "--no-compile", "--out", os.path.join(tmp, "run"),
                "--seed", str(job["seed"])]
        for k, v in flags.items():
            if v is True:
                argv.append(f"--{k.replace('_', '-')}")
            elif v is not False and v is not None:
                argv += [f"--{k.replace('_', '-')}", str(v)]
        s = train.run(train.parse_args(argv), dataset=_WORKER_DATA[key], stats=flags["data"])
    return {**{k: job[k] for k in ("set", "label", "ratio", "seed")}, "nominal_ratio": job.get("nominal_ratio"),
            "final": s["final_test_acc"] * 100, "best": s["best_test_acc"] * 100,
            "pass_fraction": s["pass_fraction"], "train_seconds": s["train_seconds"],
            "curve": [(r["examples"], r["test_acc"] * 100) for r in s["history"]]}


def _evidence_jobs(cfg, name, recipe, seeds, labels, ratios) -> list[dict]:
    jobs = [{"set": name, "label": "full", "ratio": 0.0, "seed": s,
             "flags": dict(recipe, method="full")} for s in seeds]
    for r in ratios:
        for label in labels:
            # lr_scale "none" unless the label says otherwise: the core rows are the recipe as
            # it stood before --lr-scale budget became train.py's default (sadp-lrb is that default).
            flags = {**recipe, "lr_scale": "none", **(CORE.get(label) or VARIANTS[label]), "ratio": r}
            ratio = r
            if flags["method"] == "full":               # one set of runs, at ratio 0
                if r != ratios[0]:
                    continue
                flags["ratio"], ratio = None, 0.0
            jobs += [{"set": name, "label": label, "ratio": ratio, "seed": s, "flags": flags} for s in seeds]
    return jobs


def _evidence_seeds(cfg, name: str) -> list[int]:
    return list(range(cfg["ev_seeds"] if name == "mnist1d" else cfg["ev_synthetic_seeds"]))


def _evidence_plan(cfg) -> list[dict]:
    """Every run the configuration asks for (the log's runs are skipped by the caller)."""
    jobs = []
    for name, recipe in evidence_sets(cfg).items():
        seeds = _evidence_seeds(cfg, name)
        if name == "synthetic":      # the rerun: the question the MNIST-1D runs raised
            jobs += _evidence_jobs(cfg, name, recipe, seeds, cfg["ev_synthetic_labels"],
                                   cfg["ev_synthetic_ratios"])
            continue
        jobs += _evidence_jobs(cfg, name, recipe, seeds, list(CORE), cfg["ev_ratios"])
        jobs += [j for j in _evidence_jobs(cfg, name, recipe, seeds, cfg["ev_variants"] or list(VARIANTS),
                                           cfg["ev_variant_ratios"]) if j["label"] != "full"]
    return jobs


def _matched_infobatch_jobs(cfg, runs: list[dict], sent: set, done: dict) -> list[dict]:
    """InfoBatch at a ratio whose actual example-passes match the others': once its nominal runs
    at r are all in, solve pass_fraction = 1 - c r_ib for r_ib = r / c. `sent` records the
    (set, r) already planned."""
    jobs = []
    for name, recipe in evidence_sets(cfg).items():
        seeds = _evidence_seeds(cfg, name)
        for r in cfg["ev_ratios"]:
            nominal = [x for x in runs if x["set"] == name and x["label"] == "infobatch" and x["ratio"] == r]
            if (name, r) in sent or len(nominal) < len(seeds):
                continue
            sent.add((name, r))
            c = statistics.mean((1 - x["pass_fraction"]) / r for x in nominal)
            r_ib = min(round(r / c, 3), cfg["ev_max_infobatch_ratio"])
            jobs += [{"set": name, "label": "infobatch-matched", "ratio": r, "seed": s, "nominal_ratio": r_ib,
                      "flags": dict(recipe, method="infobatch", ratio=r_ib)}
                     for s in seeds if (name, "infobatch-matched", r, s) not in done]
    return jobs


def bench_evidence(cfg, results):
    import concurrent.futures as cf
    import multiprocessing as mp
    log = cfg["ev_log"]
    done = {}
    if log and os.path.exists(log):
        with open(log) as f:
            for line in f:
                run = json.loads(line)
                done[(run["set"], run["label"], run["ratio"], run["seed"])] = run
    runs = list(done.values())
    todo = [j for j in _evidence_plan(cfg) if (j["set"], j["label"], j["ratio"], j["seed"]) not in done]
    order = {"infobatch": 0}                      # InfoBatch first: the matched ratio needs it
    todo.sort(key=lambda j: (j["set"] != "mnist1d", order.get(j["label"], 1)))
    print(f"  [evidence] {len(runs)} runs in the log, {len(todo)} to go, {cfg['ev_workers']} workers",
          file=sys.stderr, flush=True)
    with cf.ProcessPoolExecutor(cfg["ev_workers"], mp_context=mp.get_context("spawn"),
                                initializer=_evidence_worker_init, initargs=(cfg["ev_threads"],)) as pool:
        pending = {pool.submit(_evidence_run, j): j for j in todo}
        matched_sent = set()
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                pending.pop(fut)
                run = fut.result()
                runs.append(run)
                if log:
                    with open(log, "a") as f:
                        f.write(json.dumps(run) + "\n")
                print(f"  [evidence] {run['set']} {run['label']} r={run['ratio']} seed {run['seed']}: "
                      f"{run['final']:.1f}% at {run['pass_fraction']:.3f} of the passes "
                      f"({len(runs)} done, {len(pending)} queued)", file=sys.stderr, flush=True)
            for job in _matched_infobatch_jobs(cfg, runs, matched_sent, done):
                pending[pool.submit(_evidence_run, job)] = job
    seeds = {name: len(_evidence_seeds(cfg, name)) for name in evidence_sets(cfg)}
    results["evidence"] = summarise_evidence([r for r in runs if r["seed"] < seeds.get(r["set"], 0)])


def summarise_evidence(runs: list[dict]) -> dict:
    """Tables: mean ± sd, paired differences to uniform with 95% CIs, passes to reach full - 0.5 pp."""
    out = {}
    for name in sorted({r["set"] for r in runs}):
        sel = [r for r in runs if r["set"] == name]
        full = [r for r in sel if r["label"] == "full"]
        target = statistics.mean(r["final"] for r in full) - 0.5
        labels = ["full", *CORE, "infobatch-matched", *VARIANTS]
        keys = sorted({(r["ratio"], r["label"]) for r in sel}, key=lambda k: (k[0], labels.index(k[1])))
        rows, summary = [], []
        for ratio, label in keys:
            group = sorted((r for r in sel if r["label"] == label and r["ratio"] == ratio), key=lambda r: r["seed"])
            final = [r["final"] for r in group]
            sd = statistics.stdev(final) if len(final) > 1 else 0.0
            base = {r["seed"]: r["final"] for r in sel if r["label"] == "uniform" and r["ratio"] == ratio}
            diffs = [r["final"] - base[r["seed"]] for r in group if r["seed"] in base]
            if label not in ("uniform", "full") and len(diffs) > 1:
                m, s = statistics.mean(diffs), statistics.stdev(diffs)
                half = t975(len(diffs) - 1) * s / math.sqrt(len(diffs))
                diff = f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"
            else:
                m = half = None
                diff = ""
            reach = []
            for r in group:      # example-passes (in full epochs) until test accuracy >= target
                total, hit = 0, None
                for examples, acc in r["curve"]:
                    total += examples
                    if acc >= target:
                        hit = total
                        break
                reach.append(hit)
            hits = sorted(h for h in reach if h is not None)
            n_full = full[0]["curve"][0][0]
            reach_txt = (f"{statistics.median(hits) / n_full:.1f} ({len(hits)}/{len(group)})" if hits
                         else f"never (0/{len(group)})")
            nominal = group[0].get("nominal_ratio")
            rows.append([label if nominal is None else f"{label} (r_ib = {nominal})", ratio,
                         f"{statistics.mean(final):.2f} ± {sd:.2f}", diff,
                         round(statistics.mean(r["pass_fraction"] for r in group), 3), reach_txt])
            summary.append({"label": label, "ratio": ratio, "nominal_ratio": nominal, "final": final,
                            "seeds": [r["seed"] for r in group], "diff_to_uniform": m, "ci_half": half,
                            "pass_fraction": [r["pass_fraction"] for r in group],
                            "passes_to_target": reach,
                            "curve": [statistics.mean(c) for c in zip(*[[a for _, a in r["curve"]] for r in group])],
                            "curve_passes": [sum(e for e, _ in group[0]["curve"][:i + 1]) / n_full
                                             for i in range(len(group[0]["curve"]))]})
        seeds = len(full)
        table(f"Paired comparison at matched budgets, {name} ({seeds} seeds, the same for every method; "
              f"final test accuracy mean ± sd, %; difference to uniform at the same ratio and seed, "
              f"mean [95% CI]; full-data epochs of example-passes until test accuracy first reaches "
              f"full data's final - 0.5 pp = {target:.2f}%, median over the seeds that reach it)",
              ["method", "ratio", "final test acc", "minus uniform (pp)", "example-passes / full",
               "passes to target"], rows)
        out[name] = {"target": target, "rows": summary}
    return out


# ---------------------------------------------------------------------------------------------
# 7. Training throughput (GPU)
# ---------------------------------------------------------------------------------------------

def bench_throughput(cfg, results):
    """Images/s of whole training epochs on CIFAR-shaped data: compiled vs eager, full vs sadp.

    Each run trains 2 epochs and is timed on the second, so compilation and warm-up stay out of
    the figure. Runs are interleaved over the 4 variants; the table gives the median images/s
    (example-passes per second of training, evaluation excluded) and each variant's ratio to
    eager full-data training, taken pairwise within a repetition.
    """
    if not cfg["throughput"]:
        print("\n(throughput: skipped, it measures the GPU path; --set throughput=true forces it)")
        return
    ds = data.make_synthetic(cfg["tp_train"], 500, seed=0)
    variants = [(c, m) for c in (False, True) for m in ("full", "sadp")]
    ips = {v: [] for v in variants}
    for rep in range(cfg["tp_reps"]):
        for compiled, method in variants:
            run_cfg = dict(cfg, compile=compiled)
            over = {"ratio": 0.3} if method == "sadp" else {}
            r = train_once(run_cfg, ds, None, method=method, model=cfg["tp_model"], epochs=2,
                           seed=rep, **over)
            last = r["history"][-1]
            ips[(compiled, method)].append(last["examples"] / last["seconds"])
    base = ips[(False, "full")]
    rows, out = [], []
    for compiled, method in variants:
        v = ips[(compiled, method)]
        rel = statistics.median(a / b for a, b in zip(v, base))
        name = f"{'compiled' if compiled else 'eager'}, {method}" + (" r=0.3" if method == "sadp" else "")
        rows.append([name, round(statistics.median(v), 1), f"{rel:.2f}x"])
        out.append({"compiled": compiled, "method": method, "images_per_s": v, "vs_eager_full": rel})
    # sadp trains on 70% of the examples per epoch: its epoch time, not its images/s, is what
    # pruning shortens; equal images/s means the score and the sampler cost nothing.
    results["throughput"] = {"model": cfg["tp_model"], "device": cfg["device"], "amp": cfg["amp"],
                             "train_size": cfg["tp_train"], "runs": out}
    table(f"Training throughput, {cfg['tp_model']} T={cfg['T']} on CIFAR-shaped synthetic data "
          f"({cfg['device']}{', bf16 autocast' if cfg['amp'] else ''}, batch {cfg['batch_size']}, "
          f"second epoch of 2, median of {cfg['tp_reps']} interleaved reps)",
          ["run", "images/s", "vs eager full"], rows)


# ---------------------------------------------------------------------------------------------
# 8. The whole-network bound vs the head bound (MNIST-1D)
# ---------------------------------------------------------------------------------------------

def netbound_scores(model, x, y, T, batch=None):
    """head, network, ann and loss scores of (x, y), from forward + backward passes with weights 1.
    batch=None: one pass in the model's current mode; else passes of `batch` examples."""
    net, head = NetworkTap(model, T=T), HeadTap(model.classifier, T=T)
    parts = {k: [] for k in ("head", "network", "ann", "loss")}
    for xb, yb in zip(x.split(batch or len(x)), y.split(batch or len(x))):
        model(xb)
        outputs, head_inputs = head.pop()
        loss, s_head = spike_aware_loss(outputs, yb, head_inputs)
        model.zero_grad(set_to_none=True)
        loss.backward()
        parts["network"].append(net.pop(torch.ones(len(yb))))
        parts["head"].append(s_head)
        parts["ann"].append(baseline_loss(outputs, yb, kind="ann")[1])
        parts["loss"].append(baseline_loss(outputs, yb, kind="loss")[1])
    net.remove()
    head.remove()
    model.zero_grad(set_to_none=True)
    return {k: torch.cat(v).double() for k, v in parts.items()}


def bench_netbound(cfg, results):
    """Checkpoints of a full-data train.py run (seed 0); at each, a fixed pool of training examples
    is scored and its per-example gradients over every conv + linear weight (BN in eval mode)
    are computed by autograd. BN parameters are outside the bound and outside the truth here."""
    try:
        ds = data.load_dataset("mnist1d")
    except data.DataError as e:
        print(f"\n(netbound: skipped, {e})")
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["nb_threads"])
    T, batch = cfg["T"], cfg["batch_size"]
    spec = {"data": ds, "stats": "mnist1d", "model": "conv1d", "batch_size": batch, "augment": False,
            "var_epochs": cfg["nb_epochs"]}
    pool = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(1))[: cfg["nb_pool"]]
    xp, yp = ds.x_train[pool], ds.y_train[pool]
    snaps = []
    with tempfile.TemporaryDirectory() as tmp:
        for stop, model in trained_models(cfg, spec, tmp):
            snaps.append(netbound_snapshot(model, xp, yp, T, batch, stop))
            print(f"  [netbound] epoch {stop} scored", file=sys.stderr, flush=True)
    heads = [f"epoch {s['epoch']}" for s in snaps]
    names = ["loss", "ann", "head", "network", "head (BN train)", "network (BN train)", "oracle"]
    table(f"Spearman rank correlation with the true per-example gradient norm over all conv + linear "
          f"weights (MNIST-1D, conv1d T={T}, {len(yp)} training examples, BN eval)",
          ["score"] + heads, [[n] + [round(s["scores"][n]["spearman"], 3) for s in snaps] for n in names])
    table("Variance of the importance-sampled gradient (all conv + linear weights) relative to "
          "uniform: eps = 0 / eps = 0.1; lower is better, oracle p ~ ||G_i|| is the floor",
          ["score"] + heads, [["uniform"] + ["1"] * len(snaps)] + [
              [n] + [f"{s['scores'][n]['eps=0.0']:.3f} / {s['scores'][n]['eps=0.1']:.3f}" for s in snaps]
              for n in names])
    table("Score / true norm per example: min / median (network, BN eval: >= 1, it dominates; the "
          "head bound covers the head only, and a BN-train score is no bound on the BN-eval gradient)",
          ["score"] + heads, [[n] + [f"{s['scores'][n]['min_ratio']:.3g} / {s['scores'][n]['median_ratio']:.3g}"
                                     for s in snaps] for n in names[2:-1]])
    model.train()
    results["netbound"] = {"snapshots": snaps, "pool": len(yp), "T": T,
                           "overhead": _netbound_overhead(cfg, model, ds, T, batch)}
    torch.set_num_threads(threads)


def netbound_snapshot(model, xp, yp, T, batch, epoch: int) -> dict:
    """Every score on the pool against the true norm over all conv + linear weights: rank
    correlation, score / norm, and the estimator variance relative to uniform."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()                                             # what train.py records: BN in
    in_training = netbound_scores(model, xp, yp, T, batch)    # training mode, batches of `batch`
    scores = {"head (BN train)": in_training["head"], "network (BN train)": in_training["network"]}
    model.load_state_dict(state)                              # undo the BN running-stat updates
    model.eval()
    scores.update(netbound_scores(model, xp, yp, T))
    weights = [p for m in model.modules() if isinstance(m, NetworkTap.LAYERS) for p in m.parameters()]
    G = per_example_grads(model, xp, yp, weights)
    truth = G.norm(dim=1)
    N = len(yp)
    v_uni = estimator_variance(G, torch.full((N,), 1.0 / N, dtype=torch.float64))
    snap = {"epoch": epoch, "scores": {}}
    for name, s in list(scores.items()) + [("oracle", truth)]:
        s = s.clamp_min(0)
        row = {"spearman": spearman(s, truth), "min_ratio": float((s / truth).min()),
               "median_ratio": float((s / truth).median())}
        for eps in (0.0, 0.1):
            p = (1 - eps) * s / s.sum() + eps / N
            row[f"eps={eps}"] = estimator_variance(G, p) / v_uni
        snap["scores"][name] = row
    return snap


def _netbound_overhead(cfg, model, ds, T, batch) -> dict:
    """A training step scored by the network bound vs the same step scored by the head bound,
    interleaved; median of the per-pair time ratios. The network step attaches its tap, pops
    the scores after backward and removes it: all of its cost is in the figure."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, y, w = ds.x_train[:batch], ds.y_train[:batch], torch.ones(batch)
    head = HeadTap(model.classifier, T=T)

    def step(network: bool):
        net = NetworkTap(model, T=T) if network else None
        model(x)
        outputs, head_inputs = head.pop()
        loss, scores = spike_aware_loss(outputs, y, head_inputs, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if network:
            scores = net.pop(w)
            net.remove()
        opt.step()
        return scores

    device = torch.device("cpu")
    for _ in range(3):                                            # warm-up (and compile)
        step(False), step(True)
    pairs = [(timeit(lambda: step(False), device), timeit(lambda: step(True), device))
             for _ in range(cfg["nb_reps"])]
    head.remove()
    ratio = statistics.median(b / a for a, b in pairs)
    table(f"Training-step time with the network bound vs with the head bound (conv1d T={T}, batch "
          f"{batch}, CPU, {torch.get_num_threads()} thread(s), median of {cfg['nb_reps']} interleaved pairs)",
          ["step with network bound / step with head bound"], [[f"{ratio:.3f}"]])
    return {"ratio": ratio, "pairs_s": pairs}


# ---------------------------------------------------------------------------------------------
# Plots (optional: matplotlib)
# ---------------------------------------------------------------------------------------------

def plot(results, directory):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)

    def save(fig, ax, xlabel, ylabel, title, filename):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, filename), dpi=120)
        plt.close(fig)

    for name, acc in results.get("accuracy", {}).items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        full = next(r for r in acc["rows"] if r["method"] == "full")
        ax.axhline(statistics.mean(full["final"]), color="k", ls="--", label="full data")
        for method in METHODS:
            rows = [r for r in acc["rows"] if r["method"] == method]
            ax.errorbar([r["ratio"] for r in rows], [statistics.mean(r["final"]) for r in rows],
                        yerr=[statistics.stdev(r["final"]) if len(r["final"]) > 1 else 0 for r in rows],
                        marker="o", capsize=3, label=method)
        save(fig, ax, "pruning ratio r", "final test accuracy (%)",
             f"{name}: accuracy vs pruning ratio", f"accuracy_{name}.png")
    for name, ev in results.get("evidence", {}).items():
        rows = ev["rows"]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        full = next(r for r in rows if r["label"] == "full")
        ax.axhline(statistics.mean(full["final"]), color="k", ls="--", label="full data")
        for label in ("uniform", "ann", "sadp", "infobatch", "infobatch-matched", "uniform-lrb", "sadp-lrb"):
            sel = [r for r in rows if r["label"] == label]
            if sel:
                ax.errorbar([r["ratio"] for r in sel], [statistics.mean(r["final"]) for r in sel],
                            yerr=[statistics.stdev(r["final"]) if len(r["final"]) > 1 else 0 for r in sel],
                            marker="o", capsize=3, label=label)
        save(fig, ax, "pruning ratio r", "final test accuracy (%, mean ± sd)",
             f"{name}: accuracy at matched budgets", f"evidence_{name}.png")
        ratio = max(r["ratio"] for r in rows)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for r in [full] + [r for r in rows if r["ratio"] == ratio and r["label"] in
                           ("uniform", "sadp", "infobatch-matched", "sadp-anneal", "uniform-lrb", "sadp-lrb")]:
            ax.plot(r["curve_passes"], r["curve"], label=r["label"], lw=1.2)
        ax.axhline(ev["target"], color="k", ls=":", lw=0.8, label="full - 0.5 pp")
        ax.set_ylim(max(0, ev["target"] - 30), ev["target"] + 3)
        save(fig, ax, "example-passes (full-data epochs)", "test accuracy (%, mean over seeds)",
             f"{name}: accuracy vs example-passes (r = {ratio})", f"evidence_passes_{name}.png")
    for name, snaps in results.get("variance", {}).items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for sname in ("loss", "ann", "sadp", "sadp-exact", "oracle"):
            ax.plot([s["epoch"] for s in snaps], [s["scores"][sname]["eps=0.1"] for s in snaps],
                    marker="o", label=sname)
        ax.axhline(1.0, color="k", ls=":", label="uniform")
        ax.set_yscale("log")
        save(fig, ax, "epoch of training", "estimator variance / uniform",
             f"{name}: gradient variance (eps = 0.1)", f"variance_{name}.png")


# ---------------------------------------------------------------------------------------------
# 9. The streaming data path (imagefolder.py): decoding, the loader, and waiting for data
# ---------------------------------------------------------------------------------------------

def write_photo_folder(root: str, n_train: int, n_val: int, classes: int = 4, seed: int = 0,
                       side=(400, 520)) -> float:
    """An ImageFolder of photo-like JPEGs (sides in `side`, by default ImageNet's typical ~500 x
    375; quality 90; smooth colour fields plus grain, so that files and decoding cost what photos
    do); returns the mean file size in bytes."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    sizes = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(folder, exist_ok=True)
            w, h = (int(v) for v in torch.randint(side[0], side[1], (2,), generator=g))
            field = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(h, w), mode="bicubic")[0]
            pixels = (field * 200 + 28 + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255)
            path = os.path.join(folder, f"{i}.JPEG")
            Image.fromarray(pixels.byte().permute(1, 2, 0).numpy()).save(path, quality=90)
            sizes.append(os.path.getsize(path))
    return statistics.mean(sizes)


def bench_datapath(cfg, results):
    """Images/s of decoding + augmentation in one process (Pillow at full size vs reduced-size
    JPEG decoding, on ImageNet-sized and on large photos), of the DataLoader with 1 and 2
    workers, and the share of a SADP epoch (r = 0.3) that train.py spends waiting for images,
    at 224 px. Repetitions interleaved."""
    import imagefolder
    try:
        imagefolder.require_pillow()
    except data.DataError as e:
        print(f"\n(datapath: skipped, {e})")
        return
    import PIL
    size, out = cfg["dp_size"], {"decode": {}}
    with tempfile.TemporaryDirectory() as root:
        for name, side, n in (("imagenet-sized", (400, 520), cfg["dp_images"]), ("large", (1400, 1800), 40)):
            kb = write_photo_folder(os.path.join(root, name), n, n // 4, side=side) / 1024
            split = imagefolder.scan(os.path.join(root, name)).train
            rates = _decode_rates(cfg, [split.path(i) for i in range(min(len(split), 160))], size)
            out["decode"][name] = {"side": side, "mean_file_kb": kb, "images_per_s": rates}
        table(f"Decoding + augmentation in one process, Pillow {PIL.__version__}, {size} px, "
              f"photo-like JPEGs (median of {cfg['dp_reps']})",
              ["path"] + [f"{k}: {v['side'][0]}-{v['side'][1]} px, {v['mean_file_kb']:.0f} kB"
                          for k, v in out["decode"].items()],
              [[path] + [v["images_per_s"][path] for v in out["decode"].values()]
               for path in next(iter(out["decode"].values()))["images_per_s"]])
        out["epochs"] = _datapath_epochs(cfg, os.path.join(root, "imagenet-sized"), size)
    results["datapath"] = out


def _decode_rates(cfg, paths: list[str], size: int) -> dict:
    """images/s of imagefolder.load_image over `paths`, one thread as in a worker: train and eval
    crops by Pillow at full size, Pillow with reduced-size JPEG decoding, and where installed
    torchcodec (imagefolder's "auto" decoder) and torchvision.io; the same crops for all."""
    import imagefolder
    load = {}
    for mode in ("train", "eval"):
        load[f"{mode}, Pillow, full-size decode"] = (mode, functools.partial(imagefolder.load_image, draft=False))
        load[f"{mode}, Pillow, reduced-size decode"] = (mode, imagefolder.load_image)
        if imagefolder.resolve_decoder("auto") == "torchcodec":
            load[f"{mode}, torchcodec (+ Pillow reduced-size)"] = (
                mode, functools.partial(imagefolder.load_image, decoder="torchcodec"))
        try:
            import torchvision.io  # noqa: F401  (deprecated for decoding since 0.29: torchcodec)
            load[f"{mode}, torchvision.io, full-size decode"] = (mode, _torchvision_load)
        except (ImportError, RuntimeError):
            pass
    per_s = {k: [] for k in load}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # as in a DataLoader worker (resizing is torch's there)
    try:
        for rep in range(cfg["dp_reps"]):
            for name, (mode, fn) in load.items():
                rng = np.random.default_rng(rep)
                t = time.perf_counter()
                for p in paths:
                    fn(p, size, rng if mode == "train" else None)
                per_s[name].append(len(paths) / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(threads)
    return {k: statistics.median(v) for k, v in per_s.items()}


def _torchvision_load(path: str, size: int, rng) -> torch.Tensor:
    """imagefolder.load_image's crops with torchvision's decoder and resize, for comparison."""
    import imagefolder
    import torchvision.io
    from torchvision.transforms.v2 import functional as TF
    img = torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
    h, w = img.shape[-2:]
    box = imagefolder.crop_box(w, h, rng) if rng is not None else imagefolder.centre_box(w, h, size)
    left, top, right, bottom = (round(v) for v in box)
    out = TF.resized_crop(img, top, left, bottom - top, right - left, [size, size], antialias=True)
    return out.flip(-1) if rng is not None and rng.random() < 0.5 else out


def _datapath_epochs(cfg, root: str, size: int) -> list[dict]:
    """For each worker count: the loader alone (FolderSource.train_batches, nothing trained)
    with each installed decoder, then whole train.py SADP epochs with the "auto" decoder; the
    second epoch of each is the one reported."""
    import imagefolder
    folder, runs = imagefolder.scan(root), []
    decoders = sorted({"pillow", imagefolder.resolve_decoder("auto")})
    for rep in range(cfg["dp_reps"]):
        for workers in cfg["dp_workers"]:
            run = {"workers": workers, "rep": rep}
            for decoder in decoders:
                run[f"loader_{decoder}"] = _loader_rate(cfg, folder, size, workers, decoder, rep)
            s = train_once(dict(cfg, compile=cfg["compile"]), None, None, data="imagefolder", data_dir=root,
                           model=cfg["dp_model"], image_size=size, workers=workers, epochs=2, ratio=0.3,
                           batch_size=cfg["dp_batch"], seed=rep)
            last = s["history"][-1]
            runs.append(dict(run, train_images_per_s=last["examples"] / last["seconds"],
                             data_wait=last["data_wait"]))
    keys = [f"loader_{d}" for d in decoders] + ["train_images_per_s", "data_wait"]
    rows = [[w] + [statistics.median(r[k] for r in runs if r["workers"] == w) for k in keys]
            for w in cfg["dp_workers"]]
    table(f"Streaming loader and SADP epochs (r = 0.3, decoder {imagefolder.resolve_decoder('auto')}), "
          f"{cfg['dp_model']} T={cfg['T']}, {size} px, batch {cfg['dp_batch']}, "
          f"{cfg['device']}{', bf16' if cfg['amp'] else ''}; second epoch of 2, median of "
          f"{cfg['dp_reps']} interleaved reps",
          ["workers"] + [f"loader alone, {d} (images/s)" for d in decoders]
          + ["training images/s", "share of the epoch waiting for data"], rows)
    return runs


def _loader_rate(cfg, folder, size: int, workers: int, decoder: str, seed: int) -> float:
    """images/s of the second of two passes of FolderSource.train_batches over the training set."""
    import imagefolder
    source = imagefolder.FolderSource(folder, size, workers, cfg["device"], seed=seed, decoder=decoder)
    try:
        order = torch.randperm(len(folder.train))
        for epoch in range(2):
            t = time.perf_counter()
            for _ in source.train_batches(epoch, order.split(cfg["dp_batch"])):
                pass
            rate = len(order) / (time.perf_counter() - t)
    finally:
        source.close()
    return rate


# ---------------------------------------------------------------------------------------------
# Configuration and the command line
# ---------------------------------------------------------------------------------------------

SECTIONS = {"speedup": bench_speedup, "overhead": bench_overhead, "variance": bench_variance,
            "lif": bench_lif, "accuracy": bench_accuracy, "evidence": bench_evidence,
            "throughput": bench_throughput, "netbound": bench_netbound, "datapath": bench_datapath}


def config(quick: bool, device: str, compile_: bool) -> dict:
    gpu = device.startswith("cuda")
    return {
        "device": device, "compile": compile_, "amp": gpu, "T": 4, "batch_size": 128, "lr": 0.1,
        "epochs": 2 if quick else 3,
        "speed_train": 3000 if quick else 6000, "speed_ratios": [0.3] if quick else [0.3, 0.5, 0.7],
        "speed_reps": 3 if quick else 5, "speed_model": "resnet19" if gpu else "convnet",
        "overhead_models": ["convnet"] + (["resnet19"] if gpu else []), "overhead_reps": 10 if quick else 30,
        "big_batch": 128,
        "var_train": 3000 if quick else 8000, "var_pool": 128 if quick else 384,
        "var_epochs": [1, 3] if quick else [1, 3, 10], "var_epochs_digits": [1, 4] if quick else [1, 5, 30],
        "var_ratio": 0.3, "var_mc": 100 if quick else 400,
        "lif_shape": (4, 16, 128, 16, 16) if quick else (4, 32, 128, 32, 32), "lif_reps": 5 if quick else 15,
        "acc_train": 2000 if quick else 4000, "acc_test": 1000 if quick else 2000,
        "epochs_acc": 3 if quick else 10, "epochs_digits": 6 if quick else 30,
        "acc_ratios": [0.3] if quick else [0.3, 0.5, 0.7], "seeds": 1 if quick else 3,
        "ev_epochs": 8 if quick else 40, "ev_seeds": 2 if quick else 5, "ev_synthetic_seeds": 0 if quick else 3, "ev_variants": None,
        "ev_synthetic_labels": ["uniform", "sadp", "uniform-lrb", "sadp-lrb"], "ev_synthetic_ratios": [0.7],
        "ev_ratios": [0.5] if quick else [0.3, 0.5, 0.7], "ev_variant_ratios": [0.5] if quick else [0.7, 0.5],
        "ev_workers": 2, "ev_threads": 1, "ev_log": None, "ev_max_infobatch_ratio": 0.95,
        "throughput": gpu, "tp_model": "resnet19" if gpu else "convnet",
        "tp_train": 2000 if quick else 10000, "tp_reps": 2 if quick else 3,
        "nb_pool": 256 if quick else 512, "nb_epochs": [1, 5] if quick else [1, 5, 20],
        "nb_reps": 20 if quick else 100, "nb_threads": 1,
        "dp_size": 224, "dp_images": (2048 if gpu else 128) if quick else (4096 if gpu else 384),
        "dp_reps": 2 if quick else 3, "dp_workers": [1, 2, 4, 8] if gpu else [1, 2],
        "dp_batch": 128 if gpu else 32,
        "dp_model": "sew_resnet34" if gpu else "convnet",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="eager LIF everywhere")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--plot", default=None, help="with matplotlib: draw figures into this directory")
    p.add_argument("--evidence-log", default=None,
                   help="evidence section: append each finished run here (JSON lines) and skip the "
                        "runs already in it, so an interrupted sweep continues where it stopped")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a config entry, e.g. --set seeds=5 --set 'acc_ratios=[0.5]'")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = config(args.quick, args.device, not args.no_compile)
    cfg["ev_log"] = args.evidence_log
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            p.error(f"--set: unknown config key {key!r}; keys: {', '.join(sorted(cfg))}")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            p.error(f"--set {key}: {value!r} is not JSON (strings need quotes, lists brackets)")
    results = {"machine": machine(), "config": cfg, "command": " ".join(["python", "bench.py"] + (argv or sys.argv[1:])),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"# bench.py on {results['machine']['cpu']} ({results['machine']['cores']} cores, "
          f"{results['machine']['threads']} torch threads), GPU: {results['machine']['gpu']}, "
          f"torch {torch.__version__}, {results['date']}")
    t0 = time.perf_counter()
    for section, bench in SECTIONS.items():
        if section in only:
            bench(cfg, results)
            print(f"  ({section}: {time.perf_counter() - t0:.0f} s so far)", file=sys.stderr, flush=True)
    if args.out:
        train.atomic_write_bytes(args.out, json.dumps(results, indent=1, default=str).encode())
    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); no figures drawn", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
