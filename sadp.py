"""Spike-aware data pruning (SADP) for spiking neural networks, in one file.

Each epoch trains on a weighted sample of the data instead of all of it: example i is drawn
with probability p_i proportional to a cheap upper bound S_i on its gradient norm, and its
loss is multiplied by w_i = 1 / (N p_i). At pruning ratio r an epoch costs (1 - r) of a full
one. Method: Ma et al., "Efficient Training of Spiking Neural Networks by Spike-aware Data
Pruning", arXiv 2510.04098 (2025), which released no code; the derivation is this project's.
T timesteps, B examples per batch, C classes, N examples; the head is o_t = W h_t + b, h_t >= 0
(spikes, or means of spikes); the loss l = CE((1/T) sum_t o_t, q) (or TET's per-step mean).

1. Unbiased. Each epoch freeze p_i = (1 - eps) S_i / sum_j S_j + eps / N (eps in (0, 1]), draw
   m = round((1 - r) N) examples from p, train on L = (1/B) sum_b w_b l_b. Then
   E[w_i grad l_i] = sum_i p_i grad l_i / (N p_i) = (1/N) sum_i grad l_i, the full-data
   gradient, whatever the scores; eps keeps every w below 1/eps. The variance is smallest at
   p_i ~ ||grad l_i|| (Cauchy-Schwarz).
2. The spike-aware score. With g_t = dl/do_t (softmax minus q, over T) and h^_t = [h_t; 1],
   the head's gradient is G = sum_t g_t h^_t^T, so by the triangle inequality
       ||G||_F  <=  S = sum_t ||g_t|| sqrt(n_t + 1),    n_t = ||h_t||^2,
   for 0/1 spikes the number of spikes entering the head: read off the forward pass. Each a
   property test: (P1) S >= ||grad_{W,b} l||; (P2) equality at T = 1; (P3) rate readout:
   S <= sqrt(T) ||grad_{W,b} l||; (P4) the exact norm (exact=True) equals autograd's.
3. Without replacement (default). m i.i.d. draws reach only 1 - e^-(1-r) of the examples, so
   draw m distinct ones, i with probability m p_i (systematic sampling; m p_i > 1 is capped at
   a sure draw and p rescaled), then shuffle: every position of the epoch holds example i with
   probability p_i, so every minibatch stays unbiased. `replacement=True` draws i.i.d.

In your own loop (the dataset returns each example's index; `WithIndex` wraps any dataset):

    sampler = SADPSampler(len(dataset), ratio=0.3)       # DataLoader(..., sampler=sampler)
    tap = HeadTap(model.fc, T=4)                         # records what enters/leaves the head
    for epoch in range(epochs):
        sampler.set_epoch(epoch)                         # freezes p, draws the epoch
        seen, scores = [], []
        for x, y, idx in loader:
            model(x)
            outputs, head_inputs = tap.pop()             # [T, B, C], [T, B, D]
            loss, s = spike_aware_loss(outputs, y, head_inputs, sampler.weights(idx).to(device))
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            seen.append(idx); scores.append(s)
        sampler.update(torch.cat(seen), torch.cat(scores))   # once per epoch: one host sync
        with torch.no_grad():                            # forwards here are not recorded
            accuracy = evaluate(model)

Step size: an epoch has (1 - r) of the steps, so at a fixed number of epochs multiply the
learning rate by 1 / (1 - r), as InfoBatch does; in this project's measurements that mattered
more than the scores (docs/results.md). Uses torch and the standard library only.
"""

from __future__ import annotations

import copy
import hashlib
import numbers
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# -- The loss and the spike-aware score --------------------------------------------------------

def per_example_loss(outputs: Tensor, targets: Tensor, *, per_timestep: bool = False,
                     label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-example loss l [B] (differentiable) and g_t = dl/do_t [T, B, C] (detached), in at
    least float32. outputs: [T, B, C] logits per step; targets: [B] class indices in [0, C),
    not range-checked here (a host-device sync every step): check labels once where they enter,
    as train.py does. Out of range, `scatter_` raises "index ... out of bounds" on the CPU; CUDA
    stops with a device-side assert."""
    _check_outputs_and_targets(outputs, targets, label_smoothing)
    o = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    T, B, C = o.shape
    q = torch.full((B, C), label_smoothing / C, device=o.device, dtype=o.dtype)  # as torch's CE
    q.scatter_(1, targets.long().unsqueeze(1), 1.0 - label_smoothing + label_smoothing / C)
    if per_timestep:
        log_p = F.log_softmax(o, dim=-1)                      # [T, B, C]
        ell = -(q * log_p).sum(-1).mean(0)                    # l = (1/T) sum_t CE(o_t, q)
        g = (log_p.detach().exp() - q) / T                    # g_t = (softmax(o_t) - q) / T
    else:
        log_p = F.log_softmax(o.mean(0), dim=-1)              # [B, C], z = (1/T) sum_t o_t
        ell = -(q * log_p).sum(-1)                            # l = CE(z, q)
        g = ((log_p.detach().exp() - q) / T).expand(T, B, C)  # g_t = (softmax(z) - q) / T
    return ell, g


def weighted_mean(ell: Tensor, weights: Tensor | None) -> Tensor:
    """L = (1/B) sum_b w_b l_b. Dividing by sum(w) instead would bias the gradient."""
    if weights is None:
        return ell.mean()
    if not isinstance(weights, Tensor) or weights.shape != ell.shape:
        raise ValueError(f"weights must be one importance weight per example, shaped [B] = "
                         f"[{ell.shape[0]}]; got {_shape(weights)}.")
    return (weights.to(ell) * ell).mean()


def head_gradient_bound(g: Tensor, head_inputs: Tensor) -> Tensor:
    """S = sum_t ||g_t|| sqrt(||h_t||^2 + 1) >= ||dl/d(W, b)||_F per example [B]; for 0/1 spikes
    ||h_t||^2 is the spike count n_t. head_inputs [T, B, ...] (trailing dims flattened)."""
    h_sq = head_inputs.detach().flatten(2).to(g.dtype).square().sum(-1)     # n_t for spikes
    return (g.norm(dim=-1) * (h_sq + 1.0).sqrt()).sum(0)


def head_gradient_norm(g: Tensor, head_inputs: Tensor) -> Tensor:
    """The exact ||dl/d(W, b)||_F per example from the Gram identity (no backward pass):
    ||G||_F^2 = sum_{t,t'} (g_t . g_t') (h^_t . h^_t'). O(T^2 (C + D)): T times the bound's."""
    h = head_inputs.detach().flatten(2).to(g.dtype)
    gram_g = torch.einsum("tbc,sbc->bts", g, g)
    gram_h = torch.einsum("tbd,sbd->bts", h, h) + 1.0                      # + 1: the bias
    return (gram_g * gram_h).sum((1, 2)).clamp_min(0.0).sqrt()


def spike_aware_loss(outputs: Tensor, targets: Tensor, head_inputs: Tensor,
                     weights: Tensor | None = None, *, per_timestep: bool = False,
                     label_smoothing: float = 0.0, exact: bool = False) -> tuple[Tensor, Tensor]:
    """The re-weighted minibatch loss L = (1/B) sum_b w_b l_b and each example's score [B]
    (float32, detached; it bounds the gradient of the *unweighted* l_b, so p never depends on
    the weights it made). outputs [T, B, C], targets [B] (see `per_example_loss`); head_inputs
    [T, B, ...] what entered the head; weights [B] from `SADPSampler.weights` (None: all 1);
    per_timestep: TET loss; label_smoothing: as torch's cross_entropy; exact: the exact head
    gradient norm instead of the bound. No host-device sync."""
    ell, g = per_example_loss(outputs, targets, per_timestep=per_timestep,
                              label_smoothing=label_smoothing)
    T, B = outputs.shape[:2]
    if not isinstance(head_inputs, Tensor) or head_inputs.dim() < 3 or tuple(head_inputs.shape[:2]) != (T, B):
        raise ValueError(f"head_inputs must be what entered the classifier, shaped [T, B, ...] = [{T}, {B}, "
                         f"...]; got {_shape(head_inputs)}. Reshape a merged [T*B, D] (HeadTap does this).")
    loss = weighted_mean(ell, weights)
    with torch.no_grad():
        scores = head_gradient_norm(g, head_inputs) if exact else head_gradient_bound(g, head_inputs)
    return loss, scores.float()


# -- The sampler: p frozen per epoch, m draws, weights 1 / (N p) --------------------------------

class SADPSampler(torch.utils.data.Sampler[int]):
    """Draws each epoch's examples from p and re-weights them by w_i = 1 / (N p_i).

    num_examples: N. ratio: r in [0, 1), the share of example-passes saved; 0 is full data (a
    permutation, weights 1). seed: with the epoch, seeds the draw. epsilon: the uniform share of
    p. replacement: m i.i.d. draws instead of m distinct ones. Unscored examples get the mean
    score. rank, world_size (default: torch.distributed's): every rank draws the same sample
    and keeps every world_size-th index, the draw padded with i.i.d. draws from p to a multiple
    of world_size; `update` is then a collective that gathers every rank's scores."""

    _SETTINGS = ("num_examples", "ratio", "seed", "epsilon", "replacement", "world_size")

    def __init__(self, num_examples: int, ratio: float, *, seed: int = 0, epsilon: float = 0.1,
                 replacement: bool = False, rank: int | None = None, world_size: int | None = None):
        _check_settings(num_examples, ratio, epsilon)
        self.num_examples, self.ratio = int(num_examples), float(ratio)
        self.num_draws = round((1.0 - self.ratio) * self.num_examples)      # m
        self.seed, self.epsilon, self.replacement = int(seed), float(epsilon), bool(replacement)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = (torch.distributed.get_world_size() if dist else 1) if world_size is None else world_size
        self.rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}.")
        self.scores = torch.zeros(self.num_examples, dtype=torch.float64)   # S, valid where seen
        self.seen = torch.zeros(self.num_examples, dtype=torch.bool)
        self.epoch = None                 # the epoch whose draw is frozen below
        self.probabilities = None         # p, float64 [N], sums to 1
        self._draw = None                 # this epoch's indices, all ranks, padded

    def set_epoch(self, epoch: int) -> None:
        """Freeze this epoch's p from the score table and draw its indices."""
        N, m = self.num_examples, self.num_draws
        gen = torch.Generator().manual_seed(_seed_for(self.seed, epoch))
        m_padded = -(-m // self.world_size) * self.world_size
        if self.ratio == 0.0:
            p = torch.full((N,), 1.0 / N, dtype=torch.float64)
            draw = torch.randperm(N, generator=gen).repeat(self.world_size)[:m_padded]   # wraps around
        else:
            S = self._scaled_scores()
            p = (1.0 - self.epsilon) * S / S.sum() + self.epsilon / N
            p = p / p.sum()               # exact normalisation in float64
            if not self.replacement:
                p = _capped(p, m)
            draw = _draw_iid(p, m, gen) if self.replacement else _draw_systematic(p * m, gen)
            # Padding after the m draws, so the ranks' shares union to the single-process draw.
            draw = torch.cat([draw, _draw_iid(p, m_padded - m, gen)])
        self.epoch, self.probabilities, self._draw = int(epoch), p, draw

    def _scaled_scores(self) -> Tensor:
        """S / max(S), unseen examples at the mean of the seen (scaled first: no overflow)."""
        top = self.scores[self.seen].max() if self.seen.any() else 0.0
        if top == 0:
            return torch.ones(self.num_examples, dtype=torch.float64)
        S = self.scores / top
        S[~self.seen] = S[self.seen].mean()
        return S

    def __iter__(self) -> Iterator[int]:
        return iter(self._frozen()._draw[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return -(-self.num_draws // self.world_size)       # this rank's share

    def weights(self, indices: Tensor | Sequence[int]) -> Tensor:
        """w_i = 1 / (N p_i) under this epoch's frozen p: float32 on the CPU, finite and
        positive by construction (p_i >= eps / N); move them to the device yourself."""
        p, idx = self._frozen().probabilities, _checked_indices(indices, self.num_examples, "weights")
        if self.ratio == 0.0:
            return torch.ones(len(idx))   # exactly 1, not 1 +- rounding
        return (1.0 / (self.num_examples * p[idx])).float()

    def _frozen(self) -> "SADPSampler":
        if self.epoch is None:
            raise RuntimeError("SADPSampler: no epoch is drawn yet; call set_epoch(epoch) first "
                               "(once per epoch, before iterating or asking for weights).")
        return self

    def update(self, indices: Tensor | Sequence[int], scores: Tensor | Sequence[float]) -> None:
        """Record the scores of the examples trained on, for the next `set_epoch`. Call it once
        an epoch (one host-device sync); under torch.distributed it gathers every rank's."""
        idx = _checked_indices(indices, self.num_examples, "update")
        s = torch.as_tensor(scores, dtype=torch.float64).detach().reshape(-1).cpu()
        if idx.shape != s.shape:
            raise ValueError(f"update needs one score per index; got {idx.numel()} indices, {s.numel()} scores.")
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            idx, s = all_gather_cat(idx), all_gather_cat(s)
        bad = ~torch.isfinite(s) | (s < 0)
        if bad.any():
            raise ValueError(f"update got {int(bad.sum())} non-finite or negative scores (first: example "
                             f"{int(idx[bad][0])}, {s[bad][0].item()}); the table is unchanged. A NaN score "
                             f"means the forward pass diverged: lower the learning rate or check the inputs.")
        self.scores[idx] = s
        self.seen[idx] = True

    def state_dict(self) -> dict:
        return copy.deepcopy({**{k: getattr(self, k) for k in self._SETTINGS}, "scores": self.scores,
                              "seen": self.seen, "epoch": self.epoch, "probabilities": self.probabilities,
                              "draw": self._draw})

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state)
        state = copy.deepcopy(state)
        self.scores, self.seen, self.epoch = state["scores"], state["seen"], state["epoch"]
        self.probabilities, self._draw = state["probabilities"], state["draw"]


def _draw_iid(p: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k i.i.d. draws from p by inverting its CDF (torch.multinomial caps N at 2^24)."""
    cdf = p.cumsum(0)
    u = torch.rand(k, generator=gen, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_max(len(p) - 1)


def _capped(p: Tensor, m: int) -> Tensor:
    """The p whose inclusion probabilities pi = m p are all <= 1 (an example is drawn at most
    once): those above 1 are taken for sure, the rest rescaled to keep sum(pi) = m; repeat."""
    pi = p * m
    while bool((pi > 1.0).any()):
        sure = pi >= 1.0
        pi[sure] = 1.0
        pi[~sure] *= (m - int(sure.sum())) / pi[~sure].sum()
    return pi / m


def _draw_systematic(pi: Tensor, gen: torch.Generator) -> Tensor:
    """m = sum(pi) distinct indices, i included with probability pi_i <= 1: lay the pi_i end
    to end in random order, take those under the points u, u + 1, ..., u + m - 1, u ~ U[0, 1).
    Then shuffle, or an example's place would depend on its pi; shuffled, position j holds
    example i with probability pi_i / m = p_i, so each minibatch is an unbiased draw."""
    order = torch.randperm(len(pi), generator=gen)
    ends = pi[order].cumsum(0)
    m = round(float(ends[-1]))
    ends = ends * (m / ends[-1])
    points = torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(m, dtype=torch.float64)
    chosen = order[torch.searchsorted(ends, points, right=True).clamp_max(len(pi) - 1)]
    return chosen[torch.randperm(m, generator=gen)]


def _seed_for(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch): distinct pairs give unrelated streams."""
    return int.from_bytes(hashlib.sha256(f"sadp:{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


# -- Adapters: outputs and head inputs off any model, indices from any dataset -----------------

class HeadTap:
    """Records what enters and leaves a model's classifier (an nn.Linear) with a forward hook;
    `pop()` returns them as ([T, B, C] outputs, with their graph, [T, B, D] inputs). The head
    may be called once on [T, B, D] (multi-step models), once on the merged [T*B, D] (time-major,
    as SpikingJelly's SeqToANNContainer; T needed), or T times on [B, D] (a step-by-step loop,
    as in snnTorch tutorials; T needed). Only forwards with gradients enabled are recorded (so
    evaluation under no_grad needs no pop), and at most one: a pop after two raises."""

    def __init__(self, head: nn.Module, T: int | None = None):
        if T is not None and (not isinstance(T, numbers.Integral) or isinstance(T, bool) or T < 1):
            raise ValueError(f"HeadTap: T must be a positive int (the timesteps) or None; got {T!r}.")
        self.T = T
        self._calls: list[tuple[Tensor, Tensor]] = []
        self._count = 0                                      # head calls since the last pop
        self._handle = head.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output) -> None:
        if not torch.is_grad_enabled():
            return                                           # evaluation: nothing to pop
        x = args[0] if args else next(iter(kwargs.values()))   # head(x) or head(input=x)
        self._count += 1
        keep = 1 if x.dim() >= 3 else (self.T or 1)          # [T, B, ...] is a whole forward
        self._calls = (self._calls + [(x, output)])[-keep:]  # bounded: one forward

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


class WithIndex(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that each item also returns its index: (*item, index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


def all_gather_cat(x: Tensor) -> Tensor:
    """Every rank's 1-D tensor (any length and dtype) concatenated in rank order, on every rank,
    as a CPU tensor. A collective: every rank must call it (on the GPU under NCCL)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    x = x.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.numel()], device=device))
    padded = torch.zeros(max(int(n) for n in sizes), dtype=x.dtype, device=device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).cpu()


# -- Checks that turn a mistake into a message saying what to do -------------------------------

def _shape(x) -> str:
    return f"shape {list(x.shape)} {x.dtype}" if isinstance(x, Tensor) else f"a {type(x).__name__}"


def _is_index(x) -> bool:
    return isinstance(x, Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _check_outputs_and_targets(outputs: Tensor, targets: Tensor, label_smoothing: float) -> None:
    """Shapes and dtypes only: free, no host-device sync."""
    if not isinstance(outputs, Tensor) or outputs.dim() != 3 or not outputs.is_floating_point() \
            or min(outputs.shape[:2]) < 1 or outputs.shape[2] < 2:
        raise ValueError(f"outputs must be the head's float logits shaped [T, B, C], C >= 2; got "
                         f"{_shape(outputs)}. If your model returns [B, C], add a time axis with "
                         f"outputs.unsqueeze(0) (T = 1); if [T*B, C], reshape to [T, B, C].")
    if not _is_index(targets) or targets.shape != outputs.shape[1:2]:
        raise ValueError(f"targets must be integer class indices shaped [B] = [{outputs.shape[1]}]; got "
                         f"{_shape(targets)}. Convert with targets.long() if they are whole numbers.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")


def _checked_indices(indices, num_examples: int, where: str) -> Tensor:
    """1-D CPU int64 indices in [0, N) (a float would be truncated, -1 wrap to the last).
    Pass CPU indices: moving device indices to the CPU waits for the device."""
    idx = torch.as_tensor(indices).detach().reshape(-1).cpu()
    if not _is_index(idx):
        raise ValueError(f"{where} needs integer example indices; got {idx.dtype}. Pass the dataset's unchanged.")
    values = idx.tolist()                    # a host list: no tensor op, no device sync
    if values and (min(values) < 0 or max(values) >= num_examples):
        raise ValueError(f"{where} got indices outside [0, {num_examples}): [{min(values)}, {max(values)}].")
    return idx.long()


def _check_tap_calls(calls: list, count: int, T: int | None) -> None:
    """One forward's calls: once on [T, B, ...] or [T*B, D], or T times on [B, D]."""
    if count == 0:
        raise RuntimeError("HeadTap.pop: the head was not called with gradients enabled since the "
                           "last pop; run the model's training forward first.")
    if count > 1 and (count != T or any(c[0].dim() >= 3 for c in calls)):
        steps = "" if T is None else f" or T={T} times (on [B, D])"
        hint = "" if T else " With T omitted one call is one forward: pass T to HeadTap for a step-by-step loop."
        raise RuntimeError(f"HeadTap.pop: the head was called {count} times since the last pop, but one forward "
                           f"calls it once (on [T, B, D] or [T*B, D]){steps}. pop() after every training "
                           f"forward.{hint}")


def _check_settings(num_examples, ratio, epsilon) -> None:
    if not isinstance(num_examples, numbers.Integral) or isinstance(num_examples, bool) \
            or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int (the training-set size); got {num_examples!r}.")
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1): the fraction of example-passes saved "
                         f"(0 = full data, 0.3 = train on 70% per epoch); got {ratio!r}.")
    if round((1.0 - ratio) * num_examples) < 1:
        raise ValueError(f"ratio {ratio} leaves no example of {num_examples} per epoch; lower the ratio.")
    if not isinstance(epsilon, numbers.Real) or not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in (0, 1] (the uniform share of p); got {epsilon!r}.")


def _check_state(sampler: SADPSampler, state: dict) -> None:
    """A state_dict's keys, settings, shapes, dtypes and values, before any of it is used."""
    keys, N = set(sampler.state_dict()), sampler.num_examples
    if not isinstance(state, dict) or set(state) != keys:
        differ = "all" if not isinstance(state, dict) else sorted(keys - set(state)) or sorted(set(state) - keys)
        raise ValueError(f"sampler state lacks or adds keys ({differ}): it is not a SADPSampler.state_dict() "
                         f"of this version.")
    for key in sampler._SETTINGS:
        if state[key] != getattr(sampler, key):
            what = "number of processes" if key == "world_size" else "settings"
            raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                             f"{getattr(sampler, key)!r}; resume with the same {what}.")
    drawn = state["epoch"] is not None
    if drawn and (not isinstance(state["epoch"], int) or isinstance(state["epoch"], bool)):
        raise ValueError(f"sampler state 'epoch' must be an int or None; got {state['epoch']!r}.")
    m_padded = -(-sampler.num_draws // sampler.world_size) * sampler.world_size
    for key, dtype, n, valid in (("scores", torch.float64, N, lambda t: t.isfinite() & (t >= 0)),
                                 ("seen", torch.bool, N, torch.ones_like),
                                 ("probabilities", torch.float64, N, lambda t: t.isfinite() & (t > 0)),
                                 ("draw", torch.int64, m_padded, lambda t: (t >= 0) & (t < N))):
        t = state[key]
        if t is None and key in ("probabilities", "draw") and not drawn:
            continue
        if not isinstance(t, Tensor) or t.dtype != dtype or t.shape != (n,):
            raise ValueError(f"sampler state {key!r} must be a {dtype} tensor of length {n}; got {_shape(t)}"
                             f"{f' (length {t.numel()})' if isinstance(t, Tensor) else ''}.")
        if not bool(valid(t).all()):
            raise ValueError(f"sampler state {key!r} holds NaN, inf or out-of-range values; it is corrupt.")
