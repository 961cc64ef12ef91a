"""Spike-aware data pruning (SADP) for spiking neural networks, in one file.

Each epoch trains on a weighted sample of the data instead of all of it: example i is drawn
with probability p_i proportional to a cheap upper bound S_i on the norm of its gradient, and
its loss is multiplied by w_i = 1 / (N p_i). At pruning ratio r an epoch costs (1 - r) of a
full one.

Method: "Efficient Training of Spiking Neural Networks by Spike-aware Data Pruning", Ma, Chen,
Wu, Tan, Wu, arXiv 2510.04098 (2025). The paper released no code; the derivation below is
this project's own, written from the principles the paper states (p_i proportional to the
gradient norm, an efficient upper bound that accounts for all-or-nothing spikes).

Notation (time-first layout, as in SpikingJelly's multi-step mode): T timesteps, B examples in
a batch, C classes, N training examples. The classifier head is affine, o_t = W h_t + b, with
h_t in R^D its input at step t (binary spikes, or spatial means of spikes, or, in SEW ResNet,
of sums of spikes: non-negative in every case); q is the target distribution (one-hot, or
label-smoothed).
    rate readout (default):        l = CE(z, q),            z = (1/T) sum_t o_t
    per-timestep readout (TET):    l = (1/T) sum_t CE(o_t, q)

1. Unbiased by construction. At the start of an epoch freeze
       p_i = (1 - eps) S_i / sum_j S_j + eps / N                  (eps in (0, 1])
   draw m = round((1 - r) N) examples from p, and train on L = (1/B) sum_b w_b l_b. Then
       E[w_i grad l_i] = sum_i p_i grad l_i / (N p_i) = (1/N) sum_i grad l_i,
   the full-data gradient, whatever the scores are. eps keeps every p_i > 0 and every weight
   below 1/eps. Normalising the weights by their sum inside a batch breaks this.

2. The best p. The estimator's second moment, (1/N^2) sum_i ||grad l_i||^2 / p_i, is smallest
   under sum_i p_i = 1 (Cauchy-Schwarz) at p_i proportional to ||grad l_i||, where it equals
   (1/N^2) (sum_i ||grad l_i||)^2. True per-example norms cost a backward pass each; S bounds
   them with what the forward pass already has.

3. The spike-aware score. With g_t = dl/do_t (analytic: softmax minus q, divided by T) and
   h^_t = [h_t; 1], the gradient w.r.t. the head's weight and bias together is
   G = sum_t g_t h^_t^T, and by the triangle inequality and ||u v^T||_F = ||u|| ||v||,
       ||G||_F  <=  S = sum_t ||g_t|| * sqrt(||h_t||^2 + 1).
   For binary spikes ||h_t||^2 = n_t, the number of spikes entering the head at step t. S costs
   O(T B (C + D)) and no extra backward pass. Its guarantees, each a property test:
     P1  S >= ||grad_{W,b} l|| for every example, readout, label smoothing and spike pattern;
     P2  S = ||grad_{W,b} l|| when T = 1;
     P3  rate readout, non-negative h: S <= sqrt(T) ||grad_{W,b} l|| (the cross terms of
         non-negative vectors are non-negative), so the bound is never loose by more than sqrt(T);
     P4  the exact norm, ||G||_F^2 = sum_{t,t'} (g_t . g_t') (h^_t . h^_t') (`exact=True`,
         O(T^2 (C + D))), equals per-example autograd.

4. With or without replacement. m i.i.d. draws (replacement=True) are the derivation above
   as written, but at r = 0.3 they reach only 1 - e^(-0.7) = 50% of the examples. The default
   draws m distinct examples instead, example i with probability pi_i = m p_i (systematic
   sampling; where m p_i would exceed 1 the example is taken for sure and p is rescaled), and
   shuffles them. Every position of the epoch then holds example i with probability
   pi_i / m = p_i, so every minibatch is still unbiased, E[w g] = sum_i p_i g_i / (N p_i) =
   (1/N) sum_i g_i (the positions are dependent: no example appears twice), and the variance
   of the epoch's summed gradient falls by the finite-population correction and more
   (bench.py's variance section measures it).

Integration (the dataset also returns each example's index; `WithIndex` wraps any dataset):

    sampler = SADPSampler(len(dataset), ratio=0.3)          # DataLoader(..., sampler=sampler)
    tap = HeadTap(model.fc, T=4)                            # what enters and leaves the head
    for epoch in range(epochs):
        sampler.set_epoch(epoch)                            # freezes p, draws the epoch
        seen, scores = [], []
        for x, y, idx in loader:
            model(x)
            outputs, head_inputs = tap.pop()                # [T, B, C], [T, B, D]
            loss, s = spike_aware_loss(outputs, y, head_inputs, sampler.weights(idx))
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            seen.append(idx); scores.append(s)
        sampler.update(torch.cat(seen), torch.cat(scores))  # once per epoch: one host sync

Step size. The weights keep each minibatch an unbiased estimate of the full-data *mean*
gradient, and an epoch has (1 - r) of the steps, so with a fixed number of epochs multiply the
learning rate by 1 / (1 - r) (InfoBatch's 1 / (1 - r) rescaling does the same). On MNIST-1D
(README, Results) that was worth about 14 points of test accuracy at r = 0.7, for SADP and for
a random subset alike; at the same step size SADP did not beat the random subset there.

`NetworkTap` extends the bound from the head to every conv and linear layer (its docstring has
the derivation): attach it to the model and take `tap.pop(w)` after `loss.backward()` as the
scores instead of the head's.

Only torch and the Python standard library are used, so this file can be copied as it is.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "per_example_loss",
    "weighted_mean",
    "head_gradient_bound",
    "head_gradient_norm",
    "spike_aware_loss",
    "SADPSampler",
    "HeadTap",
    "NetworkTap",
    "WithIndex",
    "all_gather_cat",
]


# ---------------------------------------------------------------------------------------------
# The loss and the spike-aware score
# ---------------------------------------------------------------------------------------------

def per_example_loss(outputs: Tensor, targets: Tensor, *, per_timestep: bool = False,
                     label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-example loss l [B] (differentiable) and g_t = dl/do_t [T, B, C] (detached).

    outputs: [T, B, C] per-timestep logits; targets: [B] class indices. At least float32, also
    when the logits come from bf16/fp16 autocast (float64 inputs stay float64).
    """
    _check_outputs_and_targets(outputs, targets, label_smoothing)
    o = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    T, B, C = o.shape
    # q = (1 - alpha) onehot + alpha / C: the same smoothing as torch's cross_entropy.
    q = torch.full((B, C), label_smoothing / C, device=o.device, dtype=o.dtype)
    q.scatter_(1, targets.long().unsqueeze(1), 1.0 - label_smoothing + label_smoothing / C)
    if per_timestep:
        log_p = F.log_softmax(o, dim=-1)                     # [T, B, C]
        ell = -(q * log_p).sum(-1).mean(0)                   # l = (1/T) sum_t CE(o_t, q)
        g = (log_p.detach().exp() - q) / T                   # g_t = (softmax(o_t) - q) / T
    else:
        log_p = F.log_softmax(o.mean(0), dim=-1)             # [B, C], z = (1/T) sum_t o_t
        ell = -(q * log_p).sum(-1)                           # l = CE(z, q)
        g = ((log_p.detach().exp() - q) / T).expand(T, B, C)  # g_t = (softmax(z) - q) / T
    return ell, g


def weighted_mean(ell: Tensor, weights: Tensor | None) -> Tensor:
    """L = (1/B) sum_b w_b l_b. Dividing by sum(w) instead would bias the gradient: never do it."""
    if weights is None:
        return ell.mean()
    _check_weights(weights, ell.shape[0])
    return (weights.to(ell) * ell).mean()


def head_gradient_bound(g: Tensor, head_inputs: Tensor) -> Tensor:
    """S = sum_t ||g_t|| * sqrt(||h_t||^2 + 1)  >=  ||dl/d(W, b)||_F, per example.

    g: [T, B, C] logit gradients; head_inputs: [T, B, ...] (trailing dims are flattened).
    For binary spikes ||h_t||^2 is the spike count n_t, which is why the score is cheap and
    spike-aware: an example whose head sees many spikes has a larger weight gradient.
    """
    h = head_inputs.detach().flatten(2).to(g.dtype)
    h_sq = h.square().sum(-1)                                # ||h_t||^2 = n_t for 0/1 spikes
    return (g.norm(dim=-1) * (h_sq + 1.0).sqrt()).sum(0)     # [B]


def head_gradient_norm(g: Tensor, head_inputs: Tensor) -> Tensor:
    """The exact ||dl/d(W, b)||_F per example, from the Gram identity (no backward pass).

        ||G||_F^2 = || sum_t g_t h^_t^T ||_F^2 = sum_{t,t'} (g_t . g_t') (h^_t . h^_t')

    Cost O(T^2 (C + D)) per example: T times the bound's, and still no backward pass. Use it
    to check the bound, or as the score when T is large enough for the bound's sqrt(T) slack
    to matter.
    """
    h = head_inputs.detach().flatten(2).to(g.dtype)
    gram_g = torch.einsum("tbc,sbc->bts", g, g)              # (g_t . g_t')
    gram_h = torch.einsum("tbd,sbd->bts", h, h) + 1.0        # (h^_t . h^_t'), the 1 is the bias
    return (gram_g * gram_h).sum((1, 2)).clamp_min(0.0).sqrt()


def spike_aware_loss(outputs: Tensor, targets: Tensor, head_inputs: Tensor,
                     weights: Tensor | None = None, *, per_timestep: bool = False,
                     label_smoothing: float = 0.0, exact: bool = False) -> tuple[Tensor, Tensor]:
    """The re-weighted minibatch loss and each example's spike-aware importance score.

    Args:
        outputs: [T, B, C] per-timestep logits of the classifier head.
        targets: [B] class indices.
        head_inputs: [T, B, ...] what entered the head at each step (spikes or pooled spikes).
        weights: [B] importance weights w = 1 / (N p) from `SADPSampler.weights`; None = all 1.
        per_timestep: TET-style loss (mean over t of CE(o_t, q)) instead of the rate readout.
        label_smoothing: alpha in q = (1 - alpha) onehot + alpha / C.
        exact: return the exact head-gradient norm (`head_gradient_norm`) instead of the bound.

    Returns:
        loss: differentiable scalar L = (1/B) sum_b w_b l_b.
        scores: [B] float32, detached: the bound S_b on ||dl_b/d(W, b)|| of the *unweighted*
            loss l_b (the sampler's p must not depend on the weights it produced).
    """
    ell, g = per_example_loss(outputs, targets, per_timestep=per_timestep,
                              label_smoothing=label_smoothing)
    _check_head_inputs(head_inputs, outputs)
    loss = weighted_mean(ell, weights)
    with torch.no_grad():
        scores = head_gradient_norm(g, head_inputs) if exact else head_gradient_bound(g, head_inputs)
    return loss, scores.float()


# ---------------------------------------------------------------------------------------------
# The sampler: p frozen per epoch, m draws, weights 1 / (N p)
# ---------------------------------------------------------------------------------------------

class SADPSampler(torch.utils.data.Sampler[int]):
    """Draws each epoch's examples from p and re-weights them by w_i = 1 / (N p_i).

        sampler.set_epoch(epoch)       # before iterating: freezes p from the scores, draws
        for i in sampler: ...          # this epoch's (this rank's) indices, len(sampler) of them
        sampler.weights(idx)           # w for a batch's indices
        sampler.update(idx, scores)    # new scores, used from the next set_epoch on

    Args:
        num_examples: N, the size of the training set.
        ratio: r in [0, 1), the fraction of example-passes saved per epoch. 0 is plain
            full-data training: a random permutation, all weights 1.
        seed: with the epoch, seeds the draw; same seed, same draws.
        epsilon: the uniform share eps of p, in (0, 1]; every weight is at most 1/eps.
        initial_score: the score of an example not trained on yet: "mean" of those seen
            (neutral), "max" (unseen examples are drawn early), or a positive number.
        replacement: False (default): m distinct examples, inclusion probabilities m p.
            True: m i.i.d. draws from p.
        smoothing: beta in [0, 1): an example's score becomes beta * old + (1 - beta) * new
            when it is scored again (an exponential moving average; 0 keeps the newest score).
            It smooths the noise of single-batch scores; it does not make them fresher.
        rank, world_size: this process's place in a distributed run (default: from
            torch.distributed when initialised, else one process). Every rank draws the same
            sample and keeps every world_size-th index; the draw is padded with extra i.i.d.
            draws from p to a multiple of world_size, so every position stays unbiased.
            `update` is then a collective that gathers every rank's scores.
    """

    def __init__(self, num_examples: int, ratio: float, *, seed: int = 0,
                 epsilon: float = 0.1, initial_score: float | str = "mean",
                 replacement: bool = False, smoothing: float = 0.0,
                 rank: int | None = None, world_size: int | None = None):
        _check_sampler_settings(num_examples, ratio, epsilon, initial_score, smoothing)
        self.num_examples = int(num_examples)
        self.ratio = float(ratio)
        self.num_draws = round((1.0 - self.ratio) * num_examples)   # m
        self.seed = int(seed)
        self.epsilon = float(epsilon)
        self.initial_score = initial_score
        self.replacement = bool(replacement)
        self.smoothing = float(smoothing)
        self.rank, self.world_size = _dist_place(rank, world_size)
        self.scores = torch.zeros(num_examples, dtype=torch.float64)  # S (valid where seen)
        self.seen = torch.zeros(num_examples, dtype=torch.bool)
        self.epoch = None                 # the epoch whose draw is frozen below
        self.epoch_ratio = self.ratio     # this epoch's pruning ratio (see set_epoch)
        self.probabilities = None         # p, float64 [N], sums to 1
        self._draw = None                 # this epoch's indices, all ranks [m_padded]

    def _filled_scores(self) -> Tensor:
        """S with unseen examples given the initial score."""
        S = self.scores.clone()
        if self.seen.all():
            return S
        if not self.seen.any():
            return torch.ones_like(S)     # nothing seen yet: uniform
        if self.initial_score == "mean":
            fill = S[self.seen].mean()
        elif self.initial_score == "max":
            fill = S[self.seen].max()
        else:
            fill = torch.tensor(float(self.initial_score), dtype=S.dtype)
        S[~self.seen] = fill
        return S

    def set_epoch(self, epoch: int, ratio: float | None = None) -> None:
        """Freeze this epoch's p from the score table and draw its indices.

        ratio: this epoch's pruning ratio, for a schedule that varies it over the run
        (default: the sampler's). 0 is a plain full-data epoch (a permutation, weights 1).
        """
        N = self.num_examples
        ratio = self.ratio if ratio is None else float(ratio)
        m = round((1.0 - ratio) * N)
        if not 0.0 <= ratio < 1.0 or m < 1:
            raise ValueError(f"set_epoch: ratio must lie in [0, 1) and leave at least one example "
                             f"of {N}; got {ratio!r}.")
        gen = torch.Generator().manual_seed(_seed_for(self.seed, epoch))
        m_padded = -(-m // self.world_size) * self.world_size
        if ratio == 0.0:
            p = torch.full((N,), 1.0 / N, dtype=torch.float64)
            draw = torch.randperm(N, generator=gen)
            draw = torch.cat([draw, draw[: m_padded - N]])  # wrap around to a multiple of world_size
        else:
            S = self._filled_scores()
            top = S.max()                 # divide by the largest first: no overflow in the sum
            share = S / top / (S / top).sum() if top > 0 else torch.full_like(S, 1.0 / N)
            p = (1.0 - self.epsilon) * share + self.epsilon / N
            p = p / p.sum()               # exact normalisation in float64
            if self.replacement:
                draw = _draw_iid(p, m, gen)
            else:
                p = _capped(p, m)
                draw = _draw_systematic(p * m, gen)
            # Padding for world_size: extra i.i.d. draws from p, drawn after the m draws so that
            # the union of the ranks' shares starts with exactly the single-process draw.
            draw = torch.cat([draw, _draw_iid(p, m_padded - m, gen)])
        self.epoch = int(epoch)
        self.epoch_ratio = ratio
        self.probabilities = p
        self._draw = draw

    def __iter__(self) -> Iterator[int]:
        _check_epoch_set(self)
        return iter(self._draw[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        m = self.num_draws if self._draw is None else round((1.0 - self.epoch_ratio) * self.num_examples)
        return -(-m // self.world_size)    # this rank's share

    def weights(self, indices: Tensor | Sequence[int]) -> Tensor:
        """w_i = 1 / (N p_i) under this epoch's frozen p (float32, on the indices' device)."""
        _check_epoch_set(self)
        idx = torch.as_tensor(indices)
        _check_indices(idx, self.num_examples, "weights")
        w = 1.0 / (self.num_examples * self.probabilities[idx.cpu().long()])
        if self.epoch_ratio == 0.0:
            w = torch.ones_like(w)        # exactly 1, not 1 +- rounding
        return w.float().to(idx.device)

    def update(self, indices: Tensor | Sequence[int], scores: Tensor | Sequence[float]) -> None:
        """Record new scores for the examples trained on (used from the next `set_epoch`).

        Buffer a whole epoch and call it once: one host-device sync instead of one per step.
        Under torch.distributed this is a collective: every rank must call it, and every rank
        then records every rank's scores.
        """
        idx = torch.as_tensor(indices).detach().reshape(-1).cpu()
        if idx.numel():
            _check_indices(idx, self.num_examples, "update")
        idx = idx.long()
        s = torch.as_tensor(scores, dtype=torch.float64).detach().reshape(-1).cpu()
        if idx.shape != s.shape:
            raise ValueError(f"update needs one score per index; got {idx.numel()} indices and {s.numel()} scores.")
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            idx, s = all_gather_cat(idx), all_gather_cat(s)
        if idx.numel() == 0:
            return
        _check_update(idx, s, self.num_examples)
        if self.smoothing > 0.0:
            old = torch.where(self.seen[idx], self.scores[idx], s)
            s = self.smoothing * old + (1.0 - self.smoothing) * s
        self.scores[idx] = s
        self.seen[idx] = True

    def variance_gain(self) -> float:
        """The estimated factor by which this epoch's p lowers the gradient's second moment
        against uniform sampling, reading the scores S as gradient norms:

            gain = E_uniform ||g||^2 / E_p ||w g||^2 = (1/N) sum_i S_i^2 / ((1/N^2) sum_i S_i^2 / p_i)

        1 for uniform p, N sum S^2 / (sum S)^2 >= 1 for p proportional to S. Johnson & Guestrin
        (NeurIPS 2018) raise the learning rate by such a gain: an estimate with less variance
        acts like a larger batch. For draws without replacement it is a lower bound.
        """
        _check_epoch_set(self)
        S = self._filled_scores()
        if not bool(S.any()):
            return 1.0
        S2 = (S / S.max()).square()           # scaled: the ratio is scale-free, no overflow
        return float(self.num_examples * S2.sum() / (S2 / self.probabilities).sum())

    # -- exact resume: the score table and the frozen epoch ------------------------------------

    _SETTINGS = ("num_examples", "ratio", "seed", "epsilon", "replacement", "smoothing")

    def state_dict(self) -> dict:
        clone = lambda t: None if t is None else t.clone()
        return {**{k: getattr(self, k) for k in self._SETTINGS},
                "scores": self.scores.clone(), "seen": self.seen.clone(), "epoch": self.epoch,
                "epoch_ratio": self.epoch_ratio,
                "probabilities": clone(self.probabilities), "draw": clone(self._draw)}

    def load_state_dict(self, state: dict) -> None:
        _check_sampler_state(self, state)
        _check_same_sampler(self, state)
        clone = lambda t: None if t is None else t.clone()
        self.scores, self.seen = state["scores"].clone().double(), state["seen"].clone().bool()
        self.epoch, self.epoch_ratio = state["epoch"], state["epoch_ratio"]
        self.probabilities, self._draw = clone(state["probabilities"]), clone(state["draw"])


def _draw_iid(p: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k i.i.d. draws from p by inverting its CDF (exact for any N; torch.multinomial caps N at 2^24)."""
    cdf = p.cumsum(0)
    u = torch.rand(k, generator=gen, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_max(len(p) - 1)


def _capped(p: Tensor, m: int) -> Tensor:
    """The p closest to the given one whose inclusion probabilities pi = m p are all <= 1.

    Without replacement an example cannot be drawn more than once per epoch, so pi_i = m p_i
    must not exceed 1. Examples above 1 are included for sure (pi = 1) and the others are
    rescaled to keep sum(pi) = m; repeat until none is above 1 (a handful of rounds).
    """
    pi = p * m
    while bool((pi > 1.0).any()):
        sure = pi >= 1.0
        pi[sure] = 1.0
        pi[~sure] *= (m - int(sure.sum())) / pi[~sure].sum()
    return pi / m


def _draw_systematic(pi: Tensor, gen: torch.Generator) -> Tensor:
    """Exactly m = sum(pi) distinct indices, example i included with probability pi_i <= 1.

    Systematic sampling on a random order: lay the pi_i end to end (total length m) in a random
    permutation and take the examples under the points u, u + 1, ..., u + m - 1 for one
    u ~ U[0, 1). An interval of length pi_i <= 1 holds at most one point, and holds one with
    probability pi_i.

    The selected set then gets an order of its own, an independent random permutation. Left in
    the systematic order, an example's place would depend on its pi (a sure example is spread
    evenly over the epoch, a rare one is not), so a given position of the epoch would not be
    drawn from p. Shuffled, every position j holds example i with probability pi_i / m = p_i:
    each minibatch, not only the epoch, is an unbiased draw.
    """
    order = torch.randperm(len(pi), generator=gen)
    ends = pi[order].cumsum(0)
    m = round(float(ends[-1]))
    ends = ends * (m / ends[-1])
    points = torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(m, dtype=torch.float64)
    chosen = order[torch.searchsorted(ends, points, right=True).clamp_max(len(pi) - 1)]
    return chosen[torch.randperm(m, generator=gen)]


def _seed_for(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch): distinct pairs give unrelated streams."""
    digest = hashlib.sha256(f"sadp:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------
# Adapters: reading outputs and head inputs off any model (the whole-network bound from its
# conv and linear layers), indices from any dataset
# ---------------------------------------------------------------------------------------------

class HeadTap:
    """Records what enters and leaves a model's classifier (an nn.Linear), with a forward hook.

        tap = HeadTap(model.fc, T=4)
        logits = model(x)                    # the model is not changed
        outputs, head_inputs = tap.pop()     # [T, B, C], [T, B, D]

    The head may be called once on [T, B, D] (multi-step models), once on the merged
    [T*B, D] (time-major, as SpikingJelly's SeqToANNContainer does; T is then needed), or T
    times on [B, D] (step-by-step loops, as in snnTorch tutorials; T is then needed). `outputs`
    keep their autograd graph, so the loss computed from them trains the model.

    One pop per forward, evaluation passes included (or `remove()` the tap first). The tap
    holds at most what one forward produces (T calls, or one when T is omitted), so forwards
    that are never popped cost no memory; but the next pop then counts more calls than one
    forward makes and raises, rather than returning a mix of forwards. With T omitted, one call
    is one forward: several calls are never stacked into a larger T.
    """

    def __init__(self, head: nn.Module, T: int | None = None):
        _check_tap_T(T)
        self.T = T
        self._calls: list[tuple[Tensor, Tensor]] = []
        self._count = 0                                      # head calls since the last pop
        self._handle = head.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self._count += 1
        keep = 1 if args[0].dim() >= 3 else (self.T or 1)    # [T, B, ...] is a whole forward
        self._calls = (self._calls + [(args[0], output)])[-keep:]   # bounded: one forward

    def pop(self) -> tuple[Tensor, Tensor]:
        """(outputs [T, B, C], head_inputs [T, B, D]) of the forward since the last pop."""
        calls, count, self._calls, self._count = self._calls, self._count, [], 0
        _check_tap_calls(calls, count, self.T)
        x, y = calls[0]
        if count > 1:                                        # T calls, one per timestep
            return torch.stack([c[1] for c in calls]), torch.stack([c[0] for c in calls])
        if x.dim() == 2 and self.T is not None and self.T > 1:   # merged [T*B, D]
            if x.shape[0] % self.T:
                raise RuntimeError(f"HeadTap: head input {list(x.shape)} is not [T*B, D] with T={self.T}.")
            return y.reshape(self.T, -1, y.shape[-1]), x.reshape(self.T, -1, x.shape[-1])
        if x.dim() == 2:                                     # a single step, T = 1
            return y.unsqueeze(0), x.unsqueeze(0)
        return y, x                                          # already [T, B, ...]

    def remove(self) -> None:
        """Detach the hook from the head."""
        self._handle.remove()
        self._calls, self._count = [], 0

    def __enter__(self) -> "HeadTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class NetworkTap:
    """Bounds each example's gradient norm over *every* conv and linear weight, from hooks.

        tap = NetworkTap(model, T=4)             # hooks on every Conv1d/2d/3d and Linear
        loss, _ = spike_aware_loss(outputs, y, head_inputs, w)
        loss.backward()
        scores = tap.pop(w)                      # [B] S_net, read off the backward just run

    The bound. Layer l applies W_l at step t to its input a_{l,t} (spikes of the layer below,
    or the encoded input for the stem), u_{l,t} = W_l * a_{l,t}; let delta_{l,t} = dl/du_{l,t}.

        ||dl/d(W_l, b_l)||_F <= S_l = sum_t ||delta_{l,t}||_F * sqrt(c_l n_{l,t} + P_l [bias])
        ||dl/d(all W, b)||   <= S_net = sqrt(sum_l S_l^2)

    with n = ||a||^2 (the spike count, for spikes), P_l the output positions, c_l = ceil(k/s)^d
    for a d-dim convolution (kernel k, stride s; 1 for linear). Proof: the gradient is
    sum_t sum_p delta_{t,p} [patch_p(a_t); 1]^T. Triangle inequality over t; Cauchy-Schwarz
    over positions p gives ||delta_t|| * sqrt(sum_p ||patch_p||^2 + P); and each input element
    lies in at most c_l patches, so sum_p ||patch_p||^2 <= c_l n_t. The layers' parameter
    blocks are disjoint, so their squared norms add. For the head, S_l is the head bound.

    The hooks. A forward hook records ||a|| per input row; a hook on the layer's output records
    ||delta|| per row when the backward pass reaches it: no extra pass, one norm per example
    per step. A layer may be called once on [B, ...] (the stem of direct encoding: applied once
    and repeated over T, so its delta already sums the T steps and it has one term), on the
    merged time-major [T*B, ...] (MultiStep), on [T, B, D] (a Linear head), or several times
    (a step-by-step loop: the calls add, as the steps do). Forwards without grad are ignored.
    Rows are read as time-major (t * B + b); a Linear on token inputs [B, P, D] is not supported.

    The contract: the backward pass computes delta of the minibatch loss L = (1/B) sum_b w_b l_b,
    which is (w_b / B) delta_b; `pop(w)` divides that out, so S scores the unweighted l_b.
    Pass the very weights the loss used (w^beta if they were powered). With a GradScaler,
    divide the scores by the scale. Caveats: BatchNorm parameters are not covered (their
    gradient is left out of S_net); BatchNorm in training mode couples the examples of a batch,
    so delta_b is then not exactly example b's own gradient and the bound is exact only with
    BN in eval mode (or without BN). Hooks are on conv/linear modules only, so a compiled LIF
    is untouched; compiling the whole model with the tap attached is not supported.

    Measured on MNIST-1D's conv1d (T=4, `python bench.py --only netbound`): a training step
    costs 1.06-1.08x the head-scored one (CPU, 1 thread). Against the true norm over all conv
    and linear weights, with BN in eval mode S_net ranks examples better than the head bound
    (Spearman 0.97-0.99 vs 0.86-0.96 after 1, 5 and 20 epochs); the scores a training step
    records (BN in training mode) rank worse for both, S_net 0.80-0.86 and the head 0.72-0.89.
    """

    LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

    def __init__(self, model: nn.Module, T: int):
        if int(T) < 1:
            raise ValueError(f"NetworkTap: T must be >= 1; got {T}.")
        self.T = int(T)
        self._calls: list[dict] = []
        self._handles = [m.register_forward_hook(self._forward_hook(name))
                         for name, m in model.named_modules() if isinstance(m, self.LAYERS)]
        if not self._handles:
            raise ValueError("NetworkTap: the model has no Conv1d/2d/3d or Linear layer to tap.")

    def _forward_hook(self, name: str):
        def record(module, args, output) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return                                       # evaluation: no backward will come
            linear = isinstance(module, nn.Linear)
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]) if linear else x.flatten(1)   # [rows, features]
            call = {"name": name, "a": _row_norms(x),                       # ||a|| = sqrt(n) per row
                    "c": 1 if linear else _patches_per_input(module),
                    "P": 1 if linear else math.prod(output.shape[2:]),
                    "bias": module.bias is not None, "d": None}
            self._calls.append(call)

            def record_delta(grad: Tensor) -> None:          # grad = dL/du, the layer's output
                g = grad.detach()
                call["d"] = _row_norms(g.reshape(-1, g.shape[-1]) if linear else g.flatten(1))
            output.register_hook(record_delta)
        return record

    def pop(self, weights: Tensor, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """S_net [B] (at least float32) for the forward and backward since the last pop, or with
        per_layer=True a dict {layer name: S_l [B]}. weights: [B], the loss's w_b (ones if none)."""
        calls, self._calls = self._calls, []
        if not calls:
            raise RuntimeError("NetworkTap.pop: no layer ran with grad since the last pop; run the "
                               "model (in grad mode) and loss.backward() first.")
        if any(c["d"] is None for c in calls):
            raise RuntimeError("NetworkTap.pop: the backward pass has not reached every tapped layer; "
                               "call loss.backward() before pop (and pop once per step).")
        w = torch.as_tensor(weights).detach().reshape(-1).to(calls[0]["a"].dtype)
        B = w.numel()
        if not bool((w > 0).all()):
            raise ValueError("NetworkTap.pop: every weight must be > 0; the unweighted gradient of a "
                             "zero-weight example cannot be recovered from the backward pass.")
        bounds: dict[str, Tensor] = {}
        for c in calls:
            rows = c["a"].numel()
            if rows not in (B, self.T * B):
                raise RuntimeError(f"NetworkTap: layer {c['name']!r} saw {rows} rows, which is neither "
                                   f"B = {B} nor T*B = {self.T * B}; pass the loss's weights for this "
                                   f"batch, and the model's T.")
            term = c["d"] * (c["c"] * c["a"].square() + (c["P"] if c["bias"] else 0)).sqrt()
            S = term.reshape(-1, B).sum(0)                   # time-major rows: sum over t
            bounds[c["name"]] = bounds.get(c["name"], 0) + S.to(w.device) * (B / w)   # undo w_b / B
        if per_layer:
            return bounds
        return torch.stack(list(bounds.values())).square().sum(0).sqrt()

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles, self._calls = [], []


class WithIndex(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that each item also returns its index: (*item, index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


# ---------------------------------------------------------------------------------------------
# Plumbing: input checks with errors that say what to do, torch.distributed, resume checks,
# NetworkTap's norms
# ---------------------------------------------------------------------------------------------

def _shape(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"


def _check_outputs_and_targets(outputs: Tensor, targets: Tensor, label_smoothing: float) -> None:
    if not isinstance(outputs, Tensor) or outputs.dim() != 3:
        raise ValueError(
            f"outputs must be the head's per-timestep logits shaped [T, B, C]; got "
            f"{_shape(outputs)}. If your model returns [B, C], add a time axis with "
            f"outputs.unsqueeze(0) (T = 1); if it returns [T*B, C], reshape to [T, B, C].")
    if not outputs.is_floating_point():
        raise ValueError(f"outputs must be floating point logits; got dtype {outputs.dtype}.")
    T, B, C = outputs.shape
    if T < 1 or B < 1 or C < 2:
        raise ValueError(f"outputs shaped [T, B, C] = {list(outputs.shape)} needs T >= 1, B >= 1, C >= 2.")
    if not isinstance(targets, Tensor) or targets.shape != (B,):
        raise ValueError(
            f"targets must be class indices shaped [B] = [{B}] to match outputs "
            f"{list(outputs.shape)}; got {_shape(targets)}.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be integer class indices (torch.long); got dtype {targets.dtype}. "
            f"Convert with targets.long() if they are whole numbers.")
    # One host-device sync on GPU; the alternative is a device-side assert that kills the
    # CUDA context, or a silently wrong loss.
    if bool(((targets < 0) | (targets >= C)).any()):
        lo, hi = int(targets.min()), int(targets.max())
        raise ValueError(f"targets must lie in [0, C) = [0, {C}); got values in [{lo}, {hi}].")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")


def _check_head_inputs(head_inputs: Tensor, outputs: Tensor) -> None:
    T, B = outputs.shape[:2]
    if not isinstance(head_inputs, Tensor) or head_inputs.dim() < 3 \
            or tuple(head_inputs.shape[:2]) != (T, B):
        raise ValueError(
            f"head_inputs must be what entered the classifier, shaped [T, B, ...] = "
            f"[{T}, {B}, ...] to match outputs {list(outputs.shape)}; got {_shape(head_inputs)}. "
            f"A merged [T*B, D] tensor must be reshaped to [T, B, D] (HeadTap does this).")


def _check_weights(weights: Tensor, B: int) -> None:
    if not isinstance(weights, Tensor) or weights.shape != (B,):
        raise ValueError(f"weights must be one importance weight per example, shaped [B] = [{B}]; "
                         f"got {_shape(weights)}.")
    bad = ~torch.isfinite(weights) | (weights < 0)           # one host-device sync on GPU
    if bool(bad.any()):
        raise ValueError(f"weights must be finite and non-negative (w = 1 / (N p)); got "
                         f"{int(bad.sum())} that are not (first: {weights[bad][0].item()}).")


def _check_indices(idx: Tensor, num_examples: int, where: str) -> None:
    """Integer indices in [0, N): a float would be truncated and -1 would wrap to the last example."""
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"{where} needs integer example indices; got dtype {idx.dtype} "
                         f"(e.g. {idx.reshape(-1)[0].item()!r}). Pass the dataset's indices unchanged.")
    if idx.numel() and bool(((idx < 0) | (idx >= num_examples)).any()):
        raise ValueError(f"{where} got indices outside [0, {num_examples}): "
                         f"[{int(idx.min())}, {int(idx.max())}].")


def _check_tap_T(T) -> None:
    if T is not None and (not isinstance(T, numbers.Integral) or isinstance(T, bool) or T < 1):
        raise ValueError(f"HeadTap: T must be a positive int (the timesteps) or None; got {T!r}.")


def _check_tap_calls(calls: list, count: int, T: int | None) -> None:
    """One forward's calls: once on [T, B, ...] or [T*B, D], or T times on [B, D]."""
    if count == 0:
        raise RuntimeError("HeadTap.pop: the head was not called since the last pop; run the model first.")
    whole = any(c[0].dim() >= 3 for c in calls)
    if count == 1 or (count == T and not whole):
        return
    steps = "once (on [T, B, D] or [T*B, D])" if T is None else \
        f"once (on [T, B, D] or [T*B, D]) or T={T} times (on [B, D])"
    hint = "" if T is not None else (" With T omitted one call is one forward: pass T to HeadTap "
                                     "for a model that calls its head once per timestep.")
    raise RuntimeError(f"HeadTap.pop: the head was called {count} times since the last pop, but one "
                       f"forward calls it {steps}. pop() after every forward, evaluation passes "
                       f"included (or remove() the tap).{hint}")


def _check_sampler_settings(num_examples, ratio, epsilon, initial_score, smoothing) -> None:
    if not isinstance(num_examples, numbers.Integral) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int (the training-set size); got {num_examples!r}.")
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"ratio must lie in [0, 1): the fraction of example-passes saved "
            f"(0 = full data, 0.3 = train on 70% per epoch); got {ratio!r}.")
    if round((1.0 - ratio) * num_examples) < 1:
        raise ValueError(f"ratio {ratio} leaves no example of {num_examples} to train on per epoch; "
                         f"lower the ratio.")
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in (0, 1] (the uniform share of p); got {epsilon!r}.")
    numeric = not isinstance(initial_score, str) and math.isfinite(initial_score) and initial_score > 0
    if initial_score not in ("mean", "max") and not numeric:
        raise ValueError(f"initial_score must be 'mean', 'max' or a positive number; got {initial_score!r}.")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must lie in [0, 1) (the weight of the old score); got {smoothing!r}.")


def _check_epoch_set(sampler: SADPSampler) -> None:
    if sampler.epoch is None:
        raise RuntimeError("SADPSampler: no epoch is drawn yet; call set_epoch(epoch) first "
                           "(once per epoch, before iterating or asking for weights).")


def _check_sampler_state(sampler: SADPSampler, state: dict) -> None:
    """A state_dict's keys, lengths, dtypes and values, before anything of it is used."""
    N = sampler.num_examples
    keys = set(sampler._SETTINGS) | {"scores", "seen", "epoch", "epoch_ratio", "probabilities", "draw"}
    if not isinstance(state, dict) or keys - set(state):
        missing = sorted(keys - set(state)) if isinstance(state, dict) else "all (not a dict)"
        raise ValueError(f"sampler state lacks {missing}; it is not a SADPSampler.state_dict().")
    for key, dtypes in (("scores", (torch.float32, torch.float64)), ("seen", (torch.bool,)),
                        ("probabilities", (torch.float64,)), ("draw", (torch.int64,))):
        t = state[key]
        if t is None and key in ("probabilities", "draw"):
            continue
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in dtypes:
            raise ValueError(f"sampler state {key!r} must be a 1-D tensor of {dtypes[0]}; got "
                             f"{_shape(t)}{'' if not isinstance(t, Tensor) else ' ' + str(t.dtype)}.")
        if key != "draw" and t.numel() != N:
            raise ValueError(f"sampler state {key!r} has length {t.numel()}, not num_examples = {N}.")
    if not bool(torch.isfinite(state["scores"]).all()) or bool((state["scores"] < 0).any()):
        raise ValueError("sampler state 'scores' holds NaN, inf or negative values; it is corrupt.")
    p = state["probabilities"]
    if p is not None and not (bool(torch.isfinite(p).all()) and bool((p > 0).all())):
        raise ValueError("sampler state 'probabilities' holds NaN, inf or non-positive values; it is corrupt.")
    if state["draw"] is not None and state["draw"].numel() and \
            bool(((state["draw"] < 0) | (state["draw"] >= N)).any()):
        raise ValueError(f"sampler state 'draw' holds indices outside [0, {N}); it is corrupt.")


def _check_update(idx: Tensor, s: Tensor, num_examples: int) -> None:
    if ((idx < 0) | (idx >= num_examples)).any():
        raise ValueError(f"update got indices outside [0, {num_examples}): "
                         f"[{int(idx.min())}, {int(idx.max())}].")
    bad = ~torch.isfinite(s) | (s < 0)
    if bad.any():
        raise ValueError(
            f"update got {int(bad.sum())} non-finite or negative scores (first: {s[bad][0].item()} "
            f"for example {int(idx[bad][0])}); the score table is unchanged. A NaN score means "
            f"the forward pass diverged: lower the learning rate or check the inputs.")


def _check_same_sampler(sampler: SADPSampler, state: dict) -> None:
    for key in sampler._SETTINGS:
        if state[key] != getattr(sampler, key):
            raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                             f"{getattr(sampler, key)!r}; resume with the same settings.")
    m = round((1.0 - state["epoch_ratio"]) * sampler.num_examples)
    padded = -(-m // sampler.world_size) * sampler.world_size
    if state["draw"] is not None and state["draw"].numel() != padded:
        raise ValueError("sampler state was saved with another world size; resume with the same one.")


def _dist_place(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}.")
    return rank, world_size


def all_gather_cat(x: Tensor) -> Tensor:
    """Every rank's 1-D tensor (any length, any dtype) concatenated in rank order, on every rank.

    A collective: every rank must call it. Runs on the GPU under NCCL, else on the CPU;
    returns a CPU tensor.
    """
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    x = x.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.numel()], device=device))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=x.dtype, device=device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).cpu()


def _row_norms(x: Tensor) -> Tensor:
    """||x_r|| per row of [rows, features], accumulated in at least float32 (bf16 autocast)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.promote_types(x.dtype, torch.float32))


def _patches_per_input(conv: nn.Module) -> int:
    """c = the most output positions one input element feeds: ceil(k / s) per dimension
    (with dilation d, ceil(k gcd(s, d) / s): the taps that land on one element are s / gcd
    apart in the kernel)."""
    return math.prod(-(-k * math.gcd(s, d) // s)
                     for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation))
