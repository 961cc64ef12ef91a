"""pytest settings shared by every test file."""
import os

import torch
from hypothesis import settings

# CI replays a fixed set of examples (no flaky reds on a shared machine); locally, every run
# explores new ones. Either way a failure prints the example that reproduces it.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Two cores: torch's default of one thread per core plus pytest's own work oversubscribes.
torch.set_num_threads(min(2, torch.get_num_threads()))
