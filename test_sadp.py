"""Property tests for sadp.py and baselines.py: the score's guarantees (P1-P4 of sadp.py's
docstring), the sampler's unbiasedness and variance, and every error path. Each test names the
bug it catches."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import models
from baselines import baseline_loss
from sadp import SADPSampler, HeadTap, WithIndex, spike_aware_loss

PROPERTY = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------------
# A random classifier head, and its per-example gradient computed independently by autograd
# ---------------------------------------------------------------------------------------------

def random_head(seed, T, B, C, D, density, pooled, logit_scale):
    """Head inputs (binary spikes, or pooled spikes in [0, 1]), a head (W, b), its outputs."""
    g = torch.Generator().manual_seed(seed)
    if pooled:   # spatial mean over 4 positions of binary spikes: non-negative, not binary
        h = (torch.rand(T, B, D, 4, generator=g, dtype=torch.float64) < density).double().mean(-1)
    else:
        h = (torch.rand(T, B, D, generator=g, dtype=torch.float64) < density).double()
    W = torch.randn(C, D, generator=g, dtype=torch.float64) * logit_scale / math.sqrt(D)
    b = torch.randn(C, generator=g, dtype=torch.float64) * logit_scale
    y = torch.randint(0, C, (B,), generator=g)
    return h, W, b, y


def true_head_grad_norms(h, W, b, y, per_timestep, smoothing):
    """||d l_b / d(W, b)||_F for each example b, by autograd on a one-example loss."""
    norms = []
    for i in range(h.shape[1]):
        Wi, bi = W.clone().requires_grad_(), b.clone().requires_grad_()
        o = h[:, i] @ Wi.T + bi                                       # [T, C]
        t = y[i].expand(o.shape[0]) if per_timestep else y[i:i + 1]
        if per_timestep:
            ell = F.cross_entropy(o, t, label_smoothing=smoothing)    # mean over t of CE(o_t)
        else:
            ell = F.cross_entropy(o.mean(0, keepdim=True), t, label_smoothing=smoothing)
        gW, gb = torch.autograd.grad(ell, (Wi, bi))
        norms.append(torch.sqrt(gW.square().sum() + gb.square().sum()))
    return torch.stack(norms)


head_cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "T": st.integers(1, 6), "B": st.integers(1, 5), "C": st.integers(2, 10), "D": st.integers(1, 40),
    "density": st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    "pooled": st.booleans(), "logit_scale": st.sampled_from([0.1, 1.0, 5.0]),
})
readouts = st.booleans()
smoothings = st.sampled_from([0.0, 0.1, 0.3])


def scores_and_truth(case, per_timestep, smoothing, exact=False):
    h, W, b, y = random_head(**case)
    outputs = h @ W.T + b                                               # [T, B, C]
    _, scores = spike_aware_loss(outputs, y, h, per_timestep=per_timestep,
                                 label_smoothing=smoothing, exact=exact)
    return scores.double(), true_head_grad_norms(h, W, b, y, per_timestep, smoothing)


@PROPERTY
@given(head_cases, readouts, smoothings)
def test_p1_score_dominates_true_head_gradient_norm(case, per_timestep, smoothing):
    """P1. Catches: a missing bias term (+1), a missing 1/T, squared instead of root counts."""
    scores, truth = scores_and_truth(case, per_timestep, smoothing)
    assert torch.all(scores >= truth * (1 - 1e-5) - 1e-7), (scores, truth)


@PROPERTY
@given(head_cases.map(lambda c: {**c, "T": 1}), readouts, smoothings)
def test_p2_score_is_exact_at_one_timestep(case, per_timestep, smoothing):
    """P2. Catches: any slack in the bound (e.g. adding 1 outside the root)."""
    scores, truth = scores_and_truth(case, per_timestep, smoothing)
    torch.testing.assert_close(scores, truth, rtol=1e-5, atol=1e-7)


@PROPERTY
@given(head_cases, smoothings)
def test_p3_rate_readout_bound_within_sqrt_T(case, smoothing):
    """P3. Catches: a bound that sums over t without the 1/T of the rate readout's g_t."""
    scores, truth = scores_and_truth(case, False, smoothing)
    assert torch.all(scores <= math.sqrt(case["T"]) * truth * (1 + 1e-5) + 1e-7), (scores, truth)


@PROPERTY
@given(head_cases, readouts, smoothings)
def test_p4_exact_variant_equals_autograd(case, per_timestep, smoothing):
    """P4. Catches: a wrong Gram term (bias not added, g_t . g_t' transposed per example)."""
    scores, truth = scores_and_truth(case, per_timestep, smoothing, exact=True)
    torch.testing.assert_close(scores, truth, rtol=1e-4, atol=1e-6)


def test_bound_is_loose_for_per_timestep_readout_and_exact_is_not():
    """The bound and the exact norm differ when g_t differ across steps (sanity on P1/P4)."""
    case = dict(seed=3, T=4, B=5, C=6, D=20, density=0.5, pooled=False, logit_scale=3.0)
    bound, truth = scores_and_truth(case, True, 0.0)
    exact, _ = scores_and_truth(case, True, 0.0, exact=True)
    assert torch.all(bound > truth * 1.01)
    torch.testing.assert_close(exact, truth, rtol=1e-4, atol=1e-6)


def test_score_counts_spikes_where_ann_score_does_not():
    """Two examples with identical logits but different spike counts at the head: the
    spike-aware score ranks the busier one higher (its weight gradient is larger); the ANN
    score cannot tell them apart. Catches: head_inputs ignored by the score."""
    T, C, D = 4, 5, 64
    h = torch.zeros(T, 2, D)
    h[:, 0, :4] = 1.0          # 4 spikes per step
    h[:, 1, :32] = 1.0         # 32 spikes per step
    outputs = torch.randn(T, 1, C).expand(T, 2, C).contiguous()
    y = torch.tensor([1, 1])
    _, s = spike_aware_loss(outputs, y, h)
    _, a = baseline_loss(outputs, y, kind="ann")
    assert s[1] > 2 * s[0]
    assert a[0] == a[1]
    # and the ratio is exactly what the formula says: sqrt(32 + 1) / sqrt(4 + 1)
    torch.testing.assert_close(s[1] / s[0], torch.tensor(math.sqrt(33 / 5)))


# ---------------------------------------------------------------------------------------------
# The loss itself
# ---------------------------------------------------------------------------------------------

@PROPERTY
@given(head_cases, smoothings, st.integers(0, 2**31 - 1))
def test_loss_matches_torch_cross_entropy_and_weights(case, smoothing, wseed):
    """Catches: a loss normalised by sum(w) (biased), the wrong readout, wrong smoothing."""
    h, W, b, y = random_head(**case)
    outputs = (h @ W.T + b).float()
    w = torch.rand(case["B"], generator=torch.Generator().manual_seed(wseed)) * 5
    rate = F.cross_entropy(outputs.mean(0), y, label_smoothing=smoothing, reduction="none")
    tet = torch.stack([F.cross_entropy(o, y, label_smoothing=smoothing, reduction="none")
                       for o in outputs]).mean(0)
    for per_timestep, ell in ((False, rate), (True, tet)):
        loss, _ = spike_aware_loss(outputs, y, h, w, per_timestep=per_timestep, label_smoothing=smoothing)
        torch.testing.assert_close(loss, (w * ell).mean(), rtol=1e-5, atol=1e-6)
        loss1, _ = spike_aware_loss(outputs, y, h, per_timestep=per_timestep, label_smoothing=smoothing)
        torch.testing.assert_close(loss1, ell.mean(), rtol=1e-5, atol=1e-6)
        for kind in ("ann", "loss"):
            lossb, _ = baseline_loss(outputs, y, h, w, kind=kind, per_timestep=per_timestep,
                                     label_smoothing=smoothing)
            torch.testing.assert_close(lossb, loss)


def test_scores_ignore_weights_and_are_detached():
    """The score is of the unweighted loss; p must not feed back on the weights it made."""
    case = dict(seed=1, T=3, B=4, C=5, D=8, density=0.4, pooled=False, logit_scale=1.0)
    h, W, b, y = random_head(**case)
    outputs = (h @ W.T + b).float().requires_grad_()
    _, s1 = spike_aware_loss(outputs, y, h)
    _, s2 = spike_aware_loss(outputs, y, h, torch.tensor([0.1, 10.0, 3.0, 1.0]))
    torch.testing.assert_close(s1, s2)
    assert not s1.requires_grad and s1.dtype == torch.float32


def test_baseline_scores():
    """ann = ||softmax(z) - q|| for the rate readout; loss = the per-example CE."""
    torch.manual_seed(0)
    outputs, y = torch.randn(4, 6, 3), torch.randint(0, 3, (6,))
    z = outputs.mean(0)
    _, ann = baseline_loss(outputs, y, kind="ann")
    torch.testing.assert_close(ann, (z.softmax(-1) - F.one_hot(y, 3)).norm(dim=-1))
    _, ls = baseline_loss(outputs, y, kind="loss")
    torch.testing.assert_close(ls, F.cross_entropy(z, y, reduction="none"))
    with pytest.raises(ValueError, match="kind"):
        baseline_loss(outputs, y, kind="grand")


def test_autocast_scores_are_float32_and_accurate():
    """bf16 logits under autocast: the score is computed in float32 from the same values."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 10)
    h = (torch.rand(4, 8, 16) < 0.3).float()
    y = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = head(h)
        loss, scores = spike_aware_loss(outputs, y, h)
    assert outputs.dtype == torch.bfloat16 and scores.dtype == torch.float32
    assert loss.dtype == torch.float32
    _, ref = spike_aware_loss(outputs.float(), y, h)
    torch.testing.assert_close(scores, ref)
    loss.backward()
    assert torch.isfinite(head.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# Unbiasedness
# ---------------------------------------------------------------------------------------------

def test_draw_frequencies_match_probabilities():
    """Chi-square goodness of fit of many epochs' draws against `probabilities`, with a
    fixed seed. The same counts are checked against two wrong p's (no uniform mix; uniform),
    which must fail: the test has the power to catch a sampler that draws from the wrong p."""
    N, epochs = 20, 1500
    s = SADPSampler(N, ratio=0.5, seed=7, epsilon=0.2, replacement=True)
    S = torch.linspace(0.1, 3.0, N)
    s.update(torch.arange(N), S)
    counts = torch.zeros(N, dtype=torch.float64)
    for e in range(epochs):
        s.set_epoch(e)
        counts += torch.bincount(torch.tensor(list(s)), minlength=N)
    n = counts.sum()
    assert n == epochs * 10

    def chi2(p):
        return float(((counts - n * p) ** 2 / (n * p)).sum())

    crit = 63.68   # chi-square quantile 1 - 1e-6 at 19 degrees of freedom
    p = s.probabilities
    assert chi2(p) < crit
    assert chi2(S.double() / S.sum()) > crit                        # forgot the uniform mix
    assert chi2(torch.full((N,), 1 / N, dtype=torch.float64)) > crit  # ignored the scores
    torch.testing.assert_close(p, 0.8 * S.double() / S.sum() + 0.2 / N)
    idx = torch.arange(N)
    torch.testing.assert_close(s.weights(idx).double(), 1 / (N * p), rtol=1e-6, atol=0)


def test_without_replacement_draws_distinct_examples_with_inclusion_probability_m_p():
    """replacement=False: each epoch holds m distinct examples, example i with probability
    pi_i = m p_i <= 1 (capped where the scores would ask for more), weights 1/(N p) as before.
    Catches: duplicates, a sample size other than m, inclusion frequencies that are not m p."""
    N, m, epochs = 20, 14, 3000
    s = SADPSampler(N, ratio=0.3, seed=2, epsilon=0.1, replacement=False)
    S = torch.linspace(0.1, 5.0, N) ** 2
    s.update(torch.arange(N), S)
    counts = torch.zeros(N, dtype=torch.float64)
    for e in range(epochs):
        s.set_epoch(e)
        draw = list(s)
        assert len(draw) == len(set(draw)) == m
        counts += torch.bincount(torch.tensor(draw), minlength=N)
    pi = m * s.probabilities
    assert abs(float(s.probabilities.sum()) - 1) < 1e-12 and float(pi.max()) <= 1 + 1e-12
    assert (pi == 1).sum() >= 5                      # the high scores are capped at certainty
    # binomial standard error per example: 5 sigma
    se = (pi * (1 - pi) / epochs).sqrt()
    assert torch.all((counts / epochs - pi).abs() <= 5 * se + 1e-9)
    # uncapped examples keep the proportions of (1 - eps) S / sum S + eps / N
    free = pi < 1
    target = 0.9 * S.double() / S.sum() + 0.1 / N
    ratio = s.probabilities[free] / target[free]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    torch.testing.assert_close(s.weights(torch.arange(N)).double(), 1 / (N * s.probabilities), rtol=1e-6, atol=0)


@pytest.mark.parametrize("replacement, world_size", [(True, 1), (False, 1), (False, 2), (True, 2)])
def test_every_position_of_the_epoch_is_drawn_from_p(replacement, world_size):
    """Unbiased *minibatches* need more than unbiased epochs: each position j of the epoch must
    hold example i with probability p_i. Chi-square per position (first, middle, last; with two
    ranks, each rank's first and the padded last) over many epochs. Catches the systematic
    draw left in its own order, where a sure example's place depends on its inclusion
    probability (epoch-average frequencies are right there, per-position ones are not)."""
    N, ratio, epochs = 8, 0.375, 12000                 # m = 5: two ranks need one padded draw
    S = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.2, 0.2, 3.0, 0.5])
    ranks = [SADPSampler(N, ratio, seed=3, epsilon=0.1, replacement=replacement,
                         rank=r, world_size=world_size) for r in range(world_size)]
    for s in ranks:
        s.update(torch.arange(N), S)
    # (rank, position in that rank's share): with 2 ranks, rank 1's last is the padding draw
    where = [(0, 0), (0, 2), (0, 4)] if world_size == 1 else [(0, 0), (1, 0), (0, 2), (1, 2)]
    counts = torch.zeros(len(where), N, dtype=torch.float64)
    for e in range(epochs):
        shares = []
        for s in ranks:
            s.set_epoch(e)
            shares.append(list(s))
        for k, (r, j) in enumerate(where):
            counts[k, shares[r][j]] += 1
    p = ranks[0].probabilities
    crit = 40.52   # chi-square quantile 1 - 1e-6 at 7 degrees of freedom
    for k in range(len(where)):
        chi2 = float(((counts[k] - epochs * p) ** 2 / (epochs * p)).sum())
        assert chi2 < crit, (where[k], chi2, (counts[k] / epochs).tolist(), p.tolist())


def test_uniform_without_replacement_is_a_plain_random_subset():
    s = SADPSampler(100, 0.3, epsilon=1.0, replacement=False)
    s.update(torch.arange(100), torch.rand(100))
    s.set_epoch(0)
    draw = list(s)
    assert len(set(draw)) == 70
    torch.testing.assert_close(s.weights(torch.tensor(draw)), torch.ones(70))


class TinySNN(torch.nn.Module):
    """x -> linear -> spikes (hard threshold, straight-through surrogate) -> linear head."""

    def __init__(self, d_in=6, d_hidden=8, classes=3, T=3):
        super().__init__()
        self.T = T
        self.fc1 = torch.nn.Linear(d_in, d_hidden).double()
        self.head = torch.nn.Linear(d_hidden, classes).double()

    def forward(self, x):
        u = torch.stack([self.fc1(x) * (t + 1) / self.T for t in range(self.T)])   # [T, B, H]
        spikes = (u > 0).double() + torch.sigmoid(u) - torch.sigmoid(u).detach()
        return self.head(spikes), spikes


@pytest.mark.parametrize("per_timestep, replacement", [(False, True), (True, True), (False, False)])
def test_weighted_gradient_is_unbiased_for_the_full_data_gradient(per_timestep, replacement):
    """sum_i p_i grad(w_i l_i) == (1/N) sum_i grad l_i, for all model parameters, to float64
    tolerance. Catches any weight or loss-scaling mistake: 1/p instead of 1/(N p), weights
    normalised inside the batch, the wrong p frozen, a loss mean over the wrong axis."""
    torch.manual_seed(0)
    N = 12
    model = TinySNN()
    x, y = torch.randn(N, 6, dtype=torch.float64), torch.randint(0, 3, (N,))
    s = SADPSampler(N, ratio=0.5, epsilon=0.3, replacement=replacement)
    s.update(torch.arange(N), torch.rand(N) * 4)
    s.set_epoch(0)
    params = list(model.parameters())

    def grad_of(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    outputs, spikes = model(x)
    full, _ = spike_aware_loss(outputs, y, spikes, per_timestep=per_timestep)
    full_grad = grad_of(full)
    estimate = torch.zeros_like(full_grad)
    for i in range(N):
        outputs, spikes = model(x[i:i + 1])
        loss, _ = spike_aware_loss(outputs, y[i:i + 1], spikes, s.weights([i]),
                                   per_timestep=per_timestep)
        estimate += s.probabilities[i] * grad_of(loss)
    torch.testing.assert_close(estimate, full_grad, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Variance: the reason for the method
# ---------------------------------------------------------------------------------------------

def estimator_variance(G: torch.Tensor, p: torch.Tensor, m: int = 1) -> float:
    """Closed form: trace of Cov of (1/m) sum_j w_{i_j} g_{i_j}, i_j ~ p i.i.d., w = 1/(N p):
    (sum_i ||g_i||^2 / (N^2 p_i) - ||mean g||^2) / m. Rows of G are per-example gradients."""
    N = G.shape[0]
    return float((G.square().sum(1) / (N * N * p)).sum() - G.mean(0).square().sum()) / m


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.5, 1.0, 2.0]))
def test_importance_sampling_by_true_norm_beats_uniform(seed, spread):
    """With p proportional to the true per-example gradient norms, the sampler's weighted
    estimator has lower variance than uniform sampling (closed form), and a Monte Carlo run of
    the sampler itself agrees with the closed form and is unbiased. Catches: weights that do
    not undo p, or a sampler whose p is not the one it draws from."""
    g = torch.Generator().manual_seed(seed)
    N, P, ratio = 40, 5, 0.5
    # heavy-tailed norms: a few examples carry most of the gradient, as late in training
    grads = torch.randn(N, P, generator=g, dtype=torch.float64) \
        * torch.exp(spread * torch.randn(N, 1, generator=g, dtype=torch.float64))
    norms = grads.norm(dim=1)
    is_ = SADPSampler(N, ratio, seed=seed, epsilon=1e-3, replacement=True)
    is_.update(torch.arange(N), norms)
    uni = SADPSampler(N, ratio, seed=seed, epsilon=1.0, replacement=True)
    is_.set_epoch(0)
    uni.set_epoch(0)
    m = len(is_)
    v_is = estimator_variance(grads, is_.probabilities, m)
    v_uni = estimator_variance(grads, uni.probabilities, m)
    assert v_is < v_uni
    # the oracle minimises the second moment: any other p (here, p ~ squared norms) is worse
    p_sq = norms**2 / (norms**2).sum()
    assert v_is <= estimator_variance(grads, 0.999 * p_sq + 0.001 / N, m) * (1 + 1e-9)

    # Monte Carlo with the sampler's own draws and weights
    estimates = []
    for e in range(400):
        is_.set_epoch(e)
        idx = torch.tensor(list(is_))
        estimates.append((is_.weights(idx).double()[:, None] * grads[idx]).mean(0))
    est = torch.stack(estimates)
    mc_var = float(est.var(0).sum())
    assert 0.7 * v_is < mc_var < 1.4 * v_is
    se = est.std(0) / math.sqrt(len(estimates))
    assert torch.all((est.mean(0) - grads.mean(0)).abs() < 5 * se + 1e-12)


# ---------------------------------------------------------------------------------------------
# The sampler's budget, determinism, resume and guarantees on p
# ---------------------------------------------------------------------------------------------

@PROPERTY
@given(st.integers(1, 500), st.floats(0, 0.99), st.integers(0, 10**6))
def test_budget_is_round_one_minus_r_times_n(N, ratio, seed):
    m = round((1 - ratio) * N)
    if m < 1:
        with pytest.raises(ValueError, match="ratio"):
            SADPSampler(N, ratio)
        return
    s = SADPSampler(N, ratio, seed=seed)
    s.set_epoch(0)
    draw = list(s)
    assert len(s) == m == len(draw)
    assert all(0 <= i < N for i in draw)


def test_ratio_zero_is_plain_full_data_training():
    s = SADPSampler(50, 0.0, seed=1)
    s.update(torch.arange(50), torch.rand(50))      # scores must not matter
    s.set_epoch(3)
    draw = list(s)
    assert sorted(draw) == list(range(50)) and draw != list(range(50))
    assert torch.equal(s.weights(torch.arange(50)), torch.ones(50))


def test_same_seed_same_draws_other_seed_or_epoch_other_draws():
    def draws(seed, epoch):
        s = SADPSampler(1000, 0.3, seed=seed)
        s.update(torch.arange(0, 1000, 2), torch.rand(500, generator=torch.Generator().manual_seed(0)))
        s.set_epoch(epoch)
        return list(s)
    assert draws(0, 1) == draws(0, 1)
    assert draws(0, 1) != draws(1, 1)
    assert draws(0, 1) != draws(0, 2)
    with pytest.raises(RuntimeError, match=r"call set_epoch\(epoch\) first"):
        list(SADPSampler(10, 0.2))                  # no silent epoch 0: the draw must be asked for
    with pytest.raises(RuntimeError, match=r"call set_epoch\(epoch\) first"):
        SADPSampler(10, 0.2).weights([0])


def test_iterating_twice_gives_the_frozen_draw_and_updates_wait_for_next_epoch():
    s = SADPSampler(100, 0.5)
    s.set_epoch(0)
    first, p = list(s), s.probabilities.clone()
    s.update(torch.arange(100), torch.arange(100.0) + 1)
    assert list(s) == first and torch.equal(s.probabilities, p)
    s.set_epoch(1)
    assert not torch.equal(s.probabilities, p)


def test_state_dict_round_trip_gives_identical_draws():
    """Catches: a state that forgets the scores, the seen mask, or the frozen epoch."""
    g = torch.Generator().manual_seed(0)
    a = SADPSampler(200, 0.4, seed=3, epsilon=0.05)
    for e in range(3):
        a.set_epoch(e)
        idx = torch.tensor(list(a))
        a.update(idx, torch.rand(len(idx), generator=g))
    b = SADPSampler(200, 0.4, seed=3, epsilon=0.05)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)                        # mid-epoch: same frozen draw and weights
    torch.testing.assert_close(a.weights(torch.arange(200)), b.weights(torch.arange(200)))
    for e in range(3, 6):
        a.set_epoch(e)
        b.set_epoch(e)
        assert list(a) == list(b)
        assert torch.equal(a.probabilities, b.probabilities)
        idx = torch.tensor(list(a))
        new = torch.rand(len(idx), generator=g)
        a.update(idx, new)
        b.update(idx, new)
    with pytest.raises(ValueError, match="seed"):
        SADPSampler(200, 0.4, seed=4, epsilon=0.05).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="num_examples"):
        SADPSampler(201, 0.4, seed=3, epsilon=0.05).load_state_dict(a.state_dict())


score_tables = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-300, 1e300), st.floats(0, 10)), min_size=1, max_size=60)


@PROPERTY
@given(score_tables, st.floats(1e-6, 1.0), st.integers(0, 3))
def test_probabilities_are_positive_finite_and_sum_to_one(scores, epsilon, skip):
    """Zeros, 1e-300 and 1e300 scores, unseen examples: p stays a valid distribution and every
    weight is at most 1/eps. Catches: overflow in the sum, a zero score starving an example."""
    N = len(scores)
    s = SADPSampler(N, 0.0 if N == 1 else 0.5, epsilon=epsilon, replacement=True)
    seen = torch.arange(0, N, 1 + skip)
    s.update(seen, torch.tensor(scores, dtype=torch.float64)[seen])
    s.set_epoch(0)
    p = s.probabilities
    assert torch.isfinite(p).all() and (p > 0).all()
    assert abs(float(p.sum()) - 1.0) < 1e-12
    assert float(s.weights(torch.arange(N)).max()) <= 1 / epsilon * (1 + 1e-6)


def test_probabilities_follow_the_formula_at_the_edges_of_float64():
    """Scores near the largest double: the sum would overflow without rescaling."""
    s = SADPSampler(3, 0.5, epsilon=0.3, replacement=True)
    s.update([0, 1, 2], [1e308, 1e308, 0.0])
    s.set_epoch(0)
    torch.testing.assert_close(s.probabilities, torch.tensor([0.35 + 0.1, 0.35 + 0.1, 0.1], dtype=torch.float64))


def test_unseen_examples_get_the_mean_score_without_overflow():
    """Unseen examples are scored at the mean of the seen ones. Two scores of 1e308 overflowed
    that mean to inf, and set_epoch failed with "cannot convert float NaN to integer"."""
    s = SADPSampler(4, 0.5, epsilon=1e-9, replacement=True)
    s.update([0, 1], [1.0, 3.0])
    s.set_epoch(0)
    torch.testing.assert_close(s.probabilities, torch.tensor([1, 3, 2, 2], dtype=torch.float64) / 8)
    s = SADPSampler(4, 0.5, epsilon=0.2)
    s.update([0, 1], [1e308, 1e308])
    s.set_epoch(0)
    torch.testing.assert_close(s.probabilities, torch.full((4,), 0.25, dtype=torch.float64))
    assert len(set(s)) == 2


def test_sampler_works_with_a_dataloader_and_withindex():
    data = torch.utils.data.TensorDataset(torch.arange(30.0), torch.arange(30) % 3)
    s = SADPSampler(30, 0.3, seed=0)
    loader = torch.utils.data.DataLoader(WithIndex(data), batch_size=8, sampler=s)
    s.set_epoch(0)
    seen = []
    for x, y, idx in loader:
        assert torch.equal(x, idx.float()) and torch.equal(y, idx % 3)
        seen += idx.tolist()
    assert seen == list(s) and len(seen) == 21


# ---------------------------------------------------------------------------------------------
# Error paths
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=10, ratio=1.0), "ratio"),
    (dict(num_examples=10, ratio=-0.1), "ratio"),
    (dict(num_examples=10, ratio=float("nan")), "ratio"),
    (dict(num_examples=0, ratio=0.3), "num_examples"),
    (dict(num_examples=-5, ratio=0.3), "num_examples"),
    (dict(num_examples=2.5, ratio=0.3), "num_examples"),
    (dict(num_examples=1, ratio=0.6), "ratio"),
    (dict(num_examples=10, ratio=0.3, epsilon=0.0), "epsilon"),
    (dict(num_examples=10, ratio=0.3, epsilon=1.5), "epsilon"),
    (dict(num_examples=10, ratio=0.3, rank=2, world_size=2), "rank"),
])
def test_sampler_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SADPSampler(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_update_rejects_bad_scores_and_leaves_table_unchanged(bad):
    s = SADPSampler(5, 0.2)
    s.update([0, 1, 2], [1.0, 2.0, 3.0])
    before = s.state_dict()
    with pytest.raises(ValueError, match="non-finite or negative"):
        s.update([3, 4], [1.0, bad])
    assert torch.equal(s.scores, before["scores"]) and torch.equal(s.seen, before["seen"])


def test_update_rejects_bad_indices():
    s = SADPSampler(5, 0.2)
    with pytest.raises(ValueError, match="outside"):
        s.update([5], [1.0])
    with pytest.raises(ValueError, match="one score per index"):
        s.update([0, 1], [1.0])


@pytest.mark.parametrize("change, match", [
    (lambda o, y, h, w: (o[0], y, h, w), "outputs"),
    (lambda o, y, h, w: (o.long(), y, h, w), "outputs"),
    (lambda o, y, h, w: (o, y[:-1], h, w), "targets"),
    (lambda o, y, h, w: (o, y.float(), h, w), "targets"),
    (lambda o, y, h, w: (o, y, h[:-1], w), "head_inputs"),
    (lambda o, y, h, w: (o, y, h.flatten(0, 1), w), "head_inputs"),
    (lambda o, y, h, w: (o, y, h, w[:-1]), "weights"),
])
def test_spike_aware_loss_rejects_mismatched_inputs(change, match):
    o, y, h, w = torch.randn(3, 4, 5), torch.tensor([0, 1, 2, 4]), torch.ones(3, 4, 7), torch.ones(4)
    with pytest.raises(ValueError, match=match):
        spike_aware_loss(*change(o, y, h, w))


@pytest.mark.parametrize("shift", [5, -5])
def test_out_of_range_targets_fail_loudly_on_the_cpu(shift):
    """Targets are not range-checked in the loss (that is a host sync per step); the docstring
    promises that scatter_ still refuses them on the CPU instead of training on garbage."""
    o, y, h = torch.randn(3, 4, 5), torch.tensor([0, 1, 2, 4]), torch.ones(3, 4, 7)
    with pytest.raises(RuntimeError, match="out of bounds"):
        spike_aware_loss(o, y + shift, h)


@pytest.mark.parametrize("exact, per_timestep", [(False, False), (True, False), (False, True)])
def test_spike_aware_loss_reads_no_tensor_value_on_the_host(exact, per_timestep, count_host_syncs):
    """On a GPU each such read stalls the CPU until the queued kernels finish. The loss used to
    check the targets' range and the weights' finiteness this way: two syncs per step."""
    o = torch.randn(3, 4, 5, requires_grad=True)
    y, h, w = torch.tensor([0, 1, 2, 4]), (torch.rand(3, 4, 7) < 0.3).float(), torch.rand(4) + 0.5
    with count_host_syncs() as syncs:
        loss, scores = spike_aware_loss(o, y, h, w, exact=exact, per_timestep=per_timestep,
                                        label_smoothing=0.1)
        loss.backward()
    assert syncs.count == 0
    with count_host_syncs() as syncs:
        torch.tensor(1.0).item()                     # the counter counts
    assert syncs.count == 1


# ---------------------------------------------------------------------------------------------
# HeadTap
# ---------------------------------------------------------------------------------------------

def test_head_tap_gives_the_same_tensors_for_every_layout():
    """[T, B, D] in one call, merged [T*B, D] in one call, or T calls of [B, D]."""
    torch.manual_seed(0)
    T, B, D, C = 4, 3, 6, 5
    head = torch.nn.Linear(D, C)
    spikes = (torch.rand(T, B, D) < 0.4).float()
    results = []
    with HeadTap(head, T=T) as tap:
        head(spikes)
        results.append(tap.pop())
        head(spikes.flatten(0, 1))
        results.append(tap.pop())
        for t in range(T):
            head(spikes[t])
        results.append(tap.pop())
    for outputs, head_inputs in results:
        assert outputs.shape == (T, B, C)
        torch.testing.assert_close(head_inputs, spikes)
        torch.testing.assert_close(outputs, results[0][0])
    y = torch.tensor([0, 1, 4])
    loss, _ = spike_aware_loss(*results[1][:1], y, results[1][1])
    loss.backward()                                  # the tapped outputs carry the graph
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_head_tap_errors_and_removal():
    head = torch.nn.Linear(4, 2)
    tap = HeadTap(head, T=3)
    with pytest.raises(RuntimeError, match="not called"):
        tap.pop()
    head(torch.ones(5, 4))                           # 5 is not T*B for T = 3
    with pytest.raises(RuntimeError, match="T=3"):
        tap.pop()
    tap.remove()
    head(torch.ones(6, 4))
    with pytest.raises(RuntimeError, match="not called"):
        tap.pop()


# ---------------------------------------------------------------------------------------------
# Issue 12, defect 8: edge cases that were silent or gave the wrong error
# ---------------------------------------------------------------------------------------------

def _drawn_sampler(N=10):
    s = SADPSampler(N, 0.3, seed=0)
    s.set_epoch(0)
    return s


@pytest.mark.parametrize("call, match", [
    (lambda s: s.weights([-1]), r"outside \[0, 10\)"),          # was: the last example's weight
    (lambda s: s.weights([10]), r"outside \[0, 10\)"),          # was: a raw IndexError
    (lambda s: s.weights(torch.tensor([1.7])), "integer"),
    (lambda s: s.update(torch.tensor([1.7]), torch.tensor([1.0])), "integer"),  # was: 1.7 -> 1
    (lambda s: s.update([1.7], [1.0]), "integer"),
])
def test_sampler_rejects_bad_indices(call, match):
    with pytest.raises(ValueError, match=match):
        call(_drawn_sampler())


@pytest.mark.parametrize("change, match", [
    (lambda st: st.pop("scores"), "lacks"),
    (lambda st: st.__setitem__("epoch_ratio", 0.3), "epoch_ratio"),     # an older version's state
    (lambda st: st.__setitem__("world_size", 2), "number of processes"),
    (lambda st: st.__setitem__("epoch", "3"), "epoch"),
    (lambda st: st.__setitem__("scores", torch.full((10,), float("nan"), dtype=torch.float64)), "NaN"),
    (lambda st: st.__setitem__("scores", torch.zeros(9, dtype=torch.float64)), "length 9"),
    (lambda st: st.__setitem__("seen", torch.zeros(10)), "seen"),
    (lambda st: st.__setitem__("probabilities", st["probabilities"] * float("nan")), "probabilities"),
    (lambda st: st.__setitem__("draw", st["draw"] + 100), "draw"),
])
def test_load_state_dict_validates_what_it_loads(change, match):
    """NaN scores silently gave a uniform p, a wrong length failed later, a missing key was a
    KeyError."""
    state = _drawn_sampler().state_dict()
    change(state)
    fresh = SADPSampler(10, 0.3, seed=0)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.epoch is None                      # nothing was loaded


def test_numpy_numbers_are_accepted_for_num_examples_and_ratio():
    np = pytest.importorskip("numpy")
    a = SADPSampler(np.int64(100), np.float32(0.25), seed=1)
    b = SADPSampler(100, 0.25, seed=1)
    a.set_epoch(0), b.set_epoch(0)
    assert list(a) == list(b) and isinstance(a.num_examples, int)


def test_head_tap_holds_one_forward_and_says_when_forwards_were_not_popped():
    """Un-popped calls piled up (145 MB after 1000 evaluation passes); four un-popped calls gave
    a misleading shape error; with T omitted a doubled stack silently became T = 8. Evaluation
    under no_grad, as the README's loop does it, is not recorded at all: it needs no pop."""
    head = torch.nn.Linear(6, 3)
    tap = HeadTap(head, T=4)
    with torch.no_grad():
        for _ in range(50):                          # evaluation passes that never pop
            head(torch.ones(4, 2, 6))
    assert len(tap._calls) == 0
    with pytest.raises(RuntimeError, match="not called with gradients enabled"):
        tap.pop()
    for _ in range(50):                              # training forwards that never pop
        head(torch.ones(4, 2, 6))
    assert len(tap._calls) == 1                      # bounded: one forward's worth
    with pytest.raises(RuntimeError, match="called 50 times since the last pop"):
        tap.pop()
    for _ in range(2 * 4):                           # two step-by-step forwards, one pop
        head(torch.ones(2, 6))
    assert len(tap._calls) == 4
    with pytest.raises(RuntimeError, match="called 8 times.*T=4 times"):
        tap.pop()
    for _ in range(4):                               # one step-by-step forward: fine
        head(torch.ones(2, 6))
    assert tap.pop()[0].shape == (4, 2, 3)

    head2 = torch.nn.Linear(6, 3)
    tap2 = HeadTap(head2)                            # T omitted: one call is one forward
    for _ in range(8):
        head2(torch.ones(2, 6))
    with pytest.raises(RuntimeError, match="pass T to HeadTap"):
        tap2.pop()                                   # never a silent T = 8
    head2(torch.ones(2, 6))
    assert tap2.pop()[0].shape == (1, 2, 3)


def test_head_tap_reads_a_head_called_with_a_keyword_argument():
    """head(input=x) made the hook fail with IndexError (no positional argument)."""
    head = torch.nn.Linear(6, 3)
    tap = HeadTap(head, T=2)
    x = torch.rand(2, 5, 6)
    head(input=x)
    outputs, head_inputs = tap.pop()
    assert torch.equal(head_inputs, x) and outputs.shape == (2, 5, 3)
