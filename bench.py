"""Speed and cost of SADP, and the statistics of its gradient estimator, measured in one run.

    python bench.py --quick                          # every section at small sizes (minutes on a CPU)
    python bench.py --out bench.json --plot figures  # the full sizes
    python bench.py --only variance,lif --set lif.reps=30 --set T=2

Sections (--only): speedup, overhead, variance, lif, throughput, netbound, datapath (what each
measures: the docstring of bench_<section>). --set KEY=JSON overrides a setting of config(): a
shared NAME or SECTION.NAME. --out is rewritten after every section, keeping an earlier run's other
sections; a failing section is recorded there with its error while the others run, and bench.py
exits 1 naming it. Timings are interleaved in one process, as a shared machine's speed drifts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

import data
import imagefolder
import models
import train
from baselines import baseline_loss
from netbound import NetworkTap
from sadp import HeadTap, SADPSampler, head_gradient_bound, head_gradient_norm, spike_aware_loss


# -- The harness, shared with evidence.py ---------------------------------------------------------
def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:      # the CPU's name, on Linux
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(title: str, rows: list[dict]) -> None:
    """Print rows as a markdown table, the first row's keys as the header; floats to 3 digits."""
    cell = lambda v: (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}") if isinstance(v, float) else str(v)
    lines = [f"\n### {title}\n", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    print("\n".join(lines + ["| " + " | ".join(map(cell, row.values())) + " |" for row in rows]), flush=True)


def progress(section: str, message: str) -> None:
    print(f"  [{section}] {message}", file=sys.stderr, flush=True)


def interleaved(fns: dict, reps: int, device="cpu", warmup: int = 2, section: str | None = None) -> dict:
    """name -> seconds of each of `reps` calls of fns[name], interleaved across names, after `warmup`
    untimed calls each. A call that returns a float reports its own seconds (a train.py run's)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in list(fns.values()) * warmup:
        fn()
    samples = {k: [] for k in fns}
    for rep in range(reps):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            own = fn()
            sync()
            samples[k].append(own if isinstance(own, float) else time.perf_counter() - t)
            if section:
                progress(section, f"rep {rep + 1}/{reps}, {k}: {samples[k][-1]:.3g} s")
    return samples


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def train_once(flags: dict, out: str | None = None) -> dict:
    """train.run's summary of a quiet run with {flag: value} (True: a bare switch; None, False:
    left out), into `out` (None: a temporary directory)."""
    argv = ["--quiet"]
    for key, value in flags.items():
        if value is not None and value is not False:
            argv += ["--" + key.replace("_", "-")] + ([] if value is True else [str(value)])
    with tempfile.TemporaryDirectory() as tmp:
        return train.run(train.parse_args(argv + ["--out", out or os.path.join(tmp, "run")]))


def run_flags(cfg: dict, **flags) -> dict:
    return {"device": cfg["device"], "no_compile": not cfg["compile"], "amp": cfg["amp"], "T": cfg["T"],
            "batch_size": cfg["batch_size"], **flags}


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_section(path: str, head: dict, name: str, result: dict) -> None:
    """Merge `head` and {name: result} into the JSON at `path` (other sections kept), atomically."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    results.update(head, **{name: result})
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_sections(prog: str, args, cfg: dict, sections: dict, plot_fn, argv) -> int:
    """Run each section(cfg) -> dict, writing --out after each, then draw the plots. A section that
    raises is recorded as {"error": {type, message, traceback}} and the next one runs; an
    interrupt is recorded, then raised. 0 when every section ran, else 1."""
    command = " ".join(["python", prog, *(sys.argv[1:] if argv is None else argv)])
    results, failed = {}, []
    with threads(cfg.get("threads") or torch.get_num_threads()):
        head = {"machine": machine(), "command": command, "config": cfg, "date": now()}
        print(f"# {command}\n# on {json.dumps(head['machine'])}, {head['date']}", flush=True)
        for name, section in sections.items():
            date, t0 = now(), time.perf_counter()
            try:
                result = section(cfg)
            except BaseException as e:   # SystemExit too: train.parse_args exits on bad flags
                result = {"error": {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}}
                failed.append(name)
                print(f"\n({name}: FAILED, {type(e).__name__}: {e})", file=sys.stderr, flush=True)
                if not isinstance(e, (Exception, SystemExit)):
                    raise                # an interrupt: its section is recorded (finally), the rest do not run
            finally:
                seconds = round(time.perf_counter() - t0, 1)
                results[name] = dict(result, run={"command": command, "date": date, "seconds": seconds})
                if args.out:
                    write_section(args.out, head, name, results[name])
                progress(name, f"{seconds:.0f} s")
    if args.plot:
        try:
            plot_fn({k: v for k, v in results.items() if "error" not in v}, args.plot)
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); no figures drawn", file=sys.stderr)
    if failed:
        print(f"failed section(s): {', '.join(failed)}" + (f" (errors recorded in {args.out})" if args.out else ""),
              file=sys.stderr)
    return 1 if failed else 0


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
        if key not in keys:
            p.error(f"--set: unknown config key {key!r}; keys: {', '.join(keys)}")
        section, _, name = key.rpartition(".")
        try:
            (cfg[section] if section else cfg)[name] = json.loads(value)
        except json.JSONDecodeError:
            p.error(f"--set {key}: {value!r} is not JSON (strings need quotes, lists brackets)")


@contextlib.contextmanager
def figure(path: str, xlabel: str, ylabel: str, title: str):
    """Axes to draw on in the block, then labelled and saved to `path` (ImportError without matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    yield ax
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- speedup, overhead: what SADP saves per epoch and costs per step ----------------------------
def bench_speedup(cfg) -> dict:
    """Training time of full data vs sadp at each ratio r (interleaved train.py runs on synthetic
    data): the median of the per-rep speedups against the theoretical 1/(1 - r). Then the
    sampler's own work at this N and at ImageNet's: freezing p and drawing an epoch, one update
    with an epoch of scores (ms), and one batch's weights (us)."""
    c = cfg["speedup"]
    flags = run_flags(cfg, data="synthetic", train_size=c["train"], test_size=256, model=cfg["model"],
                      epochs=c["epochs"], method="full")
    train_once(dict(flags, epochs=1))                                    # warm-up: compile, caches
    variants = {"full": flags, **{f"sadp r={r}": dict(flags, method="sadp", ratio=r) for r in c["ratios"]}}
    t = interleaved({k: lambda f=f: train_once(f)["train_seconds"] for k, f in variants.items()}, c["reps"],
                    warmup=0, section="speedup")
    runs = [{"ratio": r, "measured": median_ratio(t["full"], t[f"sadp r={r}"]), "theoretical": 1 / (1 - r),
             "speedups": [a / b for a, b in zip(t["full"], t[f"sadp r={r}"])]} for r in c["ratios"]]
    table(f"speedup of sadp over full data ({c['train']} synthetic examples, {cfg['model']}, T={cfg['T']}, "
          f"{c['epochs']} epochs, {c['reps']} reps)", [dict(u, speedups=f"{min(u['speedups']):.3f}-"
                                                              f"{max(u['speedups']):.3f}") for u in runs])
    sampler = []
    for N in (c["train"], 1_281_167):
        s, m = SADPSampler(N, 0.3), round(0.7 * N)
        s.update(torch.arange(N), torch.rand(N))
        idx, scores, batch = torch.randint(0, N, (m,)), torch.rand(m), torch.arange(cfg["batch_size"])
        times = interleaved({"set_epoch + iter (ms)": lambda: (s.set_epoch(1), list(s)),
                             "update (ms)": lambda: s.update(idx, scores)}, 3, warmup=1)
        # a microsecond call is timed in its own loop: after an epoch's work its caches are cold
        times["weights (us/batch)"] = interleaved({0: lambda: s.weights(batch)}, 50)[0]
        sampler.append({"N": N, **{k: statistics.median(v) * (1e6 if "us" in k else 1e3) for k, v in times.items()}})
        progress("speedup", f"sampler timed at N = {N}")
    table("speedup: the sampler's cost per epoch (CPU)", sampler)
    return {"runs": runs, "sampler": sampler}


def step_fn(model, opt, x, y, kind: str, T: int, amp=contextlib.nullcontext):
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
    """A training step's time with a plain loss, with the spike-aware bound and with the exact
    head norm (interleaved), for convnet and cfg's model; and the bound and the exact norm alone
    on one batch's head inputs, as a share of the plain step."""
    device, T, reps = torch.device(cfg["device"]), cfg["T"], cfg["overhead"]["reps"]
    ds = data.make_synthetic(cfg["batch_size"], 10, seed=0)
    x, y = data.Normalizer("synthetic", device)(ds.x_train.to(device)), ds.y_train.to(device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg["amp"] else contextlib.nullcontext
    rows, out = [], {}
    for name in dict.fromkeys(["convnet", cfg["model"]]):
        torch.manual_seed(0)
        model = models.build_model(name, 10, T=T, compile=cfg["compile"]).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        with HeadTap(model.classifier, T=T) as head, amp():
            model(x)
            o, h = (v.detach() for v in head.pop())
        g = (o.float().mean(0).softmax(-1) - F.one_hot(y, 10)).div(T).expand_as(o.float())   # dl/do_t
        t = interleaved({k: step_fn(model, opt, x, y, k, T, amp) for k in ("plain", "bound", "exact")}, reps, device)
        t.update(interleaved({"bound alone": lambda: head_gradient_bound(g, h),     # in their own loop: warm
                              "exact alone": lambda: head_gradient_norm(g, h)}, 50, device))
        med = {k: statistics.median(v) for k, v in t.items()}
        over = {k: median_ratio(t[k], t["plain"]) - 1 for k in ("bound", "exact")}
        out[name] = {"batch": len(y), "median_seconds": med, "overhead": over, "seconds": t}
        rows.append({"model": name, "plain step (ms)": med["plain"] * 1e3,
                     **{f"step with {k}": f"{v:+.2%}" for k, v in over.items()},
                     **{f"{k} / plain step": f"{med[k] / med['plain']:.3%}" for k in ("bound alone", "exact alone")}})
        progress("overhead", f"{name} timed")
    table(f"overhead of the score per training step ({device.type}, T={T}, batch {len(y)}, {reps} reps)", rows)
    return out


# -- variance, netbound: each score against the true per-example gradient norms ------------------
def per_example_grads(model, x, y, params: list) -> torch.Tensor:
    """[N, P]: the flattened gradient of `params` for each example."""
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
    Spearman rank correlation, score / norm (min, median), and the variance of the estimator
    sampling p = (1 - eps) s / sum s + eps / N, relative to uniform, at eps 0 and 0.1."""
    truth, N = G.norm(dim=1), G.shape[0]
    uniform = estimator_variance(G, torch.full((N,), 1.0 / N, dtype=torch.float64))
    ranks = lambda v: v.double().argsort().argsort().double() - (N - 1) / 2   # ties broken by order
    out = {}
    for name, s in {**scores, "oracle": truth}.items():
        s = s.double().clamp_min(0)
        out[name] = {"spearman": float(F.cosine_similarity(ranks(s), ranks(truth), dim=0)),
                     "min_ratio": float((s / truth).min()), "median_ratio": float((s / truth).median()),
                     **{f"eps={eps}": estimator_variance(G, (1 - eps) * s / s.sum() + eps / N) / uniform
                        for eps in (0.0, 0.1)}}
    return out


def snapshots(section: str, cfg: dict, flags: dict, ds, score_fn) -> tuple[list[dict], torch.nn.Module]:
    """At each epoch in cfg[section]["epochs"] of one full-data train.py run with `flags` (its
    cosine schedule spans the last), the model read back from the checkpoint onto the CPU and
    score_fn(model, x, y) of a fixed pool of ds's training examples; (the snapshots, the model)."""
    stops = cfg[section]["epochs"]
    pool = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(1))[: cfg[section]["pool"]]
    model = models.build_model(flags["model"], ds.num_classes, T=flags["T"], compile=not flags["no_compile"])
    snaps = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, stop in enumerate(stops):
            out = os.path.join(tmp, "run")
            train_once(dict(flags, method="full", epochs=stops[-1], stop_after=stop, resume=k > 0), out)
            model.load_state_dict(train.load_checkpoint(out, "cpu")["model"])
            snaps.append({"epoch": stop, **score_fn(model, ds.x_train[pool], ds.y_train[pool])})
            progress(section, f"epoch {stop} scored")
    return snaps, model


def epoch_table(title: str, snaps: list[dict], names, cell) -> None:
    """One row per name, one column per snapshot: cell(snapshot, name)."""
    table(title, [{"": n, **{f"epoch {s['epoch']}": cell(s, n) for s in snaps}} for n in names])


def stats_tables(section: str, snaps: list[dict], names: list[str]) -> None:
    epoch_table(f"{section}: Spearman correlation of each score with the true gradient norm", snaps, names,
                lambda s, n: round(s["scores"][n]["spearman"], 3))
    epoch_table(f"{section}: the estimator's variance under p ~ score relative to uniform, eps = 0 / 0.1",
                snaps, names, lambda s, n: f"{s['scores'][n]['eps=0.0']:.3f} / {s['scores'][n]['eps=0.1']:.3f}")


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
    their per-example gradients over all parameters; and the variance of an epoch's estimate at
    r = 0.3 as the sampler draws it (Monte Carlo over epochs), with and without replacement,
    relative to uniform with replacement."""
    c, T, ratio = cfg["variance"], cfg["T"], 0.3

    def score(model, x, y):
        x = data.Normalizer("synthetic")(x)
        with HeadTap(model.eval().classifier, T=T) as tap:
            model(x)                                                  # (the tap records forwards with grad)
            o, h = tap.pop()
        scores = {"loss": baseline_loss(o, y, kind="loss")[1], "ann": baseline_loss(o, y, kind="ann")[1],
                  "sadp": spike_aware_loss(o, y, h)[1], "sadp-exact": spike_aware_loss(o, y, h, exact=True)[1]}
        G = per_example_grads(model, x, y, list(model.parameters()))
        mc = {f"{label}, {'with' if rep else 'without'}": sampled_variance(G, s, ratio, eps, rep, c["mc"])
              for label, s, eps in (("uniform", torch.ones(len(y)), 1.0), ("sadp", scores["sadp"], 0.1),
                                    ("oracle", G.norm(dim=1), 0.1)) for rep in (True, False)}
        return {"scores": score_stats(G, scores),
                "epoch_estimator": {k: v / mc["uniform, with"] for k, v in mc.items()}}
    flags = run_flags(cfg, data="synthetic", train_size=c["train"], test_size=500, model="convnet", seed=0)
    snaps, _ = snapshots("variance", cfg, flags, data.make_synthetic(c["train"], 500, seed=0), score)
    stats_tables("variance", snaps, ["loss", "ann", "sadp", "sadp-exact", "oracle"])
    epoch_table(f"variance: the variance of an epoch's estimate as the sampler draws it (r = {ratio}, eps = 0.1, "
                f"{c['mc']} epochs)", snaps, snaps[0]["epoch_estimator"],
                lambda s, n: round(s["epoch_estimator"][n], 3))
    return {"pool": c["pool"], "ratio": ratio, "snapshots": snaps}


def netbound_scores(model, x, y, T: int, batch: int) -> dict:
    """head, network, ann and loss scores of (x, y) from forward + backward passes of `batch`
    examples with weights 1, in the model's current mode."""
    net, parts = NetworkTap(model, T=T), {k: [] for k in ("head", "network", "ann", "loss")}
    with HeadTap(model.classifier, T=T) as head:
        for xb, yb in zip(x.split(batch), y.split(batch)):
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
    model.zero_grad(set_to_none=True)
    return {k: torch.cat(v).double() for k, v in parts.items()}


def bench_netbound(cfg) -> dict:
    """Checkpoints of a full-data train.py run on MNIST-1D (conv1d, seed 0); at each, every score
    of a fixed pool of training examples against their per-example gradients over every conv +
    linear weight (BN parameters are outside the bound and the truth), BN in eval mode, and the
    bounds as train.py records them (BN in training mode, in batches) too. Then a training step's
    time with the network bound vs with the head bound, on 1 thread."""
    c, T, batch = cfg["netbound"], cfg["T"], cfg["batch_size"]

    def score(model, x, y):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        in_training = netbound_scores(model.train(), x, y, T, batch)
        model.load_state_dict(state)                          # undo the BN running-stat updates
        scores = {"head (BN train)": in_training["head"], "network (BN train)": in_training["network"],
                  **netbound_scores(model.eval(), x, y, T, batch)}
        weights = [p for m in model.modules() if isinstance(m, NetworkTap.LAYERS) for p in m.parameters()]
        return {"scores": score_stats(per_example_grads(model, x, y, weights), scores)}
    ds = data.load_dataset("mnist1d")
    flags = run_flags(cfg, data="mnist1d", model="conv1d", device="cpu", amp=False, seed=0)
    snaps, model = snapshots("netbound", cfg, flags, ds, score)
    names = ["loss", "ann", "head", "network", "head (BN train)", "network (BN train)", "oracle"]
    stats_tables("netbound", snaps, names)
    epoch_table("netbound: score / true norm, min / median (a bound has min >= 1 in BN eval mode)", snaps,
                names[2:-1], lambda s, n: f"{s['scores'][n]['min_ratio']:.3g} / {s['scores'][n]['median_ratio']:.3g}")
    opt, x, y = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9), ds.x_train[:batch], ds.y_train[:batch]
    with threads(1):
        t = interleaved({k: step_fn(model.train(), opt, x, y, k, T) for k in ("bound", "network")}, c["reps"], warmup=3)
    ratio = median_ratio(t["network"], t["bound"])
    table(f"netbound: training step with the network bound / with the head bound (CPU, batch {batch})",
          [{"ratio": f"{ratio:.3f}", "reps": c["reps"]}])
    return {"snapshots": snaps, "pool": c["pool"], "T": T, "step_ratio": ratio, "step_seconds": t}


# -- lif, throughput: the neuron against the libraries', whole epochs on a GPU --------------------
def snntorch_leaky(device):
    """snnTorch's Leaky stepped over T (beta = 1 - 1/tau = 0.5), its usual loop."""
    import snntorch
    lif = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero").to(device)

    def forward(x):
        mem, out = lif.init_leaky(), []
        for x_t in x:
            s, mem = lif(x_t, mem)
            out.append(s)
        return torch.stack(out)
    return forward


def spikingjelly_lif(device):
    """SpikingJelly's LIFNode, its state reset before each forward."""
    from spikingjelly.activation_based import neuron, surrogate
    lif = neuron.LIFNode(tau=2.0, step_mode="m", surrogate_function=surrogate.ATan()).to(device)
    return lambda x: (lif.reset(), lif(x))[1]


def bench_lif(cfg) -> dict:
    """Forward + backward of one LIF layer on the same input: ours eager and compiled (not under
    --no-compile), SpikingJelly's LIFNode and snnTorch's Leaky where installed."""
    from importlib import metadata, util
    c, device = cfg["lif"], torch.device(cfg["device"])
    ours = (False, True) if cfg["compile"] else (False,)
    makers = {f"ours {'compiled' if on else 'eager'}": lambda d, on=on: models.LIF(compile=on).to(d) for on in ours}
    makers.update({"SpikingJelly LIFNode": spikingjelly_lif, "snnTorch Leaky": snntorch_leaky})
    skipped = [] if cfg["compile"] else ["ours compiled: skipped under --no-compile"]
    x, steps = torch.randn(*c["shape"], device=device) * 1.5, {}
    for name, make in makers.items():
        try:
            lif = make(device)
        except Exception as e:                                    # the optional libraries
            skipped.append(f"{name}: {type(e).__name__}: {e}")
            progress("lif", skipped[-1])
            continue
        steps[name] = lambda lif=lif: lif(x.detach().requires_grad_()).sum().backward()
    t = interleaved(steps, c["reps"], device)
    out = {k: {"median_ms": statistics.median(v) * 1e3, "speed_vs_ours_eager": median_ratio(t["ours eager"], v)}
           for k, v in t.items()}
    versions = {pkg: metadata.version(pkg) for pkg in ("spikingjelly", "snntorch") if util.find_spec(pkg)}
    table(f"lif: forward + backward on {list(c['shape'])} ({device.type}, {c['reps']} reps; "
          f"{', '.join(f'{k} {v}' for k, v in versions.items()) or 'no other SNN library installed'})",
          [{"implementation": k, **v} for k, v in out.items()])
    return {"shape": list(c["shape"]), "device": str(device), "results": out, "versions": versions,
            "skipped": skipped}


def bench_throughput(cfg) -> dict:
    """images/s of the second of 2 training epochs (compilation and warm-up stay out), compiled
    vs eager x full vs sadp at r = 0.3, interleaved. sadp trains on 70% of the examples per
    epoch: equal images/s means that the score and the sampler cost nothing."""
    c = cfg["throughput"]
    if not c["run"]:
        progress("throughput", "skipped: it measures the GPU path (--set throughput.run=true forces it)")
        return {"skipped": "not on a GPU"}

    def seconds_per_image(flags: dict) -> float:                  # of the last epoch
        last = train_once(flags)["history"][-1]
        return last["seconds"] / last["examples"]
    flags = run_flags(cfg, data="synthetic", train_size=c["train"], test_size=256, model=cfg["model"], epochs=2)
    variants = {f"{'compiled' if compiled else 'eager'}, {m}": dict(flags, no_compile=not compiled, method=m,
                                                                    ratio=0.3 if m == "sadp" else None)
                for compiled in (False, True) for m in ("full", "sadp")}
    t = interleaved({k: functools.partial(seconds_per_image, f) for k, f in variants.items()}, c["reps"], warmup=0,
                    section="throughput")
    out = {k: {"images_per_s": [1 / s for s in v], "vs_eager_full": median_ratio(t["eager, full"], v)}
           for k, v in t.items()}
    table(f"throughput: training images/s, {cfg['model']} T={cfg['T']} ({cfg['device']}, batch {cfg['batch_size']}"
          f"{', bf16' if cfg['amp'] else ''}, {c['reps']} reps)",
          [{"run": k, "images/s": statistics.median(v["images_per_s"]), "vs eager full": v["vs_eager_full"]}
           for k, v in out.items()])
    return {"model": cfg["model"], "train_size": c["train"], "runs": out}


# -- datapath: the streaming path of imagefolder.py (decoding, the loader, waiting for data) ----
def write_photos(root: str, n_train: int, side: tuple[int, int], classes: int = 4) -> float:
    """An ImageFolder (n_train training, n_train / 4 validation images) of photo-like JPEGs with
    sides in `side` (quality 90; smooth colour fields plus grain, so that files and decoding
    cost what photos do); returns the mean file size in kB."""
    Image, g, sizes = imagefolder.require_pillow(), torch.Generator().manual_seed(0), []
    for split, n in (("train", n_train), ("val", n_train // 4)):
        for i in range(n):
            w, h = (int(v) for v in torch.randint(side[0], side[1], (2,), generator=g))
            field = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(h, w), mode="bicubic")[0]
            pixels = (field * 200 + 28 + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255)
            path = os.path.join(root, split, f"c{i % classes}", f"{i}.JPEG")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(pixels.byte().permute(1, 2, 0).numpy()).save(path, quality=90)
            sizes.append(os.path.getsize(path))
    return statistics.mean(sizes) / 1024


def decode_rates(paths: list[str], reps: int) -> dict:
    """images/s of imagefolder.load_image over `paths` on one thread (as in a loader worker): the
    train and eval crops, Pillow at full size vs reduced-size JPEG decoding, and torchcodec where
    installed, interleaved."""
    load = {"Pillow, full-size decode": functools.partial(imagefolder.load_image, draft=False),
            "Pillow, reduced-size decode": imagefolder.load_image}
    if imagefolder.resolve_decoder("auto") == "torchcodec":
        load["torchcodec (+ Pillow reduced-size)"] = functools.partial(imagefolder.load_image, decoder="torchcodec")

    def decode_all(fn, train: bool):
        return lambda: [fn(p, 224, np.random.default_rng(i) if train else None) for i, p in enumerate(paths)]
    with threads(1):
        t = interleaved({f"{mode}, {k}": decode_all(fn, mode == "train") for mode in ("train", "eval")
                         for k, fn in load.items()}, reps, warmup=0)
    return {k: len(paths) / statistics.median(v) for k, v in t.items()}


def loader_rate(cfg, folder, workers: int, decoder: str, seed: int) -> float:
    """images/s of the second of two passes of FolderSource.train_batches (nothing trained)."""
    order = torch.randperm(len(folder.train)).split(cfg["datapath"]["batch"])
    with contextlib.closing(imagefolder.FolderSource(folder, 224, workers, cfg["device"], seed=seed,
                                                     decoder=decoder)) as source:
        seconds = interleaved({0: lambda: list(source.train_batches(0, order))}, 1, warmup=1)[0][0]
    return len(folder.train) / seconds


def bench_datapath(cfg) -> dict:
    """At 224 px: images/s of decoding + augmentation (decode_rates) of ImageNet-sized and large
    photos; then for each worker count, images/s of the loader alone with each installed decoder,
    and of the second epoch of a train.py SADP run (r = 0.3, "auto" decoder) with its share of
    time waiting for data."""
    c, decode, runs = cfg["datapath"], [], []
    decoders = sorted({"pillow", imagefolder.resolve_decoder("auto")})
    with tempfile.TemporaryDirectory() as root:
        for name, side, n in (("imagenet-sized", (400, 520), c["images"]), ("large", (1400, 1800), 40)):
            kb = write_photos(os.path.join(root, name), n, side)
            split = imagefolder.scan(os.path.join(root, name)).train
            decode.append({"photos": f"{name}, {side[0]}-{side[1]} px, {kb:.0f} kB",
                           **decode_rates([split.path(i) for i in range(min(n, 160))], c["reps"])})
            progress("datapath", f"{name} photos decoded")
        table(f"datapath: decoding + augmentation, images/s in one thread (Pillow "
              f"{imagefolder.require_pillow().__version__}, {c['reps']} reps)", decode)
        folder = imagefolder.scan(os.path.join(root, "imagenet-sized"))
        for rep in range(c["reps"]):
            for workers in c["workers"]:
                last = train_once(run_flags(cfg, data="imagefolder", data_dir=folder.root, model=c["model"],
                                            image_size=224, workers=workers, epochs=2, ratio=0.3,
                                            batch_size=c["batch"], seed=rep))["history"][-1]
                runs.append({"workers": workers, **{f"loader alone, {d}": loader_rate(cfg, folder, workers, d, rep)
                                                    for d in decoders},
                             "training (images/s)": last["examples"] / last["seconds"],
                             "share waiting for data": last["data_wait"]})
                progress("datapath", f"rep {rep + 1}/{c['reps']}, {workers} worker(s): "
                                     f"{runs[-1]['training (images/s)']:.3g} training images/s")
    table(f"datapath: images/s of the loader and of SADP training, {c['model']} T={cfg['T']}, batch {c['batch']}, "
          f"{cfg['device']}{', bf16' if cfg['amp'] else ''}, {c['reps']} reps",
          [{k: statistics.median(r[k] for r in runs if r["workers"] == w) for k in runs[0]} for w in c["workers"]])
    return {"decode": decode, "epochs": runs}


# -- Plots, configuration, the command line -----------------------------------------------------
def plot(results: dict, directory: str) -> None:
    """variance_synthetic.png: each score's estimator variance relative to uniform (eps = 0.1)."""
    if "variance" in results:
        snaps = results["variance"]["snapshots"]
        with figure(os.path.join(directory, "variance_synthetic.png"), "epoch of training", "estimator variance / "
                    "uniform", "synthetic: gradient variance (eps = 0.1)") as ax:
            for name in ("loss", "ann", "sadp", "sadp-exact", "oracle"):
                ax.plot([s["epoch"] for s in snaps], [s["scores"][name]["eps=0.1"] for s in snaps], "o-", label=name)
            ax.axhline(1.0, color="k", ls=":", label="uniform")
            ax.set_yscale("log")


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
    return run_sections("bench.py", args, cfg, {s: f for s, f in SECTIONS.items() if s in only}, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
