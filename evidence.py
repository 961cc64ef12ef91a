"""Does SADP beat a random subset of the same size? Paired seeds at matched budgets.

    python evidence.py --quick                       # MNIST-1D, 2 seeds, r = 0.5, 8 epochs
    python evidence.py --log figures/evidence.jsonl --out figures/evidence.json --plot figures

Every method trains with the same seeds (config(): MNIST-1D at r in {0.3, 0.5, 0.7}, a rerun on
the synthetic set at r = 0.7). LABELS names the methods: `-lrb` trains with lr x 1/(1 - r)
(--lr-scale budget, the others --lr-scale none), `-lr2` at lr 0.2, `sadp-iid` draws with
replacement, `infobatch-matched` runs InfoBatch at the ratio whose example-passes match the
others' (matched_ratio). Per data set one table: final test accuracy (mean ± sd), the paired
difference to uniform at the same ratio, seed and step-size rule (sadp-lrb - uniform-lrb) with
its 95% t-interval, the example-passes, and the passes (in full-data epochs) until test accuracy
first reaches full data's final - 0.5 pp.

Runs go to a pool of single-threaded worker processes (--set workers=N); each finished run is
appended to --log (JSON lines), and a rerun skips the runs in it: an interrupted sweep goes on
where it stopped, and a complete log regenerates the tables without training. Log lines of labels
not in LABELS (variants since removed, docs/variants.md) are ignored. --set KEY=JSON as in
bench.py, e.g. --set mnist1d.seeds=3 --set 'mnist1d.ratios=[0.5]'.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
import sys

import torch

import bench

# label -> train.py flags over the set's recipe; the order of the tables
LABELS = {
    "full": {"method": "full"}, "uniform": {"method": "uniform"}, "ann": {"method": "ann"},
    "sadp": {"method": "sadp"}, "infobatch": {"method": "infobatch"}, "infobatch-matched": {"method": "infobatch"},
    "sadp-iid": {"method": "sadp", "replacement": True}, "sadp-lr2": {"method": "sadp", "lr": 0.2},
    "uniform-lr2": {"method": "uniform", "lr": 0.2}, "full-lr2": {"method": "full", "lr": 0.2},
    "sadp-lrb": {"method": "sadp", "lr_scale": "budget"}, "uniform-lrb": {"method": "uniform", "lr_scale": "budget"},
}
SETS = {"mnist1d": {"data": "mnist1d", "model": "conv1d", "batch_size": 128},
        "synthetic": {"data": "synthetic", "model": "convnet", "batch_size": 128, "train_size": 4000,
                      "test_size": 2000},
        "events": {}}                                  # its train.py flags: config()["events"]["flags"]
KEY = ("set", "label", "ratio", "seed", "nominal_ratio")          # a run's identity in the log
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
        # an event set, where one is on disk (README: "Event-camera data"); seeds 0: skipped.
        # flags: train.py's, over the rest (data_dir is required; device and compile as you like)
        "events": {"epochs": q(2, 200), "seeds": 0, "ratios": [0.3], "labels": ["sadp-lrb", "uniform-lrb"],
                   "variants": {}, "flags": {"data": "cifar10dvs", "data_dir": None}},
        "workers": 2, "max_infobatch_ratio": 0.95,
    }


def matched_ratio(cfg, name: str, r: float, runs: list[dict]) -> float | None:
    """InfoBatch's ratio r_ib whose actual example-passes match the others' at r: the one in the
    log, else (once its nominal runs at r are all in) r / c, solving its pass_fraction = 1 - c r_ib,
    capped at max_infobatch_ratio; None until then."""
    seeds = cfg[name]["seeds"]
    at = lambda label: sorted((x for x in runs if (x["set"], x["label"], x["ratio"]) == (name, label, r)
                               and x["seed"] < seeds), key=lambda x: x["seed"])
    logged, nominal = at("infobatch-matched"), at("infobatch")
    if logged:
        return logged[0]["nominal_ratio"]
    if len(nominal) < seeds or seeds == 0:
        return None
    c = statistics.mean((1 - x["pass_fraction"]) / r for x in nominal)       # 0 when it pruned nothing
    return min(round(r / c, 3), cfg["max_infobatch_ratio"]) if c > 0 else cfg["max_infobatch_ratio"]


def wanted(cfg, runs: list[dict]) -> list[dict]:
    """Every run the configuration asks for, given the runs so far (InfoBatch's matched runs wait
    for their ratio): its identity (KEY) and its train.py flags, InfoBatch's nominal runs first."""
    jobs = []
    for name, recipe in SETS.items():
        c = cfg[name]
        pairs = [("full", 0.0)] + [(label, r) for r in c["ratios"] for label in c["labels"]]
        pairs += [(label, r) for label, ratios in c["variants"].items() for r in ratios]
        pairs += [("infobatch-matched", r) for r in c["ratios"] if "infobatch" in c["labels"]]
        for label, r in pairs:
            nominal = matched_ratio(cfg, name, r, runs) if label == "infobatch-matched" else None
            if label == "infobatch-matched" and nominal is None:
                continue
            full = LABELS[label]["method"] == "full"
            for seed in range(c["seeds"]):
                flags = {**recipe, "epochs": c["epochs"], "lr_scale": "none", **LABELS[label], "seed": seed,
                         "device": "cpu", "no_compile": True, **c.get("flags", {}),
                         "ratio": None if full else nominal or r}
                jobs.append({"set": name, "label": label, "ratio": 0.0 if full else r, "seed": seed,
                             "nominal_ratio": nominal, "flags": flags})
    return sorted(jobs, key=lambda j: j["label"] != "infobatch")


def run_job(job: dict) -> dict:
    """One training run (in a worker process): its log line."""
    s = bench.train_once(job["flags"])
    return {**{k: job[k] for k in KEY}, "final": s["final_test_acc"] * 100, "best": s["best_test_acc"] * 100,
            "pass_fraction": s["pass_fraction"], "train_seconds": s["train_seconds"],
            "curve": [(row["examples"], row["test_acc"] * 100) for row in s["history"]]}


def sweep(cfg, log: str | None) -> tuple[list[dict], int]:
    """The runs of the log and those still wanted, trained in a process pool and each appended
    to the log as it finishes; (all runs, how many were trained now)."""
    runs = []
    if log and os.path.exists(log):
        with open(log) as f:
            runs = [run for run in map(json.loads, filter(str.strip, f)) if run["label"] in LABELS]
    logged, seen, pending, failed = len(runs), {tuple(r[k] for k in KEY) for r in runs}, {}, []
    with cf.ProcessPoolExecutor(cfg["workers"], mp_context=mp.get_context("spawn"),
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
        def submit():
            for job in wanted(cfg, runs):
                if (key := tuple(job[k] for k in KEY)) not in seen:
                    seen.add(key)
                    pending[pool.submit(run_job, job)] = job
        submit()
        bench.progress("evidence", f"{logged} runs in the log, {len(pending)} to train now, {cfg['workers']} workers")
        while pending:
            for future in cf.wait(pending, return_when=cf.FIRST_COMPLETED)[0]:
                job = pending.pop(future)
                what = f"{job['set']} {job['label']} r={job['ratio']} seed {job['seed']}"
                try:
                    runs.append(future.result())
                except Exception as e:
                    failed.append(f"{what}: {type(e).__name__}: {e}")
                    bench.progress("evidence", f"{what} FAILED: {type(e).__name__}: {e}")
                    continue
                if log:
                    with open(log, "a") as f:
                        f.write(json.dumps(runs[-1]) + "\n")
                bench.progress("evidence", f"{what}: {runs[-1]['final']:.1f}% at {runs[-1]['pass_fraction']:.3f} of "
                                           f"the passes ({len(runs) - logged} trained, {len(pending)} queued)")
            submit()
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (the others are logged; a rerun retries them): "
                           + "; ".join(failed))
    return runs, len(runs) - logged


def paired(diffs: list[float]) -> tuple[float | None, float | None]:
    """Mean of paired differences and the half-width of its 95% t-interval (None for n < 2)."""
    if len(diffs) < 2:
        return None, None
    t = T975[max(k for k in T975 if k <= len(diffs) - 1)]
    return statistics.mean(diffs), t * statistics.stdev(diffs) / math.sqrt(len(diffs))


def summarise_set(name: str, sel: list[dict]) -> dict:
    """One data set's table (printed) and its rows: see the module docstring."""
    full = [r for r in sel if r["label"] == "full"]
    target, n_full = statistics.mean(r["final"] for r in full) - 0.5, full[0]["curve"][0][0]
    rows, table = [], []
    for ratio, label in sorted({(r["ratio"], r["label"]) for r in sel}, key=lambda k: (k[0], list(LABELS).index(k[1]))):
        group = sorted((r for r in sel if r["label"] == label and r["ratio"] == ratio), key=lambda r: r["seed"])
        final, nominal = [r["final"] for r in group], group[0].get("nominal_ratio")
        # the uniform run with the same step-size rule: sadp-lrb pairs with uniform-lrb
        rule = "uniform" + label[label.find("-"):] if "-" in label else "uniform"
        rule = rule if rule in LABELS else "uniform"
        base = {r["seed"]: r["final"] for r in sel if r["label"] == rule and r["ratio"] == ratio}
        m, half = paired([r["final"] - base[r["seed"]] for r in group if r["seed"] in base]) \
            if label != rule and not label.startswith("full") else (None, None)
        passes = [list(itertools.accumulate(e for e, _ in r["curve"])) for r in group]    # after each epoch
        reach = [next((p for p, (_, acc) in zip(ps, r["curve"]) if acc >= target), None)   # the first to reach
                 for ps, r in zip(passes, group)]
        hits = [h for h in reach if h is not None]
        rows.append({"label": label, "ratio": ratio, "nominal_ratio": nominal, "final": final,
                     "seeds": [r["seed"] for r in group], "diff_to_uniform": m, "ci_half": half,
                     "pass_fraction": [r["pass_fraction"] for r in group], "passes_to_target": reach,
                     "curve": [statistics.mean(c) for c in zip(*[[a for _, a in r["curve"]] for r in group])],
                     "curve_passes": [p / n_full for p in passes[0]]})
        table.append({"method": label if nominal is None else f"{label} (r_ib = {nominal})", "ratio": ratio,
                      "final test acc": f"{statistics.mean(final):.2f} ± "
                                        f"{statistics.stdev(final) if len(final) > 1 else 0.0:.2f}",
                      "minus uniform (pp)": "" if m is None else f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]",
                      "example-passes / full": round(statistics.mean(rows[-1]["pass_fraction"]), 3),
                      "passes to target": f"{statistics.median(hits) / n_full:.1f} ({len(hits)}/{len(group)})"
                                          if hits else f"never (0/{len(group)})"})
    bench.table(f"evidence, {name}: final test accuracy (%, {len(full)} seeds) at matched budgets, minus uniform at "
                f"the same ratio and seed [95% CI], full-data epochs of passes to {target:.2f}% (full - 0.5 pp)", table)
    return {"target": target, "rows": rows}


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
        rows, ratio = ev["rows"], max(r["ratio"] for r in ev["rows"])
        full = next(r for r in rows if r["label"] == "full")
        with bench.figure(os.path.join(directory, f"evidence_{name}.png"), "pruning ratio r",
                          "final test accuracy (%, mean ± sd)", f"{name}: accuracy at matched budgets") as ax:
            ax.axhline(statistics.mean(full["final"]), color="k", ls="--", label="full data")
            for label in ("uniform", "ann", "sadp", "infobatch", "infobatch-matched", "uniform-lrb", "sadp-lrb"):
                sel = [r for r in rows if r["label"] == label]
                if sel:
                    ax.errorbar([r["ratio"] for r in sel], [statistics.mean(r["final"]) for r in sel], marker="o",
                                yerr=[statistics.stdev(r["final"]) if len(r["final"]) > 1 else 0 for r in sel],
                                capsize=3, label=label)
        with bench.figure(os.path.join(directory, f"evidence_passes_{name}.png"),
                          "example-passes (full-data epochs)", "test accuracy (%, mean over seeds)",
                          f"{name}: accuracy vs example-passes (r = {ratio})") as ax:
            for r in [full] + [r for r in rows if r["ratio"] == ratio and r["label"] in
                               ("uniform", "sadp", "infobatch-matched", "uniform-lrb", "sadp-lrb")]:
                ax.plot(r["curve_passes"], r["curve"], label=r["label"], lw=1.2)
            ax.axhline(ev["target"], color="k", ls=":", lw=0.8, label="full - 0.5 pp")
            ax.set_ylim(max(0, ev["target"] - 30), ev["target"] + 3)


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
    if cfg["events"]["seeds"] and not cfg["events"]["flags"].get("data_dir"):
        p.error("events.seeds > 0 needs the set's folder: --set 'events.flags={\"data\": \"cifar10dvs\", "
                "\"data_dir\": \"DIR\", \"device\": \"cuda\"}'")
    return bench.run_sections("evidence.py", args, cfg, {"evidence": lambda c: evidence(c, args.log)}, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
