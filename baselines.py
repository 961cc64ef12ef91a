"""The baselines SADP is compared with, behind SADP's own interface: each a sampler and a loss-and-score function,
used exactly as `sadp.SADPSampler` and `sadp.spike_aware_loss`, so train.py's `make_method` runs every method alike,

    sampler.set_epoch(epoch); list(sampler); sampler.weights(idx); sampler.update(idx, scores)
    loss, scores = loss_fn(outputs, targets, head_inputs, weights)

uniform: uniform_sampler; ann: SADP's sampler scored by baseline_loss's ANN bound; infobatch: InfoBatchSampler.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sadp import SADPSampler, all_gather_cat, per_example_loss, weighted_mean


def uniform_sampler(num_examples: int, ratio: float, **kw) -> SADPSampler:
    """A plain random subset of round((1 - r) N) examples per epoch, every weight 1: SADP's sampler with eps = 1
    (p uniform, so the scores do not matter) and without replacement."""
    return SADPSampler(num_examples, ratio, epsilon=1.0, replacement=False, **kw)


def baseline_loss(outputs: Tensor, targets: Tensor, head_inputs: Tensor | None = None, weights: Tensor | None = None,
                  *, kind: str, per_timestep: bool = False, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """The same loss as `sadp.spike_aware_loss` (head_inputs unused), scored spike-blind:
    kind="ann":  ||dl/dz||, the logit-gradient bound of Katharopoulos & Fleuret (ICML 2018) as written for ANNs,
                 sqrt(T sum_t ||g_t||^2): ||softmax(z) - q|| (rate readout), or the RMS over t of ||softmax(o_t) - q||.
    kind="loss": the unweighted loss l itself (the score InfoBatch prunes by).
    """
    if kind not in ("ann", "loss"):
        raise ValueError(f"kind must be 'ann' or 'loss'; got {kind!r}.")
    ell, g = per_example_loss(outputs, targets, per_timestep=per_timestep, label_smoothing=label_smoothing)
    loss = weighted_mean(ell, weights)
    with torch.no_grad():
        scores = (g.shape[0] * g.square().sum((0, 2))).sqrt() if kind == "ann" else ell.detach()
    return loss, scores.float()


class InfoBatchSampler:
    """InfoBatch (Qin et al., ICLR 2024), as its paper describes it: examples whose last loss is below the mean are
    "well learned"; each of them is pruned with probability r, and the kept ones have their loss scaled by 1/(1 - r).
    The last 12.5% of epochs train on all the data. Scores start equal, so the first epoch is full data as well."""

    def __init__(self, num_examples, ratio, epochs, *, seed=0, rank=0, world_size=1, delta=0.875):
        self.num_examples, self.ratio, self.seed = num_examples, ratio, seed
        self.rank, self.world_size = rank, world_size
        self.full_from = math.ceil(delta * epochs)
        self.scores = torch.ones(num_examples, dtype=torch.float64)
        self._weights = torch.ones(num_examples)

    def __iter__(self):
        return iter(self._order.tolist())

    def __len__(self) -> int:
        return len(self._order)

    def set_epoch(self, epoch):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_examples, generator=gen)
        self._weights = torch.ones(self.num_examples)
        if epoch < self.full_from:
            well_learned = self.scores < self.scores.mean()
            pruned = well_learned & (torch.rand(self.num_examples, generator=gen) < self.ratio)
            self._weights[well_learned & ~pruned] = 1.0 / (1.0 - self.ratio)
            order = order[~pruned[order]]
        # Every rank keeps every world_size-th entry of the same order, padded so that all ranks run as many steps.
        k = self.world_size
        order = torch.cat([order, order[: (-len(order)) % k]])
        self._order = order[self.rank::k]

    def weights(self, indices):
        return self._weights[torch.as_tensor(indices).cpu()]

    def update(self, indices, scores):
        indices, scores = torch.as_tensor(indices).cpu(), torch.as_tensor(scores).cpu().double()
        if self.world_size > 1 and torch.distributed.is_initialized():
            indices, scores = all_gather_cat(indices), all_gather_cat(scores)
        self.scores[indices] = scores

    def state_dict(self):
        return {"scores": self.scores.clone()}

    def load_state_dict(self, state):
        self.scores = state["scores"].clone()
