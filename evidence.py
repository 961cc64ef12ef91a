"""Does SADP beat a random subset of the same size? Paired seeds at matched budgets.

    python evidence.py --quick                       # MNIST-1D, 2 seeds, r = 0.5, 8 epochs
    python evidence.py --log figures/evidence.jsonl --out figures/evidence.json --plot figures

Every method trains with the same seeds: MNIST-1D (conv1d, 40 epochs, batch 128) at r in
{0.3, 0.5, 0.7}, and a rerun on the synthetic set (convnet, 10 epochs) at r = 0.7. The labels
(LABELS): full, uniform, ann and sadp at the recipe's lr (--lr-scale none); `-lrb` the same
method with lr x 1/(1 - r) (--lr-scale budget); `-lr2` at lr 0.2; `sadp-iid` --replacement;
infobatch at its nominal ratio, and `infobatch-matched` at the ratio r_ib whose example-passes
match the others' (solved from its nominal runs; once in the log, that r_ib is kept).

Per data set one table: final test accuracy (mean ± sd), the paired difference to uniform at
the same ratio and seed with its 95% t-interval, the example-passes, and the example-passes
(in full-data epochs) until test accuracy first reaches full data's final - 0.5 pp.

Runs go to a pool of single-threaded worker processes (--set workers=N); each finished run is
appended to --log (JSON lines), and a rerun with the same log skips every run in it (same set,
label, ratio, seed and r_ib): an interrupted sweep continues where it stopped, and a complete
log regenerates the tables without training. Log lines of labels not in LABELS (variants since
removed from train.py, docs/variants.md) are ignored. --set KEY=JSON as in bench.py, e.g.
--set mnist1d.seeds=3 --set 'mnist1d.ratios=[0.5]'.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import statistics
import sys

import torch

import bench

# label -> train.py flags (over the set's recipe and --lr-scale none); the order of the tables
LABELS = {
    "full": {"method": "full"}, "uniform": {"method": "uniform"}, "ann": {"method": "ann"},
    "sadp": {"method": "sadp"}, "infobatch": {"method": "infobatch"},
    "infobatch-matched": {"method": "infobatch"},              # at r_ib: see matched_jobs
    "sadp-iid": {"method": "sadp", "replacement": True},        # the i.i.d. draw as derived
    "sadp-lr2": {"method": "sadp", "lr": 0.2}, "uniform-lr2": {"method": "uniform", "lr": 0.2},
    "full-lr2": {"method": "full", "lr": 0.2},
    "sadp-lrb": {"method": "sadp", "lr_scale": "budget"}, "uniform-lrb": {"method": "uniform", "lr_scale": "budget"},
}
SETS = {"mnist1d": {"data": "mnist1d", "model": "conv1d", "batch_size": 128},
        "synthetic": {"data": "synthetic", "model": "convnet", "batch_size": 128, "train_size": 4000,
                      "test_size": 2000}}
# t quantiles (0.975) for a 95% confidence interval of a mean of n paired differences, df = n - 1
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def config(quick: bool) -> dict:
    """Per data set: epochs, seeds (0 .. seeds - 1; 0 skips the set), the ratios every label in
    `labels` runs at (full runs once, at ratio 0), and `variants`: label -> its own ratios."""
    q = lambda small, full: small if quick else full
    return {
        "mnist1d": {"epochs": q(8, 40), "seeds": q(2, 5), "ratios": q([0.5], [0.3, 0.5, 0.7]),
                    "labels": ["uniform", "ann", "sadp", "infobatch", "sadp-lrb", "uniform-lrb"],
                    "variants": q({}, {"sadp-iid": [0.5, 0.7], "sadp-lr2": [0.5, 0.7],
                                       "uniform-lr2": [0.5, 0.7], "full-lr2": [0.0]})},
        "synthetic": {"epochs": 10, "seeds": q(0, 3), "ratios": [0.7],
                      "labels": ["uniform", "sadp", "sadp-lrb", "uniform-lrb"], "variants": {}},
        "workers": 2, "max_infobatch_ratio": 0.95,
    }


def key(run: dict) -> tuple:
    """A run's identity in the log."""
    return run["set"], run["label"], float(run["ratio"]), run["seed"], run.get("nominal_ratio")


def job(cfg, name: str, label: str, ratio: float, seed: int, nominal: float | None = None) -> dict:
    flags = {**SETS[name], "epochs": cfg[name]["epochs"], "lr_scale": "none", **LABELS[label], "seed": seed,
             "device": "cpu", "no_compile": True}
    full = flags["method"] == "full"
    flags["ratio"] = None if full else nominal or ratio
    return {"set": name, "label": label, "ratio": 0.0 if full else ratio, "seed": seed, "nominal_ratio": nominal,
            "flags": flags}


def plan(cfg) -> list[dict]:
    """Every run the configuration asks for, InfoBatch's matched runs aside (matched_jobs)."""
    jobs = {}
    for name in SETS:
        c = cfg[name]
        wanted = [("full", 0.0)] + [(label, r) for r in c["ratios"] for label in c["labels"]]
        wanted += [(label, r) for label, ratios in c["variants"].items() for r in ratios]
        for label, r in wanted:
            for seed in range(c["seeds"]):
                j = job(cfg, name, label, r, seed)
                jobs[key(j)] = j
    return list(jobs.values())


def matched_jobs(cfg, runs: list[dict]) -> list[dict]:
    """InfoBatch at the ratio r_ib whose actual example-passes match the others' at r: the r_ib
    in the log, else (once its nominal runs at r are all in) r_ib = r / c, solving its
    pass_fraction = 1 - c r_ib, capped at max_infobatch_ratio."""
    jobs = []
    for name in SETS:
        c = cfg[name]
        for r in c["ratios"] if "infobatch" in c["labels"] else []:
            at = lambda label: sorted((x for x in runs if (x["set"], x["label"], x["ratio"]) == (name, label, r)
                                       and x["seed"] < c["seeds"]), key=lambda x: x["seed"])
            logged, nominal = at("infobatch-matched"), at("infobatch")
            if logged:
                r_ib = logged[0]["nominal_ratio"]
            elif len(nominal) == c["seeds"] > 0:
                r_ib = min(round(r / statistics.mean((1 - x["pass_fraction"]) / r for x in nominal), 3),
                           cfg["max_infobatch_ratio"])
            else:
                continue
            jobs += [job(cfg, name, "infobatch-matched", r, s, r_ib) for s in range(c["seeds"])]
    return jobs


def worker_init() -> None:
    torch.set_num_threads(1)
    bench.memoize_mnist1d()


def run_job(j: dict) -> dict:
    """One training run (in a worker process): the log line."""
    s = bench.train_once(j["flags"])
    return {**{k: j[k] for k in ("set", "label", "ratio", "seed", "nominal_ratio")},
            "final": s["final_test_acc"] * 100, "best": s["best_test_acc"] * 100,
            "pass_fraction": s["pass_fraction"], "train_seconds": s["train_seconds"],
            "curve": [(r["examples"], r["test_acc"] * 100) for r in s["history"]]}


def read_log(log: str | None) -> list[dict]:
    if not log or not os.path.exists(log):
        return []
    with open(log) as f:
        return [run for run in map(json.loads, filter(str.strip, f)) if run["label"] in LABELS]


def sweep(cfg, log: str | None) -> tuple[list[dict], int]:
    """The runs of the log and those the plan still needs, trained in a process pool and each
    appended to the log as it finishes; (all runs, how many were trained now)."""
    runs = read_log(log)
    seen, pending, failed, trained = {key(r) for r in runs}, {}, [], 0
    todo = [j for j in plan(cfg) + matched_jobs(cfg, runs) if key(j) not in seen]
    todo.sort(key=lambda j: j["label"] != "infobatch")         # the matched ratios need InfoBatch's runs
    bench.progress("evidence", f"{len(runs)} runs in the log, {len(todo)} to train now, {cfg['workers']} workers")
    with cf.ProcessPoolExecutor(cfg["workers"], mp_context=mp.get_context("spawn"), initializer=worker_init) as pool:
        def submit(jobs):
            for j in jobs:
                if key(j) not in seen:
                    seen.add(key(j))
                    pending[pool.submit(run_job, j)] = j
        submit(todo)
        while pending:
            for fut in cf.wait(pending, return_when=cf.FIRST_COMPLETED)[0]:
                j = pending.pop(fut)
                what = f"{j['set']} {j['label']} r={j['ratio']} seed {j['seed']}"
                try:
                    run = fut.result()
                except Exception as e:
                    failed.append(f"{what}: {type(e).__name__}: {e}")
                    bench.progress("evidence", f"{what} FAILED: {type(e).__name__}: {e}")
                    continue
                runs.append(run)
                trained += 1
                if log:
                    with open(log, "a") as f:
                        f.write(json.dumps(run) + "\n")
                bench.progress("evidence", f"{what}: {run['final']:.1f}% at {run['pass_fraction']:.3f} of the "
                                           f"passes ({trained} trained, {len(pending)} queued)")
            submit(matched_jobs(cfg, runs))
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (the others are logged; a rerun retries them): "
                           + "; ".join(failed))
    return runs, trained


def paired(diffs: list[float]) -> tuple[float | None, float | None]:
    """Mean of paired differences and the half-width of its 95% t-interval (None for n < 2)."""
    if len(diffs) < 2:
        return None, None
    df = len(diffs) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    return statistics.mean(diffs), t * statistics.stdev(diffs) / math.sqrt(len(diffs))


def passes_to(curve: list, target: float) -> int | None:
    """Example-passes until test accuracy first reaches `target` (None: never)."""
    total = 0
    for examples, acc in curve:
        total += examples
        if acc >= target:
            return total
    return None


def summarise_set(name: str, sel: list[dict]) -> dict:
    """One data set's table (printed) and its rows: see the module docstring."""
    full = [r for r in sel if r["label"] == "full"]
    target, n_full = statistics.mean(r["final"] for r in full) - 0.5, full[0]["curve"][0][0]
    rows, summary = [], []
    for ratio, label in sorted({(r["ratio"], r["label"]) for r in sel}, key=lambda k: (k[0], list(LABELS).index(k[1]))):
        group = sorted((r for r in sel if r["label"] == label and r["ratio"] == ratio), key=lambda r: r["seed"])
        final, nominal = [r["final"] for r in group], group[0].get("nominal_ratio")
        base = {r["seed"]: r["final"] for r in sel if r["label"] == "uniform" and r["ratio"] == ratio}
        m, half = paired([r["final"] - base[r["seed"]] for r in group if r["seed"] in base]) \
            if label not in ("uniform", "full") else (None, None)
        reach = [passes_to(r["curve"], target) for r in group]
        hits = [h for h in reach if h is not None]
        rows.append([label if nominal is None else f"{label} (r_ib = {nominal})", ratio,
                     f"{statistics.mean(final):.2f} ± {statistics.stdev(final) if len(final) > 1 else 0.0:.2f}",
                     "" if m is None else f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]",
                     round(statistics.mean(r["pass_fraction"] for r in group), 3),
                     f"{statistics.median(hits) / n_full:.1f} ({len(hits)}/{len(group)})" if hits
                     else f"never (0/{len(group)})"])
        summary.append({"label": label, "ratio": ratio, "nominal_ratio": nominal, "final": final,
                        "seeds": [r["seed"] for r in group], "diff_to_uniform": m, "ci_half": half,
                        "pass_fraction": [r["pass_fraction"] for r in group], "passes_to_target": reach,
                        "curve": [statistics.mean(c) for c in zip(*[[a for _, a in r["curve"]] for r in group])],
                        "curve_passes": [sum(e for e, _ in group[0]["curve"][:i + 1]) / n_full
                                         for i in range(len(group[0]["curve"]))]})
    bench.table(f"Paired comparison at matched budgets, {name} ({len(full)} seeds, the same for every method; "
                f"final test accuracy mean ± sd, %; difference to uniform at the same ratio and seed, mean "
                f"[95% CI]; full-data epochs of example-passes until test accuracy first reaches full data's "
                f"final - 0.5 pp = {target:.2f}%, median over the seeds that reach it)",
                [dict(zip(["method", "ratio", "final test acc", "minus uniform (pp)", "example-passes / full",
                           "passes to target"], row)) for row in rows])
    return {"target": target, "rows": summary}


def evidence(cfg, log: str | None) -> dict:
    """The section: sweep, then one table per data set from its seeds 0 .. seeds - 1."""
    runs, trained = sweep(cfg, log)
    sets = {}
    for name in SETS:
        sel = [r for r in runs if r["set"] == name and r["seed"] < cfg[name]["seeds"]]
        if any(r["label"] == "full" for r in sel):
            sets[name] = summarise_set(name, sel)
    return {"log": log, "runs": len(runs), "trained_now": trained, "sets": sets}


def plot(results: dict, directory: str) -> None:
    """evidence_<set>.png: accuracy vs ratio; evidence_passes_<set>.png: accuracy vs example-passes."""
    for name, ev in results.get("evidence", {}).get("sets", {}).items():
        rows, (fig, ax) = ev["rows"], bench.figure(5.5, 3.8)
        full = next(r for r in rows if r["label"] == "full")
        ax.axhline(statistics.mean(full["final"]), color="k", ls="--", label="full data")
        for label in ("uniform", "ann", "sadp", "infobatch", "infobatch-matched", "uniform-lrb", "sadp-lrb"):
            sel = [r for r in rows if r["label"] == label]
            if sel:
                ax.errorbar([r["ratio"] for r in sel], [statistics.mean(r["final"]) for r in sel], marker="o",
                            yerr=[statistics.stdev(r["final"]) if len(r["final"]) > 1 else 0 for r in sel],
                            capsize=3, label=label)
        bench.save_figure(fig, ax, os.path.join(directory, f"evidence_{name}.png"), "pruning ratio r",
                          "final test accuracy (%, mean ± sd)", f"{name}: accuracy at matched budgets")
        ratio, (fig, ax) = max(r["ratio"] for r in rows), bench.figure(5.5, 3.8)
        for r in [full] + [r for r in rows if r["ratio"] == ratio and r["label"] in
                           ("uniform", "sadp", "infobatch-matched", "uniform-lrb", "sadp-lrb")]:
            ax.plot(r["curve_passes"], r["curve"], label=r["label"], lw=1.2)
        ax.axhline(ev["target"], color="k", ls=":", lw=0.8, label="full - 0.5 pp")
        ax.set_ylim(max(0, ev["target"] - 30), ev["target"] + 3)
        bench.save_figure(fig, ax, os.path.join(directory, f"evidence_passes_{name}.png"),
                          "example-passes (full-data epochs)", "test accuracy (%, mean over seeds)",
                          f"{name}: accuracy vs example-passes (r = {ratio})")


def main(argv=None) -> int:
    p = bench.common_parser(__doc__)
    p.add_argument("--log", default=None, metavar="FILE.jsonl",
                   help="append each finished run here and skip the runs already in it")
    args = p.parse_args(argv)
    cfg = config(args.quick)
    bench.apply_settings(p, cfg, args.set)
    unknown = {label for s in SETS for label in [*cfg[s]["labels"], *cfg[s]["variants"]]} - set(LABELS)
    if unknown:
        p.error(f"unknown label(s) {', '.join(sorted(unknown))}; choose from {', '.join(LABELS)}")
    return bench.run_sections("evidence.py", args, cfg, {"evidence": lambda c: evidence(c, args.log)}, ["evidence"],
                        plot, argv)


if __name__ == "__main__":
    sys.exit(main())
