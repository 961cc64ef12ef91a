"""Speed and cost of SADP, and the statistics of its gradient estimator, measured in one run.

    python bench.py --quick                          # every section at small sizes (minutes on a CPU)
    python bench.py --out bench.json --plot figures  # the full sizes
    python bench.py --only variance,lif --set lif.reps=30 --set T=2

Sections (--only): speedup (sadp's training time vs 1/(1 - r), the sampler's cost), overhead (a
step's cost of the score), variance (the estimator's variance and rank correlation under each
score, with vs without replacement), lif (LIF forward+backward, ours vs SpikingJelly/snnTorch),
throughput (GPU images/s, compiled vs eager), netbound (the whole-network bound vs the head
bound on MNIST-1D), datapath (--data imagefolder: decoding, loader workers, waiting for data).
Each prints its tables and progress as it goes; each function's docstring says what it measures.

--set KEY=JSON overrides a setting of config(): NAME (shared, e.g. T) or SECTION.NAME. --out is
rewritten after every section (the sections of an earlier run stay). A failing section is
recorded there with its error while the others run, and bench.py exits 1 naming it. Accuracy:
evidence.py. Timings are ratios of interleaved runs in one process: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import data
import models
import train
from baselines import baseline_loss
from netbound import NetworkTap
from sadp import HeadTap, SADPSampler, head_gradient_bound, head_gradient_norm, spike_aware_loss


# -- The harness, shared with evidence.py: machine, tables, timing, train.py runs, sections, CLI ---
def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def table(title: str, header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def progress(section: str, message: str) -> None:
    print(f"  [{section}] {message}", file=sys.stderr, flush=True)


def interleaved(fns: dict, reps: int, device, warmup: int = 2) -> dict[str, list[float]]:
    """name -> seconds of each of `reps` calls of fns[name], the calls interleaved across names
    (after `warmup` untimed calls each: compilation, caches)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in list(fns.values()) * warmup:
        fn()
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            samples[k].append(time.perf_counter() - t)
    return samples


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def train_argv(flags: dict) -> list[str]:
    """train.py's command line for {flag: value} (True: a bare switch; None, False: left out)."""
    argv = ["--quiet"]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def train_once(**flags) -> dict:
    """train.run's summary of one run with these flags, in a temporary --out."""
    with tempfile.TemporaryDirectory() as tmp:
        return train.run(train.parse_args(train_argv({**flags, "out": os.path.join(tmp, "run")})))


def run_flags(cfg: dict, **flags) -> dict:
    """The shared settings of cfg as train.py flags, then `flags`."""
    return {"device": cfg["device"], "no_compile": not cfg["compile"], "amp": cfg["amp"], "T": cfg["T"],
            "batch_size": cfg["batch_size"], **flags}


def memoize_mnist1d() -> None:
    """Generate MNIST-1D once per process (it takes seconds) for every train.run that loads it."""
    if not hasattr(data.load_mnist1d, "cache_info"):
        data.load_mnist1d = functools.lru_cache(maxsize=1)(data.load_mnist1d)


def write_section(path: str, head: dict, name: str, result: dict) -> None:
    """Merge `head` and {name: result} into the JSON at `path` (other sections kept), atomically."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    results.update(head)
    results[name] = result
    train.atomic_write_bytes(path, json.dumps(results, indent=1, default=str).encode())


def run_sections(sections: dict, names: list[str], cfg: dict, out: str | None,
                 command: str) -> tuple[dict, list[str]]:
    """Run sections[name](cfg) -> dict for each name, writing --out after each. A section that
    raises is recorded as {"error": {type, message, traceback}} and the next one runs; an
    interrupt (KeyboardInterrupt) is recorded, then raised. Returns (results, failed names)."""
    head = {"machine": machine(), "command": command, "config": cfg,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results, failed = {}, []
    for name in names:
        date, t0, stop = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter(), None
        try:
            result = sections[name](cfg)
        except BaseException as e:       # SystemExit too: train.parse_args exits on bad flags
            result = {"error": {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}}
            failed.append(name)
            stop = None if isinstance(e, (Exception, SystemExit)) else e
            print(f"\n({name}: FAILED, {type(e).__name__}: {e})", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - t0
        result["run"] = {"command": command, "date": date, "seconds": round(seconds, 1)}
        results[name] = result
        if out:
            write_section(out, head, name, result)
        print(f"  ({name}: {seconds:.0f} s)", file=sys.stderr, flush=True)
        if stop is not None:
            raise stop
    return results, failed


def common_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    p.add_argument("--out", default=None, help="write the results as JSON here (after each section)")
    p.add_argument("--plot", default=None, help="with matplotlib: draw figures into this directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a setting of config(): KEY is a shared NAME or SECTION.NAME")
    return p


def apply_settings(p: argparse.ArgumentParser, cfg: dict, items: list[str]) -> None:
    """--set KEY=JSON into cfg, KEY a shared NAME or SECTION.NAME; a bad item exits 2."""
    keys = [k for k, v in cfg.items() if not isinstance(v, dict)]
    keys += [f"{k}.{n}" for k, v in cfg.items() if isinstance(v, dict) for n in v]
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            p.error(f"--set {item!r}: missing '='; write KEY=JSON, e.g. --set T=2")
        section, _, name = key.rpartition(".")
        node = cfg.get(section) if section else cfg
        if not isinstance(node, dict) or name not in node or (node is cfg and isinstance(cfg[name], dict)):
            p.error(f"--set: unknown config key {key!r}; keys: {', '.join(keys)}")
        try:
            node[name] = json.loads(value)
        except json.JSONDecodeError:
            p.error(f"--set {key}: {value!r} is not JSON (strings need quotes, lists brackets)")


def finish(prog: str, args, cfg: dict, sections: dict, names: list[str], plot_fn, argv) -> int:
    """Run the sections, draw the plots; 0 when every section ran, else 1 (naming the failed)."""
    command = " ".join(["python", prog] + list(sys.argv[1:] if argv is None else argv))
    with threads(cfg.get("threads") or torch.get_num_threads()):
        m = machine()
        print(f"# {command}\n# on {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads), GPU: "
              f"{m['gpu']}, torch {m['torch']}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
        results, failed = run_sections(sections, names, cfg, args.out, command)
    if args.plot:
        try:
            plot_fn({k: v for k, v in results.items() if "error" not in v}, args.plot)
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); no figures drawn", file=sys.stderr)
    if failed:
        print(f"failed section(s): {', '.join(failed)}" + (f" (errors recorded in {args.out})" if args.out else ""),
              file=sys.stderr)
    return 1 if failed else 0


@contextmanager
def threads(n: int):
    """torch's intra-op threads set to n inside the block (as in a loader worker: 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError when matplotlib is not installed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


# -- speedup: training time vs the theoretical 1 / (1 - r), and the sampler's own cost ----------
def interleaved_runs(section: str, variants: dict, reps: int) -> dict[str, list[dict]]:
    """name -> train.py summaries of `reps` runs of each variant's flags (seed = rep), the runs
    interleaved across variants because the machine's speed drifts."""
    out = {k: [] for k in variants}
    for rep in range(reps):
        for k, flags in variants.items():
            out[k].append(train_once(**flags, seed=rep))
            progress(section, f"rep {rep + 1}/{reps}, {k}: {out[k][-1]['train_seconds']:.1f} s of training")
    return out


def bench_speedup(cfg) -> dict:
    """Training time of full data vs sadp at each ratio (synthetic data), the runs interleaved;
    the median of the per-rep ratios against 1/(1 - r); then sampler_cost."""
    c = cfg["speedup"]
    flags = run_flags(cfg, data="synthetic", train_size=c["train"], test_size=256, model=cfg["model"],
                      epochs=c["epochs"], method="full")
    train_once(**dict(flags, epochs=1))                                # warm-up: compile, caches
    runs = interleaved_runs("speedup", {"full": flags, **{f"sadp r={r}": dict(flags, method="sadp", ratio=r)
                                                          for r in c["ratios"]}}, c["reps"])
    out = []
    for r in c["ratios"]:
        speedups = [a["train_seconds"] / b["train_seconds"] for a, b in zip(runs["full"], runs[f"sadp r={r}"])]
        out.append({"ratio": r, "measured": statistics.median(speedups), "theoretical": 1 / (1 - r),
                    "speedups": speedups})
    table(f"Speedup of sadp over full data (synthetic, {c['train']} examples, {cfg['model']}, T={cfg['T']}, "
          f"{c['epochs']} epochs, median of {c['reps']} interleaved pairs)",
          ["ratio r", "measured speedup", "1/(1-r)", "measured / theoretical", "range"],
          [[u["ratio"], round(u["measured"], 3), round(u["theoretical"], 3), round(u["measured"] / u["theoretical"], 3),
            f"{min(u['speedups']):.3f}-{max(u['speedups']):.3f}"] for u in out])
    return {"runs": out, "sampler": sampler_cost(c["train"], cfg["batch_size"])}


def sampler_cost(n_train: int, batch: int) -> list[dict]:
    """Where the gap to 1/(1 - r) goes: the sampler's per-epoch work alone, at this N and at
    ImageNet's: freeze p and draw, one update with an epoch of scores, one batch's weights."""
    out, cpu = [], torch.device("cpu")
    for N in (n_train, 1_281_167):
        s = SADPSampler(N, 0.3)
        s.update(torch.arange(N), torch.rand(N))
        idx, scores, w_idx = torch.randint(0, N, (round(0.7 * N),)), torch.rand(round(0.7 * N)), torch.arange(batch)
        t = interleaved({"set_epoch + iter (ms)": lambda: (s.set_epoch(1), list(s)),
                         "update (ms)": lambda: s.update(idx, scores)}, 3, cpu, warmup=1)
        t["weights (us/batch)"] = interleaved({0: lambda: s.weights(w_idx)}, 50, cpu)[0]
        out.append({"N": N, **{k: statistics.median(v) * (1e6 if "us" in k else 1e3) for k, v in t.items()}})
        progress("speedup", f"sampler timed at N = {N}")
    table("Sampler cost per epoch (CPU): freeze p + draw, one update with a whole epoch of scores, weights "
          "of one batch", list(out[0]), [[round(v, 2) for v in row.values()] for row in out])
    return out


# -- overhead: the score's cost per training step -----------------------------------------------
def step_fn(model, opt, x, y, kind: str, T: int, amp=nullcontext):
    """One training step whose loss is scored as `kind`: "plain" (cross-entropy, no score),
    "bound" or "exact" (the head's spike-aware bound or exact norm), "network" (the bound, then
    NetworkTap's, the tap attached and removed within the step: all its cost is in the step)."""
    w = torch.ones(len(y), device=y.device)

    def run():
        net = NetworkTap(model, T=T) if kind == "network" else None
        with HeadTap(model.classifier, T=T) as head, amp():
            model(x)
            o, h = head.pop()
        loss = F.cross_entropy(o.float().mean(0), y) if kind == "plain" else \
            spike_aware_loss(o, y, h, w, exact=kind == "exact")[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if net is not None:
            net.pop(w)
            net.remove()
        opt.step()
    return run


def bench_overhead(cfg) -> dict:
    """Training steps with a plain loss, with the spike-aware bound and with the exact head norm,
    interleaved; and the bound and the exact norm alone on one batch's head inputs."""
    device, T, reps = torch.device(cfg["device"]), cfg["T"], cfg["overhead"]["reps"]
    ds = data.make_synthetic(cfg["batch_size"], 10, seed=0)
    x, y = data.Normalizer("synthetic", device)(ds.x_train.to(device)), ds.y_train.to(device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg["amp"] else nullcontext
    rows, out = [], {}
    for name in dict.fromkeys(["convnet", cfg["model"]]):
        torch.manual_seed(0)
        model = models.build_model(name, 10, T=T, compile=cfg["compile"]).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        t = interleaved({k: step_fn(model, opt, x, y, k, T, amp) for k in ("plain", "bound", "exact")}, reps, device)
        with HeadTap(model.classifier, T=T) as head, amp():
            model(x)
            o, h = (v.detach() for v in head.pop())
        g = (o.float().mean(0).softmax(-1) - F.one_hot(y, 10)).div(T).expand_as(o.float())   # dl/do_t
        t.update(interleaved({"bound alone": lambda: head_gradient_bound(g, h),
                              "exact alone": lambda: head_gradient_norm(g, h)}, 50, device))
        med = {k: statistics.median(v) for k, v in t.items()}
        over = {k: median_ratio(t[k], t["plain"]) - 1 for k in ("bound", "exact")}
        rows.append([name, len(y), round(med["plain"] * 1e3, 1)] + [f"{over[k] * 100:+.2f}%" for k in over]
                    + [v for k in ("bound alone", "exact alone")
                       for v in (round(med[k] * 1e6, 1), f"{med[k] / med['plain'] * 100:.3f}%")])
        out[name] = {"batch": len(y), "median_seconds": med, "overhead": over, "seconds": t}
        progress("overhead", f"{name} timed")
    table(f"Score overhead per training step ({device.type}, T={T}, median of {reps} interleaved steps)",
          ["model", "batch", "plain step (ms)", "step with bound", "step with exact", "bound alone (us)",
           "bound / step", "exact alone (us)", "exact / step"], rows)
    return out


# -- variance: the estimator's statistics under each score (synthetic data, all parameters) -----
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by order, fine for continuous scores)."""
    ra, rb = (v.double().argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def per_example_grads(model, x, y, params=None) -> torch.Tensor:
    """[N, P]: the flattened gradient of every parameter (or of `params`) for each example."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]).float().mean(0), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    return torch.stack(rows)


def estimator_variance(G: torch.Tensor, p: torch.Tensor) -> float:
    """Trace of Cov of w_i g_i, i ~ p, w = 1/(N p): sum_i ||g_i||^2 / (N^2 p_i) - ||mean g||^2."""
    N = G.shape[0]
    return float((G.square().sum(1) / (N * N * p)).sum() - G.mean(0).square().sum())


def score_stats(G: torch.Tensor, scores: dict) -> dict:
    """name -> each score's (and the oracle ||G_i||'s) statistics against the true norms ||G_i||:
    rank correlation, score / norm (min, median), and the variance of the estimator sampling
    p = (1 - eps) s / sum s + eps / N, relative to uniform, at eps 0 and 0.1."""
    truth, N = G.norm(dim=1), G.shape[0]
    uniform = estimator_variance(G, torch.full((N,), 1.0 / N, dtype=torch.float64))
    out = {}
    for name, s in {**scores, "oracle": truth}.items():
        s = s.double().clamp_min(0)
        out[name] = {"spearman": spearman(s, truth), "min_ratio": float((s / truth).min()),
                     "median_ratio": float((s / truth).median()),
                     **{f"eps={eps}": estimator_variance(G, (1 - eps) * s / s.sum() + eps / N) / uniform
                        for eps in (0.0, 0.1)}}
    return out


def stats_tables(snaps: list[dict], names: list[str], what: str) -> None:
    heads = [f"epoch {s['epoch']}" for s in snaps]
    table(f"Spearman rank correlation of each score with the true per-example gradient norm, {what}",
          ["score"] + heads, [[n] + [round(s["scores"][n]["spearman"], 3) for s in snaps] for n in names])
    table(f"Variance of the importance-sampled gradient relative to uniform, {what}: p = score, "
          f"eps = 0 / eps = 0.1 mix; lower is better, the oracle p ~ ||grad|| is the floor",
          ["score"] + heads, [["uniform"] + ["1"] * len(snaps)] + [
              [n] + [f"{s['scores'][n]['eps=0.0']:.3f} / {s['scores'][n]['eps=0.1']:.3f}" for s in snaps]
              for n in names])


def trained_models(flags: dict, stops: list[int], num_classes: int, directory: str):
    """(epoch, model on the CPU) after each epoch in `stops` of one full-data train.py run with
    `flags` (its cosine schedule spans the last stop), read back from its checkpoint at each."""
    out = os.path.join(directory, "run")
    model = models.build_model(flags["model"], num_classes, T=flags["T"], compile=not flags["no_compile"])
    for k, stop in enumerate(stops):
        argv = train_argv(dict(flags, method="full", epochs=stops[-1], stop_after=stop, resume=k > 0, out=out))
        train.run(train.parse_args(argv))
        model.load_state_dict(train.load_checkpoint(out, "cpu")["model"])
        yield stop, model


def sampled_variance(G, scores, ratio: float, eps: float, replacement: bool, epochs: int) -> float:
    """Trace of the covariance of an epoch's estimate (1/m) sum_j w_j g_j over `epochs` draws
    of SADPSampler, the rows of G being the data set."""
    s = SADPSampler(G.shape[0], ratio, seed=123, epsilon=eps, replacement=replacement)
    s.update(torch.arange(G.shape[0]), scores.double().clamp_min(0))
    estimates = []
    for e in range(epochs):
        s.set_epoch(e)
        idx = torch.tensor(list(s))
        estimates.append((s.weights(idx).double()[:, None] * G[idx]).mean(0))
    return float(torch.stack(estimates).var(0).sum())


def bench_variance(cfg) -> dict:
    """Checkpoints of a full-data train.py run (synthetic, convnet, seed 0); at each, with BN in
    eval mode (examples independent), every score of a fixed pool of training examples against
    their per-example gradients over all parameters; and an epoch's estimate at r = 0.3 as the
    sampler draws it (Monte Carlo over epochs), with and without replacement."""
    c, T, ratio = cfg["variance"], cfg["T"], 0.3
    flags = run_flags(cfg, data="synthetic", train_size=c["train"], test_size=500, model="convnet", seed=0)
    ds = data.make_synthetic(c["train"], 500, seed=0)                 # train.py's set at seed 0
    pool = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(1))[: c["pool"]]
    xp, yp = data.Normalizer("synthetic")(ds.x_train[pool]), ds.y_train[pool]
    snaps = []
    with tempfile.TemporaryDirectory() as tmp:
        for stop, model in trained_models(flags, c["epochs"], 10, tmp):
            model.eval()
            with HeadTap(model.classifier, T=T) as tap:
                model(xp)                                             # (the tap records forwards with grad)
                o, h = tap.pop()
            scores = {"loss": baseline_loss(o, yp, kind="loss")[1], "ann": baseline_loss(o, yp, kind="ann")[1],
                      "sadp": spike_aware_loss(o, yp, h)[1], "sadp-exact": spike_aware_loss(o, yp, h, exact=True)[1]}
            G = per_example_grads(model, xp, yp)
            mc = {f"{label}, {'with' if rep else 'without'}": sampled_variance(G, s, ratio, eps, rep, c["mc"])
                  for label, s, eps in (("uniform", torch.ones(len(yp)), 1.0), ("sadp", scores["sadp"], 0.1),
                                        ("oracle", G.norm(dim=1), 0.1)) for rep in (True, False)}
            snaps.append({"epoch": stop, "scores": score_stats(G, scores),
                          "epoch_estimator": {k: v / mc["uniform, with"] for k, v in mc.items()}})
            progress("variance", f"epoch {stop} scored")
    stats_tables(snaps, ["loss", "ann", "sadp", "sadp-exact", "oracle"],
                 f"synthetic ({c['pool']} examples, all parameters, BN in eval mode)")
    table(f"Variance of an epoch's gradient estimate as the sampler draws it, with vs without replacement "
          f"(r = {ratio}, eps = 0.1, Monte Carlo over {c['mc']} epochs; relative to uniform with replacement)",
          ["sampling"] + [f"epoch {s['epoch']}" for s in snaps],
          [[k] + [round(s["epoch_estimator"][k], 3) for s in snaps] for k in snaps[0]["epoch_estimator"]])
    return {"pool": c["pool"], "ratio": ratio, "snapshots": snaps}


# -- lif: the neuron's forward + backward, ours and the libraries' ------------------------------
class SnnTorchLeaky(torch.nn.Module):
    """snnTorch's Leaky stepped over T (beta = 1 - 1/tau = 0.5), its usual loop."""

    def __init__(self):
        super().__init__()
        import snntorch
        self.lif = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero")

    def forward(self, x):
        mem, out = self.lif.init_leaky(), []
        for t in range(x.shape[0]):
            s, mem = self.lif(x[t], mem)
            out.append(s)
        return torch.stack(out)


def spikingjelly_lif():
    from spikingjelly.activation_based import neuron, surrogate
    return neuron.LIFNode(tau=2.0, step_mode="m", surrogate_function=surrogate.ATan())


def bench_lif(cfg) -> dict:
    """Forward + backward of one LIF layer on the same input: ours eager and compiled (not under
    --no-compile), SpikingJelly's LIFNode and snnTorch's Leaky where installed."""
    from importlib import metadata, util
    c, device = cfg["lif"], torch.device(cfg["device"])
    makers = {"ours eager": lambda: models.LIF(compile=False), "ours compiled": lambda: models.LIF(compile=True),
              "SpikingJelly LIFNode": spikingjelly_lif, "snnTorch Leaky": SnnTorchLeaky}
    x0, steps, skipped = torch.randn(*c["shape"], device=device) * 1.5, {}, []
    for name, make in makers.items():
        try:
            if name == "ours compiled" and not cfg["compile"]:
                raise RuntimeError("skipped under --no-compile")
            m = make().to(device)
        except Exception as e:                                    # optional libraries
            skipped.append(f"{name}: {type(e).__name__}: {e}")
            progress("lif", skipped[-1])
            continue
        steps[name] = lambda m=m: (m.reset() if hasattr(m, "reset") else None,
                                   m(x0.detach().requires_grad_()).sum().backward())
    t = interleaved(steps, c["reps"], device)
    out = {k: {"median_ms": statistics.median(v) * 1e3, "speed_vs_ours_eager": median_ratio(t["ours eager"], v)}
           for k, v in t.items()}
    versions = {pkg: metadata.version(pkg) for pkg in ("spikingjelly", "snntorch") if util.find_spec(pkg)}
    table(f"LIF forward+backward on {list(c['shape'])} ({device.type}; median of {c['reps']} interleaved reps; "
          f"{', '.join(f'{k} {v}' for k, v in versions.items()) or 'no other SNN library installed'})",
          ["implementation", "ms", "speed vs ours eager"],
          [[k, round(v["median_ms"], 2), f"{v['speed_vs_ours_eager']:.2f}x"] for k, v in out.items()])
    return {"shape": list(c["shape"]), "device": str(device), "results": out, "versions": versions,
            "skipped": skipped}


# -- throughput: images/s of whole training epochs (a GPU measurement) --------------------------
def bench_throughput(cfg) -> dict:
    """images/s of the second of 2 epochs (compilation and warm-up stay out), compiled vs eager
    x full vs sadp at r = 0.3, interleaved. sadp trains on 70% of the examples per epoch:
    pruning shortens its epoch, and equal images/s means the score and the sampler cost nothing."""
    c = cfg["throughput"]
    if not c["run"]:
        progress("throughput", "skipped: it measures the GPU path (--set throughput.run=true forces it)")
        return {"skipped": "not on a GPU"}
    flags = run_flags(cfg, data="synthetic", train_size=c["train"], test_size=256, model=cfg["model"], epochs=2)
    runs = interleaved_runs("throughput", {
        f"{'compiled' if compiled else 'eager'}, {method}": dict(flags, no_compile=not compiled, method=method,
                                                                 ratio=0.3 if method == "sadp" else None)
        for compiled in (False, True) for method in ("full", "sadp")}, c["reps"])
    ips = {k: [s["history"][-1]["examples"] / s["history"][-1]["seconds"] for s in v] for k, v in runs.items()}
    out = {k: {"images_per_s": v, "vs_eager_full": median_ratio(v, ips["eager, full"])} for k, v in ips.items()}
    table(f"Training throughput, {cfg['model']} T={cfg['T']} on CIFAR-shaped synthetic data ({cfg['device']}"
          f"{', bf16 autocast' if cfg['amp'] else ''}, batch {cfg['batch_size']}, sadp at r = 0.3, second "
          f"epoch of 2, median of {c['reps']} interleaved reps)", ["run", "images/s", "vs eager full"],
          [[k, round(statistics.median(v["images_per_s"]), 1), f"{v['vs_eager_full']:.2f}x"] for k, v in out.items()])
    return {"model": cfg["model"], "train_size": c["train"], "runs": out}


# -- netbound: the whole-network bound vs the head bound (MNIST-1D) -----------------------------
def netbound_scores(model, x, y, T: int, batch: int | None = None) -> dict:
    """head, network, ann and loss scores of (x, y) from forward + backward passes with weights
    1, in the model's current mode; batch: examples per pass (None: all in one)."""
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
        for kind in ("ann", "loss"):
            parts[kind].append(baseline_loss(outputs, yb, kind=kind)[1])
    net.remove()
    head.remove()
    model.zero_grad(set_to_none=True)
    return {k: torch.cat(v).double() for k, v in parts.items()}


def netbound_snapshot(model, xp, yp, T: int, batch: int, epoch: int) -> dict:
    """Every score on the pool against the true norm over all conv + linear weights (BN in
    eval mode); the bounds as train.py records them (BN in training mode, batches) too."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    in_training = netbound_scores(model, xp, yp, T, batch)
    model.load_state_dict(state)                              # undo the BN running-stat updates
    model.eval()
    scores = {"head (BN train)": in_training["head"], "network (BN train)": in_training["network"],
              **netbound_scores(model, xp, yp, T)}
    weights = [p for m in model.modules() if isinstance(m, NetworkTap.LAYERS) for p in m.parameters()]
    return {"epoch": epoch, "scores": score_stats(per_example_grads(model, xp, yp, weights), scores)}


def bench_netbound(cfg) -> dict:
    """Checkpoints of a full-data train.py run on MNIST-1D (conv1d, seed 0); at each, a fixed pool
    of training examples scored against its per-example gradients over every conv + linear
    weight (BN parameters are outside the bound and the truth); then a step's cost, 1 thread."""
    c, T, batch = cfg["netbound"], cfg["T"], cfg["batch_size"]
    memoize_mnist1d()                                         # for train.py's runs too
    ds = data.load_dataset("mnist1d")
    flags = run_flags(cfg, data="mnist1d", model="conv1d", device="cpu", amp=False, seed=0)
    pool = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(1))[: c["pool"]]
    xp, yp = ds.x_train[pool], ds.y_train[pool]
    snaps = []
    with tempfile.TemporaryDirectory() as tmp:
        for stop, model in trained_models(flags, c["epochs"], ds.num_classes, tmp):
            snaps.append(netbound_snapshot(model, xp, yp, T, batch, stop))
            progress("netbound", f"epoch {stop} scored")
    names = ["loss", "ann", "head", "network", "head (BN train)", "network (BN train)", "oracle"]
    stats_tables(snaps, names, f"MNIST-1D, conv1d T={T}, {len(yp)} training examples, all conv + linear "
                               f"weights, BN eval")
    table("Score / true norm per example: min / median (network, BN eval: >= 1, it dominates; the "
          "head bound covers the head only, and a BN-train score is no bound on the BN-eval gradient)",
          ["score"] + [f"epoch {s['epoch']}" for s in snaps],
          [[n] + [f"{s['scores'][n]['min_ratio']:.3g} / {s['scores'][n]['median_ratio']:.3g}" for s in snaps]
           for n in names[2:-1]])
    model.train()
    opt, x, y = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9), ds.x_train[:batch], ds.y_train[:batch]
    with threads(1):
        t = interleaved({k: step_fn(model, opt, x, y, k, T) for k in ("bound", "network")}, c["reps"],
                        torch.device("cpu"), warmup=3)
    ratio = median_ratio(t["network"], t["bound"])
    table(f"Training-step time with the network bound vs with the head bound (conv1d T={T}, batch {batch}, "
          f"CPU, 1 thread, median of {c['reps']} interleaved pairs)",
          ["step with network bound / step with head bound"], [[f"{ratio:.3f}"]])
    return {"snapshots": snaps, "pool": len(yp), "T": T, "step_ratio": ratio, "step_seconds": t}


# -- datapath: the streaming path of imagefolder.py (decoding, the loader, waiting for data) ----
def write_photos(root: str, n_train: int, side: tuple[int, int], classes: int = 4) -> float:
    """An ImageFolder (n_train training, n_train / 4 validation images) of photo-like JPEGs with
    sides in `side` (quality 90; smooth colour fields plus grain, so that files and decoding
    cost what photos do); returns the mean file size in bytes."""
    from PIL import Image
    g, sizes = torch.Generator().manual_seed(0), []
    for split, n in (("train", n_train), ("val", n_train // 4)):
        for i in range(n):
            w, h = (int(v) for v in torch.randint(side[0], side[1], (2,), generator=g))
            field = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(h, w), mode="bicubic")[0]
            pixels = (field * 200 + 28 + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255)
            path = os.path.join(root, split, f"c{i % classes}", f"{i}.JPEG")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(pixels.byte().permute(1, 2, 0).numpy()).save(path, quality=90)
            sizes.append(os.path.getsize(path))
    return statistics.mean(sizes)


def bench_datapath(cfg) -> dict:
    """At 224 px: images/s of decoding + augmentation in one thread (Pillow at full size vs
    reduced-size JPEG decoding, and torchcodec where installed; ImageNet-sized and large
    photos), of the loader alone, and of train.py SADP epochs with their share waiting for data."""
    import PIL
    import imagefolder
    imagefolder.require_pillow()
    c, decode = cfg["datapath"], {}
    with tempfile.TemporaryDirectory() as root:
        for name, side, n in (("imagenet-sized", (400, 520), c["images"]), ("large", (1400, 1800), 40)):
            kb = write_photos(os.path.join(root, name), n, side) / 1024
            split = imagefolder.scan(os.path.join(root, name)).train
            decode[name] = {"side": side, "mean_file_kb": kb,
                            "images_per_s": decode_rates([split.path(i) for i in range(min(n, 160))], c["reps"])}
            progress("datapath", f"{name} photos decoded")
        table(f"Decoding + augmentation in one thread, Pillow {PIL.__version__}, 224 px, photo-like JPEGs "
              f"(images/s, median of {c['reps']})",
              ["path"] + [f"{k}: {v['side'][0]}-{v['side'][1]} px, {v['mean_file_kb']:.0f} kB" for k, v in decode.items()],
              [[k] + [v["images_per_s"][k] for v in decode.values()] for k in decode["large"]["images_per_s"]])
        epochs = datapath_epochs(cfg, os.path.join(root, "imagenet-sized"))
    return {"decode": decode, "epochs": epochs}


def decode_rates(paths: list[str], reps: int) -> dict:
    """images/s of imagefolder.load_image over `paths` on one thread (as in a loader worker), the
    same train and eval crops for every decoding path, interleaved."""
    import imagefolder
    load = {"Pillow, full-size decode": functools.partial(imagefolder.load_image, draft=False),
            "Pillow, reduced-size decode": imagefolder.load_image}
    if imagefolder.resolve_decoder("auto") == "torchcodec":
        load["torchcodec (+ Pillow reduced-size)"] = functools.partial(imagefolder.load_image, decoder="torchcodec")

    def decode_all(fn, train: bool):
        return lambda: [fn(p, 224, np.random.default_rng(i) if train else None) for i, p in enumerate(paths)]

    with threads(1):
        t = interleaved({f"{mode}, {k}": decode_all(fn, mode == "train") for mode in ("train", "eval")
                         for k, fn in load.items()}, reps, torch.device("cpu"), warmup=0)
    return {k: len(paths) / statistics.median(v) for k, v in t.items()}


def datapath_epochs(cfg, root: str) -> list[dict]:
    """For each worker count: images/s of the loader alone (the second of two passes of
    FolderSource.train_batches, nothing trained) with each installed decoder, then of the second
    epoch of a train.py SADP run (r = 0.3, "auto" decoder) and its share of time waiting for data."""
    import imagefolder
    c, folder, runs = cfg["datapath"], imagefolder.scan(root), []
    decoders = sorted({"pillow", imagefolder.resolve_decoder("auto")})
    for rep in range(c["reps"]):
        for workers in c["workers"]:
            run = {"workers": workers, "rep": rep, **{f"loader_{d}": loader_rate(cfg, folder, workers, d, rep)
                                                     for d in decoders}}
            last = train_once(**run_flags(cfg, data="imagefolder", data_dir=root, model=c["model"], image_size=224,
                                          workers=workers, epochs=2, ratio=0.3, batch_size=c["batch"],
                                          seed=rep))["history"][-1]
            runs.append(dict(run, train_images_per_s=last["examples"] / last["seconds"], data_wait=last["data_wait"]))
            progress("datapath", f"rep {rep + 1}/{c['reps']}, {workers} worker(s): "
                                 f"{runs[-1]['train_images_per_s']:.1f} training images/s")
    keys = [f"loader_{d}" for d in decoders] + ["train_images_per_s", "data_wait"]
    table(f"Streaming loader and SADP epochs (r = 0.3, decoder {imagefolder.resolve_decoder('auto')}), "
          f"{c['model']} T={cfg['T']}, 224 px, batch {c['batch']}, {cfg['device']}{', bf16' if cfg['amp'] else ''}; "
          f"second epoch of 2, median of {c['reps']} interleaved reps",
          ["workers"] + [f"loader alone, {d} (images/s)" for d in decoders]
          + ["training images/s", "share of the epoch waiting for data"],
          [[w] + [statistics.median(r[k] for r in runs if r["workers"] == w) for k in keys] for w in c["workers"]])
    return runs


def loader_rate(cfg, folder, workers: int, decoder: str, seed: int) -> float:
    """images/s of the second of two passes of FolderSource.train_batches (nothing trained)."""
    import imagefolder
    source = imagefolder.FolderSource(folder, 224, workers, cfg["device"], seed=seed, decoder=decoder)
    order = torch.randperm(len(folder.train)).split(cfg["datapath"]["batch"])
    try:
        for epoch in range(2):
            t = time.perf_counter()
            for _ in source.train_batches(epoch, order):
                pass
    finally:
        source.close()
    return len(folder.train) / (time.perf_counter() - t)


# -- Plots, configuration, the command line -----------------------------------------------------
def plot(results: dict, directory: str) -> None:
    """variance_synthetic.png: each score's estimator variance relative to uniform (eps = 0.1)."""
    if "variance" not in results:
        return
    snaps, (fig, ax) = results["variance"]["snapshots"], pyplot().subplots(figsize=(5, 3.5))
    for name in ("loss", "ann", "sadp", "sadp-exact", "oracle"):
        ax.plot([s["epoch"] for s in snaps], [s["scores"][name]["eps=0.1"] for s in snaps], marker="o", label=name)
    ax.axhline(1.0, color="k", ls=":", label="uniform")
    ax.set_yscale("log")
    save_figure(fig, ax, os.path.join(directory, "variance_synthetic.png"), "epoch of training",
                "estimator variance / uniform", "synthetic: gradient variance (eps = 0.1)")


SECTIONS = {"speedup": bench_speedup, "overhead": bench_overhead, "variance": bench_variance, "lif": bench_lif,
            "throughput": bench_throughput, "netbound": bench_netbound, "datapath": bench_datapath}


def config(quick: bool, device: str, compile_: bool) -> dict:
    """Every setting: the shared ones, then one dict per section. `threads`: torch's threads (None:
    its default; 1 on a CPU, where a second thread on a shared machine costs more than it gives).
    `model`: the network of speedup, overhead (besides convnet) and throughput."""
    gpu = device.startswith("cuda")
    q = lambda small, full: small if quick else full
    return {
        "device": device, "compile": compile_, "amp": gpu, "T": 4, "batch_size": 128,
        "threads": None if gpu else 1, "model": "resnet19" if gpu else "convnet",
        "speedup": {"train": q(2000, 6000), "epochs": q(2, 3), "ratios": q([0.3], [0.3, 0.5, 0.7]), "reps": q(2, 5)},
        "overhead": {"reps": q(5, 30)},
        "variance": {"train": q(2000, 8000), "pool": q(96, 384), "epochs": q([1, 3], [1, 3, 10]), "mc": q(100, 400)},
        "lif": {"shape": q([4, 16, 128, 16, 16], [4, 32, 128, 32, 32]), "reps": q(5, 15)},
        "throughput": {"run": gpu, "train": q(2000, 10000), "reps": q(2, 3)},
        "netbound": {"pool": q(128, 512), "epochs": q([1, 2], [1, 5, 20]), "reps": q(20, 100)},
        "datapath": {"images": q(2048 if gpu else 32, 4096 if gpu else 384), "reps": q(1, 3),
                     "workers": [1, 2, 4, 8] if gpu else [1, 2], "batch": 128 if gpu else q(16, 32),
                     "model": "sew_resnet34" if gpu else "convnet"},
    }


def main(argv=None) -> int:
    p = common_parser(__doc__)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="eager LIF everywhere (no torch.compile)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not only or set(only) - set(SECTIONS):
        p.error(f"--only {args.only!r}: name one or more of {', '.join(SECTIONS)}")
    cfg = config(args.quick, args.device, not args.no_compile)
    apply_settings(p, cfg, args.set)
    return finish("bench.py", args, cfg, SECTIONS, [s for s in SECTIONS if s in only], plot, argv)


if __name__ == "__main__":
    sys.exit(main())
