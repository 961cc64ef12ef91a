"""Tests for the benchmark harness (bench.py) and the evidence sweep (evidence.py): results
survive a failing or interrupted section, bad command lines exit 2, and the sweep skips the
runs in its log and summarises them as computed by hand. Nothing here trains a network."""

import json
import math
import os

import pytest
import torch

import bench
import data
import evidence
import models
import train

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


def sections(calls: list, failing=None):
    """Three sections; `failing`: what the middle one raises (None: it returns)."""
    def ok(name):
        def run(cfg):
            calls.append(name)
            return {"value": name}
        return run

    def middle(cfg):
        calls.append("middle")
        if failing is not None:
            raise failing
        return {"value": "middle"}
    return {"first": ok("first"), "middle": middle, "last": ok("last")}


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"earlier": {"value": 1}}))          # merged with, not overwritten
    calls = []
    monkeypatch.setattr(bench, "SECTIONS", sections(calls, ValueError("boom")))
    assert bench.main(["--out", str(out)]) == 1
    assert calls == ["first", "middle", "last"]
    results = json.loads(out.read_text())
    assert results["first"]["value"] == "first" and results["last"]["value"] == "last"
    assert results["earlier"] == {"value": 1}
    error = results["middle"]["error"]
    assert error["type"] == "ValueError" and error["message"] == "boom" and "Traceback" in error["traceback"]
    assert results["machine"]["cores"] and "seconds" in results["first"]["run"]
    assert "failed section(s): middle" in capsys.readouterr().err


def test_a_section_that_exits_like_train_parse_args_is_a_failure_too(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SECTIONS", sections([], SystemExit(2)))
    assert bench.main(["--out", str(tmp_path / "r.json")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["middle"]["error"]["type"] == "SystemExit"


def test_results_are_on_disk_after_each_section_and_survive_an_interrupt(tmp_path, monkeypatch):
    out, calls = tmp_path / "results.json", []
    fake = sections(calls, KeyboardInterrupt())
    first = fake["middle"]

    def middle(cfg):                                   # the first section is already written
        assert json.loads(out.read_text())["first"]["value"] == "first"
        return first(cfg)
    monkeypatch.setattr(bench, "SECTIONS", dict(fake, middle=middle))
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--out", str(out)])
    results = json.loads(out.read_text())
    assert calls == ["first", "middle"]
    assert results["first"]["value"] == "first" and results["middle"]["error"]["type"] == "KeyboardInterrupt"
    assert "last" not in results


@pytest.mark.parametrize("argv, message", [
    (["--only", ""], "--only"),
    (["--only", " , "], "--only"),
    (["--only", "lif,nope"], "--only"),
    (["--set", "noequals"], "missing '='"),
    (["--set", "nope=1"], "unknown config key 'nope'"),
    (["--set", "lif.nope=1"], "unknown config key 'lif.nope'"),
    (["--set", "lif=1"], "unknown config key 'lif'"),
    (["--set", "lif.reps=x"], "not JSON"),
])
def test_bad_command_lines_exit_2_saying_why(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_sections", lambda *a: pytest.fail("nothing may run"), raising=False)
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_set_reaches_a_sections_setting(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "SECTIONS", {"lif": lambda cfg: seen.update(cfg) or {}})
    assert bench.main(["--only", "lif", "--set", "lif.reps=3", "--set", "T=2"]) == 0
    assert seen["lif"]["reps"] == 3 and seen["T"] == 2


def test_no_compile_builds_no_compiled_lif(monkeypatch):
    built = []
    real = models.LIF
    monkeypatch.setattr(bench.models, "LIF", lambda **kw: built.append(kw) or real(**kw))
    cfg = bench.config(True, "cpu", compile_=False)
    cfg["lif"] = {"shape": [2, 3, 8], "reps": 1}
    result = bench.bench_lif(cfg)
    assert built == [{"compile": False}] and list(result["results"]) == ["ours eager"]
    assert any("ours compiled" in s and "--no-compile" in s for s in result["skipped"])


class Stop(Exception):
    pass


def test_netbound_trains_mnist1d_with_the_1d_model(monkeypatch):
    parsed, real = [], train.parse_args

    def parse(argv):
        parsed.append(real(argv))                       # exits 2 on a refused combination
        raise Stop
    monkeypatch.setattr(bench.train, "parse_args", parse)
    signals = lambda n: (torch.randn(n, 1, 40), torch.arange(n) % 10)
    monkeypatch.setattr(bench.data, "load_dataset", lambda name, **kw: data.ArrayDataset(*signals(8), *signals(4), 10))
    with pytest.raises(Stop):
        bench.bench_netbound(bench.config(True, "cpu", compile_=False))
    assert (parsed[0].data, parsed[0].model, parsed[0].method) == ("mnist1d", "conv1d", "full")


# -- evidence.py -------------------------------------------------------------------------------

class NoPool:
    """Stands in for the process pool: any run submitted to it fails the test."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, job):
        pytest.fail(f"trained {job['label']} seed {job['seed']}, which is in the log")


def line(label, ratio, seed, final, curve):
    return {"set": "synthetic", "label": label, "ratio": ratio, "seed": seed, "nominal_ratio": None,
            "final": final, "best": final, "pass_fraction": 1.0 if label == "full" else 1 - ratio,
            "train_seconds": 1.0, "curve": curve}


def summarise_tiny_log(tmp_path, monkeypatch) -> tuple[dict, int, str]:
    """evidence.py's summary of a hand-made log of 3 seeds of full, uniform and sadp at r = 0.5
    on the synthetic set; (the summary, the log's lines, the log's path)."""
    monkeypatch.setattr(evidence.cf, "ProcessPoolExecutor", NoPool)
    runs = [line("full", 0.0, s, f, [(100, 50.0), (100, 81.6), (100, f)]) for s, f in enumerate([80, 82, 84])]
    runs += [line("uniform", 0.5, s, f, [(50, f)] * 3) for s, f in enumerate([70, 72, 71])]
    runs += [line("sadp", 0.5, s, f, [(50, f)] * 3) for s, f in enumerate([71, 75, 71])]
    runs += [line("uniform", 0.5, 5, 10, [(50, 10)]),            # a seed outside the plan
             line("sadp-ema", 0.5, 0, 99, [(50, 99)])]           # a removed variant
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = tmp_path / "summary.json"
    argv = ["--log", str(log), "--out", str(out), "--set", "mnist1d.seeds=0", "--set", "synthetic.seeds=3",
            "--set", "synthetic.ratios=[0.5]", "--set", 'synthetic.labels=["uniform", "sadp"]']
    assert evidence.main(argv) == 0
    return json.loads(out.read_text())["evidence"], len(runs), log


def test_evidence_skips_logged_runs_and_summarises_them(tmp_path, monkeypatch):
    result, lines, log = summarise_tiny_log(tmp_path, monkeypatch)
    assert result["trained_now"] == 0 and log.read_text().count("\n") == lines
    rows = {(r["label"], r["ratio"]): r for r in result["sets"]["synthetic"]["rows"]}
    assert set(rows) == {("full", 0.0), ("uniform", 0.5), ("sadp", 0.5)}
    diffs = [71 - 70, 75 - 72, 71 - 71]                          # sadp - uniform, paired by seed
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)                             # t(0.975, df = 2)
    assert rows[("sadp", 0.5)]["diff_to_uniform"] == pytest.approx(mean)
    assert rows[("sadp", 0.5)]["ci_half"] == pytest.approx(half)
    assert rows[("uniform", 0.5)]["final"] == [70, 72, 71]
    assert result["sets"]["synthetic"]["target"] == pytest.approx(81.5)
    assert rows[("full", 0.0)]["passes_to_target"] == [200, 200, 200]
    assert rows[("uniform", 0.5)]["passes_to_target"] == [None] * 3


def test_evidence_prints_the_table_as_computed_by_hand(tmp_path, monkeypatch, capsys):
    summarise_tiny_log(tmp_path, monkeypatch)
    table = capsys.readouterr().out
    assert "| full | 0 | 82.00 ± 2.00 |  | 1 | 2.0 (3/3) |" in table
    assert "| sadp | 0.5 | 72.33 ± 2.31 | +1.33 [-2.46, +5.13] | 0.5 | never (0/3) |" in table


def test_the_committed_log_regenerates_the_committed_summary_without_training(monkeypatch):
    monkeypatch.setattr(evidence.cf, "ProcessPoolExecutor", NoPool)
    got = evidence.evidence(evidence.config(quick=False), os.path.join(FIGURES, "evidence.jsonl"))
    with open(os.path.join(FIGURES, "evidence.json")) as f:
        want = json.load(f)["evidence"]["sets"]
    assert got["trained_now"] == 0 and set(got["sets"]) == set(want) == {"mnist1d", "synthetic"}
    for name in want:
        assert got["sets"][name]["rows"] == want[name]["rows"]


def test_infobatch_that_pruned_nothing_matches_at_the_capped_ratio():
    cfg = evidence.config(quick=True)
    nominal = [dict(line("infobatch", 0.5, s, 70, []), set="mnist1d", pass_fraction=1.0) for s in range(2)]
    assert evidence.matched_ratio(cfg, "mnist1d", 0.5, nominal[:1]) is None        # waits for every seed
    assert evidence.matched_ratio(cfg, "mnist1d", 0.5, nominal) == cfg["max_infobatch_ratio"]
    nominal = [dict(r, pass_fraction=0.6) for r in nominal]                       # c = 0.4 / 0.5
    assert evidence.matched_ratio(cfg, "mnist1d", 0.5, nominal) == pytest.approx(0.5 / 0.8)


def test_evidence_pairs_each_run_with_uniform_under_the_same_step_rule():
    runs = [{"set": "synthetic", "label": label, "ratio": r, "seed": s, "final": acc, "curve": [(100, acc)],
             "pass_fraction": 1 - r, "nominal_ratio": None}
            for s in range(2) for label, r, acc in (("full", 0.0, 80), ("uniform", 0.5, 60 + s),
                                                     ("uniform-lrb", 0.5, 70 + 2 * s), ("sadp-lrb", 0.5, 71 + s))]
    rows = {r["label"]: r for r in evidence.summarise_set("synthetic", runs)["rows"]}
    assert rows["sadp-lrb"]["diff_to_uniform"] == pytest.approx(0.5)     # (71 - 70 + 72 - 72) / 2, not vs uniform
    assert rows["uniform-lrb"]["diff_to_uniform"] is None                # the base of its rule


def test_evidence_runs_an_event_set_only_with_its_folder(tmp_path, capsys):
    cfg = evidence.config(quick=True)
    assert not [j for j in evidence.wanted(cfg, []) if j["set"] == "events"]          # seeds 0: skipped
    cfg["events"].update(seeds=1, flags={"data": "nmnist", "data_dir": str(tmp_path), "device": "cuda"})
    jobs = [j for j in evidence.wanted(cfg, []) if j["set"] == "events"]
    assert {j["label"] for j in jobs} == {"full", "sadp-lrb", "uniform-lrb"}
    assert all(j["flags"]["data_dir"] == str(tmp_path) and j["flags"]["device"] == "cuda" for j in jobs)
    with pytest.raises(SystemExit):
        evidence.main(["--quick", "--set", "events.seeds=1"])
    assert "needs the set's folder" in capsys.readouterr().err
