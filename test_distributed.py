"""SADP under torch.distributed: 2 processes on localhost with the gloo backend (CPU)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from sadp import SADPSampler

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sampler_worker(rank, world_size, port, out_dir, N, ratio, replacement):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        s = SADPSampler(N, ratio, seed=5, replacement=replacement)   # rank, world size: from dist
        record = {"len": len(s)}
        for epoch in range(3):
            s.set_epoch(epoch)
            share = torch.tensor(list(s))
            record[f"share{epoch}"] = share
            record[f"p{epoch}"] = s.probabilities.clone()
            # each rank scores only its own examples, differently per rank: the tables can only
            # agree if update() gathers every rank's scores
            s.update(share, (share % 7).double() + 0.5 + rank * 0.25)
        record["scores"], record["seen"] = s.scores.clone(), s.seen.clone()
        record["weights"] = s.weights(torch.arange(N))
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("N, ratio, replacement", [(101, 0.3, True), (101, 0.3, False), (40, 0.0, True)])
def test_ranks_hold_identical_tables_and_shares_union_to_the_single_process_draw(tmp_path, N, ratio,
                                                                                 replacement):
    world_size = 2
    mp.spawn(_sampler_worker, args=(world_size, free_port(), str(tmp_path), N, ratio, replacement),
             nprocs=world_size, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size))
    assert torch.equal(r0["scores"], r1["scores"]) and torch.equal(r0["seen"], r1["seen"])
    assert torch.equal(r0["weights"], r1["weights"])
    m = round((1 - ratio) * N)
    assert r0["len"] == r1["len"] == -(-m // world_size)       # equal steps on every rank

    # the single-process sampler, fed the same (gathered) scores, makes the same draws
    single = SADPSampler(N, ratio, seed=5, replacement=replacement)
    for epoch in range(3):
        assert torch.equal(r0[f"p{epoch}"], r1[f"p{epoch}"])
        single.set_epoch(epoch)
        torch.testing.assert_close(single.probabilities, r0[f"p{epoch}"], rtol=0, atol=0)
        union = torch.stack([r0[f"share{epoch}"], r1[f"share{epoch}"]], 1).reshape(-1)
        draw = torch.tensor(list(single))
        assert torch.equal(union[:m], draw)                      # exactly the single draw ...
        assert len(union) - m == (-m) % world_size               # ... plus at most one pad
        for rank, r in enumerate((r0, r1)):
            share = r[f"share{epoch}"]
            single.update(share, (share % 7).double() + 0.5 + rank * 0.25)


def _torchrun(args, timeout):
    """Run torchrun in its own process group, so that a timeout kills every worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_torchrun_two_processes_matches_one_process_and_resumes_exactly(tmp_path, assert_same_checkpoint):
    flags = ["--data", "synthetic", "--model", "convnet", "--device", "cpu", "--no-compile",
             "--train-size", "2000", "--test-size", "500", "--batch-size", "32", "--T", "2",
             "--epochs", "3", "--lr", "0.1", "--ratio", "0.3"]
    code, out = _torchrun(flags + ["--out", str(tmp_path / "ddp")], timeout=300)
    assert code == 0, out
    assert out.count("example-passes") == 1                # only rank 0 prints the summary
    with open(tmp_path / "ddp" / "results.json") as f:
        ddp = json.load(f)
    single = train.run(train.parse_args(flags + ["--out", str(tmp_path / "one"), "--quiet"]))
    assert ddp["world_size"] == 2
    assert ddp["example_passes"] == single["example_passes"] == 3 * 1400
    assert ddp["final_test_acc"] > 0.5 and single["final_test_acc"] > 0.5    # chance is 0.1
    assert abs(ddp["final_test_acc"] - single["final_test_acc"]) < 0.15

    # stopped after epoch 2 and resumed with the same world size == the uninterrupted run
    code, out = _torchrun(flags + ["--out", str(tmp_path / "split"), "--stop-after", "2"], timeout=300)
    assert code == 0, out
    code, out = _torchrun(flags + ["--out", str(tmp_path / "split"), "--resume"], timeout=300)
    assert code == 0, out
    assert_same_checkpoint(tmp_path / "ddp", tmp_path / "split", epoch=3)   # epochs done


def test_torchrun_two_processes_stream_an_imagefolder_and_resume_exactly(tmp_path, assert_same_checkpoint):
    """The streaming path under DDP: each rank reads its share of the draw through its own
    DataLoader workers; stopped and resumed equals uninterrupted."""
    from test_imagefolder import flags, write_folder
    root = write_folder(tmp_path / "ds")
    common = ["--epochs", "2", "--ratio", "0.3", "--workers", "1"]
    code, out = _torchrun(flags(root, tmp_path / "ddp", *common), timeout=300)
    assert code == 0, out
    with open(tmp_path / "ddp" / "results.json") as f:
        ddp = json.load(f)
    assert ddp["world_size"] == 2 and ddp["data"] == "imagefolder"
    assert ddp["example_passes"] == 2 * (round(0.7 * 18) + 1)     # each epoch padded to 2 equal shares
    assert all(0.0 <= row["data_wait"] <= 1.0 for row in ddp["history"])
    code, out = _torchrun(flags(root, tmp_path / "split", *common, "--stop-after", "1"), timeout=300)
    assert code == 0, out
    code, out = _torchrun(flags(root, tmp_path / "split", *common, "--resume"), timeout=300)
    assert code == 0, out
    assert_same_checkpoint(tmp_path / "ddp", tmp_path / "split", epoch=2)
