"""SADP under torch.distributed: 2 processes on localhost with the gloo backend (CPU)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

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


def _main_worker(rank, world_size, port, argv, out_dir, full_disk):
    """train.main(argv) as rank `rank` of a torchrun-like group; its exit status and stderr go to
    out_dir/rank<rank>.json. full_disk: rank 0's disk fills after epoch 1's checkpoint."""
    import contextlib
    import errno
    import io
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd):
        calls.append(fd)
        if len(calls) > 2:                        # epoch 1: checkpoint + manifest; then full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    if full_disk and rank == 0:
        os.fsync = fsync_until_full
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(argv)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code, "err": err.getvalue()}, f)


def _spawn_main(tmp_path, argv, full_disk=False, world_size=2, timeout=240):
    """[(exit status, stderr)] of each rank of train.main(argv) under world_size processes; fails
    if a rank is still running after `timeout` s (e.g. waiting at a barrier for one that stopped)."""
    reports = tmp_path / f"reports-{free_port()}"
    reports.mkdir()
    context = mp.spawn(_main_worker, args=(world_size, free_port(), argv, str(reports), full_disk),
                       nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):    # True once all ended
            if time.monotonic() >= deadline:
                pytest.fail(f"a rank was still running after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = []
    for rank in range(world_size):
        with open(reports / f"rank{rank}.json") as f:
            report = json.load(f)
        results.append((report["code"], report["err"]))
    return results


SMALL = ["--data", "synthetic", "--model", "convnet", "--device", "cpu", "--no-compile", "--train-size", "400",
         "--test-size", "100", "--batch-size", "32", "--T", "2", "--quiet"]


def test_resuming_with_another_number_of_processes_gets_the_same_message_on_every_rank(tmp_path, capsys):
    """1 -> 2 processes: rank 1 called the checkpoint "not a checkpoint of this program", rank 0
    died with a gloo traceback; 2 -> 1 continued silently (issue 17, item 3)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train.main(SMALL + ["--out", one, "--epochs", "2", "--stop-after", "1"]) == 0
    for code, err in _spawn_main(tmp_path, SMALL + ["--out", one, "--epochs", "2", "--resume"]):
        assert code == 2 and "Traceback" not in err, err
        assert err.count("\n") == 1 and "trained by 1 process(es), this run has 2" in err, err
    assert [code for code, _ in _spawn_main(tmp_path, SMALL + ["--out", two, "--epochs", "2", "--stop-after", "1"])] \
        == [0, 0]
    capsys.readouterr()
    assert train.main(SMALL + ["--out", two, "--epochs", "2", "--resume"]) == 2
    assert "trained by 2 process(es), this run has 1" in capsys.readouterr().err


def test_a_full_disk_on_rank_0_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 could not write its checkpoint; the other rank waited at a barrier until the
    process group's timeout (issue 17, item 10)."""
    out = tmp_path / "run"
    results = _spawn_main(tmp_path, SMALL + ["--out", str(out), "--epochs", "3"], full_disk=True)
    for code, err in results:
        assert code == 2 and "No space left on device" in err and "after epoch 1" in err, err
    assert results[0][1] == results[1][1]
    assert train.read_manifest(str(out))["epoch"] == 1
