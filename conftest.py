"""pytest settings and helpers shared by the test files."""
import os

import pytest
import torch
from hypothesis import settings

# CI replays a fixed set of examples (no flaky reds on a shared machine); locally, every run
# explores new ones. Either way a failure prints the example that reproduces it.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Two cores: torch's default of one thread per core plus pytest's own work oversubscribes.
torch.set_num_threads(min(2, torch.get_num_threads()))


class CountHostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten._local_scalar_dense: every .item(), bool(t), int(t), float(t) of a tensor
    goes through it (on a GPU each one stalls the host until the queued kernels are done)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_host_syncs():
    """A new CountHostSyncs: `with count_host_syncs() as mode: ...; mode.count`."""
    return CountHostSyncs


@pytest.fixture
def assert_same_checkpoint():
    """check(dir_a, dir_b, epoch): the last checkpoints of two train.py runs have the same epoch,
    the same weights and a bit-identical sampler state; returns the first checkpoint."""
    import train

    def check(dir_a, dir_b, epoch: int) -> dict:
        a = train.load_checkpoint(str(dir_a), "cpu")
        b = train.load_checkpoint(str(dir_b), "cpu")
        assert a["epoch"] == b["epoch"] == epoch
        for key in a["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
        for key in ("scores", "seen", "probabilities", "draw"):
            assert torch.equal(a["sampler"][key], b["sampler"][key]), key
        return a
    return check
