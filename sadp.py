"""Spike-aware data pruning (SADP) for spiking neural networks, in one file.

Each epoch trains on a weighted sample of the data instead of all of it. Example i is drawn
with probability p_i proportional to a cheap upper bound S_i on the norm of its gradient, and
its loss is multiplied by w_i = 1 / (N p_i), so that every minibatch gradient is an unbiased
estimate of the full-data gradient. At pruning ratio r an epoch costs (1 - r) of a full one.

Method: "Efficient Training of Spiking Neural Networks by Spike-aware Data Pruning", Ma, Chen,
Wu, Tan, Wu, arXiv 2510.04098 (2025). The paper released no code; the derivation below is
this project's own, written from the principles the paper states (p_i proportional to the
gradient norm, an efficient upper bound that accounts for all-or-nothing spikes).

Notation (time-first layout, as in SpikingJelly's multi-step mode):
    T timesteps, B examples in a batch, C classes, N examples in the training set.
    The classifier head is affine: o_t = W h_t + b, with h_t in R^D the head's input at step t
    (binary spikes, or spatially averaged spikes) and o_t in R^C the step's logits.
    q is the target distribution (one-hot, or label-smoothed).
    rate readout (default):        l = CE(z, q),            z = (1/T) sum_t o_t
    per-timestep readout (TET):    l = (1/T) sum_t CE(o_t, q)

The score. With g_t = dl/do_t and h^_t = [h_t; 1], the gradient of l w.r.t. the head's weight
and bias together is G = sum_t g_t h^_t^T. By the triangle inequality and ||u v^T|| = ||u|| ||v||,

    ||G||_F  <=  S = sum_t ||g_t|| * sqrt(||h_t||^2 + 1)

and for binary spikes ||h_t||^2 = n_t, the number of spikes entering the head at step t.
g_t is analytic (softmax minus target), so S costs O(T B (C + D)) on tensors the forward pass
already holds: no extra backward pass.

Integration (three lines in a training loop):

    sampler = SADPSampler(len(dataset), ratio=0.3)            # DataLoader(..., sampler=sampler)
    sampler.set_epoch(epoch)                                  # once per epoch
    loss, scores = spike_aware_loss(outputs, y, head_inputs, sampler.weights(idx))
    loss.backward(); sampler.update(idx, scores)

`outputs` [T,B,C] and `head_inputs` [T,B,D] come from the model; `HeadTap` reads both off any
model's classifier with a forward hook. The dataset must also return each example's index;
`WithIndex` wraps any map-style dataset to do so.

Only torch and the Python standard library are used, so this file can be copied as it is.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "spike_aware_loss",
    "baseline_loss",
    "head_gradient_bound",
    "head_gradient_norm",
    "SADPSampler",
    "HeadTap",
    "WithIndex",
]


# ---------------------------------------------------------------------------------------------
# Per-example loss and the analytic logit gradient
# ---------------------------------------------------------------------------------------------

def _check_inputs(outputs: Tensor, targets: Tensor, head_inputs: Tensor | None,
                  weights: Tensor | None, label_smoothing: float) -> None:
    """Shape, dtype and range checks, with errors that name the offending argument."""
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
    if head_inputs is not None:
        if not isinstance(head_inputs, Tensor) or head_inputs.dim() < 3 \
                or tuple(head_inputs.shape[:2]) != (T, B):
            raise ValueError(
                f"head_inputs must be what entered the classifier, shaped [T, B, ...] = "
                f"[{T}, {B}, ...] to match outputs {list(outputs.shape)}; got {_shape(head_inputs)}. "
                f"A merged [T*B, D] tensor must be reshaped to [T, B, D] (HeadTap does this).")
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != (B,):
            raise ValueError(
                f"weights must be one importance weight per example, shaped [B] = [{B}]; "
                f"got {_shape(weights)}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")


def _shape(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"


def _per_example(outputs: Tensor, targets: Tensor, per_timestep: bool,
                 label_smoothing: float) -> tuple[Tensor, Tensor]:
    """Per-example loss l [B] (differentiable) and g_t = dl/do_t [T, B, C] (detached).

    At least float32, also when the logits come from bf16/fp16 autocast: the softmax and the
    score are then as accurate as in a float32 run (float64 inputs stay float64).
    """
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


def _weighted_mean(ell: Tensor, weights: Tensor | None) -> Tensor:
    """L = (1/B) sum_b w_b l_b. Dividing by sum(w) instead would bias the gradient: never do it."""
    if weights is None:
        return ell.mean()
    return (weights.to(ell) * ell).mean()


# ---------------------------------------------------------------------------------------------
# The spike-aware score
# ---------------------------------------------------------------------------------------------

def head_gradient_bound(g: Tensor, head_inputs: Tensor) -> Tensor:
    """S = sum_t ||g_t|| * sqrt(||h_t||^2 + 1)  >=  ||dl/d(W, b)||_F, per example.

    g: [T, B, C] logit gradients; head_inputs: [T, B, ...] (trailing dims are flattened).
    For binary spikes ||h_t||^2 is the spike count n_t, which is why the score is cheap and
    spike-aware: an example whose head sees many spikes has a larger weight gradient.
    Properties: S dominates the true norm (triangle inequality), equals it when T = 1, and for
    the rate readout with non-negative h it is at most sqrt(T) times the true norm.
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
    _check_inputs(outputs, targets, head_inputs, weights, label_smoothing)
    ell, g = _per_example(outputs, targets, per_timestep, label_smoothing)
    with torch.no_grad():
        scores = head_gradient_norm(g, head_inputs) if exact else head_gradient_bound(g, head_inputs)
    return _weighted_mean(ell, weights), scores.float()


def baseline_loss(outputs: Tensor, targets: Tensor, weights: Tensor | None = None, *,
                  kind: str, per_timestep: bool = False,
                  label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """The same loss as `spike_aware_loss`, scored by a spike-blind baseline instead.

    kind="ann":  ||dl/dz||, the logit-gradient bound of Katharopoulos & Fleuret (ICML 2018),
                 as written for ANNs: blind to how many spikes reach the head. Computed as
                 sqrt(T sum_t ||g_t||^2), which is exactly ||softmax(z) - q|| for the rate
                 readout and the RMS over t of ||softmax(o_t) - q|| per timestep.
    kind="loss": the unweighted loss l itself (the score InfoBatch, ICLR 2024, prunes by).
    """
    if kind not in ("ann", "loss"):
        raise ValueError(f"kind must be 'ann' or 'loss'; got {kind!r}.")
    _check_inputs(outputs, targets, None, weights, label_smoothing)
    ell, g = _per_example(outputs, targets, per_timestep, label_smoothing)
    T = g.shape[0]
    with torch.no_grad():
        scores = (T * g.square().sum((0, 2))).sqrt() if kind == "ann" else ell.detach()
    return _weighted_mean(ell, weights), scores.float()


# ---------------------------------------------------------------------------------------------
# Sampling with re-weighting
# ---------------------------------------------------------------------------------------------

class SADPSampler(torch.utils.data.Sampler[int]):
    """Draws each epoch's examples from p and re-weights them by 1 / (N p).

    At `set_epoch` the probabilities are frozen from the score table S:

        p_i = (1 - eps) S_i / sum_j S_j + eps / N

    and m = round((1 - ratio) N) indices are drawn with replacement from a generator seeded by
    (seed, epoch). Example i then carries the weight w_i = 1 / (N p_i), so for any draw

        E[w_i grad l_i] = sum_i p_i grad l_i / (N p_i) = (1/N) sum_i grad l_i,

    the full-data gradient. The uniform mix eps keeps every p_i > 0 (nothing is starved) and
    bounds every weight by 1/eps. `update` records the scores of the examples just trained on;
    they take effect at the next `set_epoch`, so p and the weights stay fixed within an epoch.

    replacement=False draws m *distinct* examples instead, example i with probability
    pi_i = m p_i (systematic sampling; where m p_i would exceed 1 the example is taken for sure
    and p is rescaled, see `_capped`), and puts them in a random order. The weight is still
    1 / (N p_i) with that p, and each position of the epoch holds example i with probability
    pi_i / m = p_i, so each position is an unbiased draw: E[w g] = sum_i p_i g_i / (N p_i)
    = (1/N) sum_i g_i, and so is every minibatch. (The positions are no longer independent:
    no example appears twice in an epoch.) What changes is coverage: at r = 0.3 an i.i.d. draw reaches only
    1 - e^(-0.7) = 50% of the examples, a draw without replacement 70%, and the variance of the
    epoch's summed gradient falls to about r times its i.i.d. value (the finite-population
    correction; bench.py measures it).

    ratio = 0 is plain full-data training: a random permutation, all weights 1.

    Under torch.distributed (or with rank/world_size given), every rank draws the same sample
    from the same generator and keeps every world_size-th index from its rank on. The draw is
    padded with extra i.i.d. draws from p to a multiple of world_size, so all ranks run the
    same number of steps and every position stays an unbiased draw (repeating examples to pad
    would not be). `update` gathers every rank's scores, so all ranks hold
    the same table and freeze the same p.

    Args:
        num_examples: N, the size of the training set.
        ratio: r in [0, 1), the fraction of example-passes saved per epoch.
        seed: with the epoch, seeds the draw; same seed, same draws.
        epsilon: the uniform mix eps in (0, 1]. 1 gives uniform sampling (with replacement, or
            a plain random subset with replacement=False).
        initial_score: the score of an example not yet trained on: "mean" (the mean of the
            scores seen so far: neutral, neither favoured nor starved), "max" (optimistic:
            unseen examples are drawn early), or a positive number.
        replacement: True (default): m i.i.d. draws, as the method is derived. False: m
            distinct examples with inclusion probabilities m p (lower variance per epoch).
        smoothing: beta in [0, 1): an example's score becomes beta * old + (1 - beta) * new
            when it is scored again (an exponential moving average; 0 keeps the newest score).
            It smooths the noise of single-batch scores; it does not make them fresher.
        rank, world_size: this process's place in a distributed run; default from
            torch.distributed when it is initialised, else a single process.
    """

    def __init__(self, num_examples: int, ratio: float, *, seed: int = 0,
                 epsilon: float = 0.1, initial_score: float | str = "mean",
                 replacement: bool = True, smoothing: float = 0.0,
                 rank: int | None = None, world_size: int | None = None):
        if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int (the training-set size); got {num_examples!r}.")
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(
                f"ratio must lie in [0, 1): the fraction of example-passes saved "
                f"(0 = full data, 0.3 = train on 70% per epoch); got {ratio!r}.")
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in (0, 1] (the uniform share of p); got {epsilon!r}.")
        if isinstance(initial_score, str):
            if initial_score not in ("mean", "max"):
                raise ValueError(f"initial_score must be 'mean', 'max' or a positive number; got {initial_score!r}.")
        elif not (math.isfinite(initial_score) and initial_score > 0):
            raise ValueError(f"initial_score must be 'mean', 'max' or a positive number; got {initial_score!r}.")
        self.num_examples = num_examples
        self.ratio = float(ratio)
        self.num_draws = round((1.0 - self.ratio) * num_examples)   # m
        if self.num_draws < 1:
            raise ValueError(
                f"ratio {ratio} leaves no example of {num_examples} to train on per epoch; "
                f"lower the ratio.")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1) (the weight of the old score); got {smoothing!r}.")
        self.smoothing = float(smoothing)
        self.seed = int(seed)
        self.epsilon = float(epsilon)
        self.initial_score = initial_score
        self.replacement = bool(replacement)
        self.rank, self.world_size = _dist_place(rank, world_size)
        self.scores = torch.zeros(num_examples, dtype=torch.float64)  # S (valid where seen)
        self.seen = torch.zeros(num_examples, dtype=torch.bool)
        self.epoch = None                 # the epoch whose draw is frozen below
        self.epoch_ratio = self.ratio     # this epoch's pruning ratio (see set_epoch)
        self.probabilities = None         # p, float64 [N], sums to 1
        self._draw = None                 # this epoch's indices, all ranks [m_padded]

    # -- the epoch's distribution and draw -------------------------------------------------

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
            # the union of the ranks' shares starts with exactly the single-process draw. Every
            # position of the epoch is then an unbiased draw, so every minibatch stays unbiased.
            draw = torch.cat([draw, _draw_iid(p, m_padded - m, gen)])
        self.epoch = int(epoch)
        self.epoch_ratio = ratio
        self.probabilities = p
        self._draw = draw

    def _ensure_epoch(self) -> None:
        if self.epoch is None:
            self.set_epoch(0)

    def __iter__(self) -> Iterator[int]:
        self._ensure_epoch()
        return iter(self._draw[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        m = self.num_draws if self._draw is None else round((1.0 - self.epoch_ratio) * self.num_examples)
        return -(-m // self.world_size)    # this rank's share

    def weights(self, indices: Tensor | Sequence[int]) -> Tensor:
        """w_i = 1 / (N p_i) under this epoch's frozen p (float32, on the indices' device)."""
        self._ensure_epoch()
        idx = torch.as_tensor(indices)
        w = 1.0 / (self.num_examples * self.probabilities[idx.cpu().long()])
        if self.epoch_ratio == 0.0:
            w = torch.ones_like(w)        # exactly 1, not 1 +- rounding
        return w.float().to(idx.device)

    def update(self, indices: Tensor | Sequence[int], scores: Tensor | Sequence[float]) -> None:
        """Record new scores for the examples trained on (used from the next `set_epoch`).

        Under torch.distributed this is a collective: every rank must call it, and every rank
        then records every rank's scores. Buffer a whole epoch and call it once to avoid
        a host-device sync per step.
        """
        idx = torch.as_tensor(indices).detach().reshape(-1).cpu().long()
        s = torch.as_tensor(scores, dtype=torch.float64).detach().reshape(-1).cpu()
        if idx.shape != s.shape:
            raise ValueError(f"update needs one score per index; got {idx.numel()} indices and {s.numel()} scores.")
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            idx, s = _all_gather_cat(idx), _all_gather_cat(s)
        if idx.numel() == 0:
            return
        if ((idx < 0) | (idx >= self.num_examples)).any():
            raise ValueError(f"update got indices outside [0, {self.num_examples}): "
                             f"[{int(idx.min())}, {int(idx.max())}].")
        bad = ~torch.isfinite(s) | (s < 0)
        if bad.any():
            raise ValueError(
                f"update got {int(bad.sum())} non-finite or negative scores (first: {s[bad][0].item()} "
                f"for example {int(idx[bad][0])}); the score table is unchanged. A NaN score means "
                f"the forward pass diverged: lower the learning rate or check the inputs.")
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
        self._ensure_epoch()
        S = self._filled_scores()
        p = self.probabilities
        if not bool(S.any()):
            return 1.0
        S2 = (S / S.max()).square()           # scaled: the ratio is scale-free, no overflow
        return float(self.num_examples * S2.sum() / (S2 / p).sum())

    # -- exact resume ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"num_examples": self.num_examples, "ratio": self.ratio, "seed": self.seed,
                "epsilon": self.epsilon, "replacement": self.replacement, "scores": self.scores.clone(), "seen": self.seen.clone(),
                "epoch": self.epoch, "epoch_ratio": self.epoch_ratio, "smoothing": self.smoothing,
                "probabilities": None if self.probabilities is None else self.probabilities.clone(),
                "draw": None if self._draw is None else self._draw.clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_examples", "ratio", "seed", "epsilon", "replacement", "smoothing"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{getattr(self, key)!r}; resume with the same settings.")
        m = round((1.0 - state["epoch_ratio"]) * self.num_examples)
        if state["draw"] is not None and state["draw"].numel() != -(-m // self.world_size) * self.world_size:
            raise ValueError("sampler state was saved with another world size; resume with the same one.")
        self.scores = state["scores"].clone().double()
        self.seen = state["seen"].clone().bool()
        self.epoch = state["epoch"]
        self.epoch_ratio = state["epoch_ratio"]
        self.probabilities = None if state["probabilities"] is None else state["probabilities"].clone()
        self._draw = None if state["draw"] is None else state["draw"].clone()


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


def _all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any length from every rank (on every rank)."""
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


# ---------------------------------------------------------------------------------------------
# Reading outputs and head inputs off any model
# ---------------------------------------------------------------------------------------------

class HeadTap:
    """Records what enters and leaves a model's classifier (an nn.Linear), with a forward hook.

        tap = HeadTap(model.fc, T=4)
        logits = model(x)                    # the model is not changed
        outputs, head_inputs = tap.pop()     # [T, B, C], [T, B, D]

    The head may be called once on [T, B, D] (multi-step models), once on the merged
    [T*B, D] (time-major, as SpikingJelly's SeqToANNContainer does; T is then needed), or T
    times on [B, D] (step-by-step loops, as in snnTorch tutorials). `outputs` keep their
    autograd graph, so the loss computed from them trains the model.
    """

    def __init__(self, head: nn.Module, T: int | None = None):
        self.T = T
        self._calls: list[tuple[Tensor, Tensor]] = []
        self._handle = head.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self._calls.append((args[0], output))

    def pop(self) -> tuple[Tensor, Tensor]:
        """(outputs [T, B, C], head_inputs [T, B, D]) of the forward since the last pop."""
        calls, self._calls = self._calls, []
        if not calls:
            raise RuntimeError("HeadTap.pop: the head was not called since the last pop; run the model first.")
        x, y = calls[0]
        if len(calls) > 1:                                   # one call per timestep
            if self.T is not None and len(calls) != self.T:
                raise RuntimeError(f"HeadTap: the head was called {len(calls)} times but T={self.T}; "
                                   f"call pop() once per forward pass.")
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
        self._calls = []

    def __enter__(self) -> "HeadTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class WithIndex(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that each item also returns its index: (*item, index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)
