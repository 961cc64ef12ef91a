"""Tests for netbound.py: the whole-network bound over every conv and linear layer dominates
each layer's true per-example gradient norm, is exact where it should be, and is read off the
backward pass in every layout a spiking network calls its layers in."""

import pytest
import torch
import torch.nn.functional as F

import models
from netbound import NetworkTap
from sadp import HeadTap, spike_aware_loss


class TapNet(torch.nn.Module):
    """A stem applied once to [B, ...] and repeated over T, a MultiStep layer on the merged
    [T*B, ...], a Linear head on [T, B, D]: the three layouts NetworkTap must read.
    conv=True: Conv2d stem (k3, bias) + BN, Conv2d k3 stride 2 (c = 4, bias) + BN.
    conv=False: Linear stem (bias), Linear hidden layer (no bias), no BN: every term exact at T=1."""

    def __init__(self, T, conv):
        super().__init__()
        torch.manual_seed(0)
        self.T = T
        lif = dict(compile=False)
        if conv:
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
            self.hidden = models.MultiStep(torch.nn.Conv2d(4, 4, 3, 2, padding=1), torch.nn.BatchNorm2d(4))
            self.classifier = torch.nn.Linear(4 * 3 * 3, 5)
        else:
            self.stem = torch.nn.Linear(6, 8)
            self.hidden = models.MultiStep(torch.nn.Linear(8, 8, bias=False))
            self.classifier = torch.nn.Linear(8, 5)
        self.lif1, self.lif2 = models.LIF(**lif), models.LIF(**lif)

    def forward(self, x):
        s = self.stem(x)
        s = self.lif1(s.unsqueeze(0).expand(self.T, *s.shape) * 3.0)   # [T, B, ...] spikes
        s = self.lif2(self.hidden(s) * 6.0)
        return self.classifier(s.flatten(2))                            # [T, B, 5]


def tapped_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NetworkTap.LAYERS)}


def per_example_layer_norms(model, x, y):
    """{layer: [B]} ||dl_b / d(W_l, b_l)||_F by autograd, one example at a time (BN in eval mode,
    so an example's gradient does not depend on the rest of the batch)."""
    layers = tapped_layers(model)
    norms = {n: [] for n in layers}
    for i in range(len(x)):
        ell = F.cross_entropy(model(x[i:i + 1]).mean(0), y[i:i + 1])
        for n, m in layers.items():
            params = list(m.parameters())
            grads = torch.autograd.grad(ell, params, retain_graph=True)
            norms[n].append(torch.sqrt(sum(g.square().sum() for g in grads)))
    return {n: torch.stack(v) for n, v in norms.items()}


def network_bounds(model, x, y, w, T):
    """Per-layer S_l from one weighted batch backward read by a NetworkTap, and the head bound."""
    tap, head = NetworkTap(model, T=T), HeadTap(model.classifier, T=T)
    try:
        model(x)
        outputs, head_inputs = head.pop()
        loss, head_scores = spike_aware_loss(outputs, y, head_inputs, w)
        loss.backward()
        return tap.pop(w, per_layer=True), head_scores
    finally:
        tap.remove()
        head.remove()


def spiking_inputs(model, B, shape, seed):
    """Inputs, labels and non-uniform weights, float64, BN in eval mode; every LIF must fire."""
    g = torch.Generator().manual_seed(seed)
    model.double().eval()
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, 5, (B,), generator=g)
    w = torch.rand(B, generator=g, dtype=torch.float64) * 3 + 0.2    # w_b / B far from 1
    with torch.no_grad():
        model(x)
    rates = [float(m.last_rate) for m in model.modules() if isinstance(m, models.LIF)]
    assert all(r > 0.01 for r in rates), f"a silent layer makes the test vacuous: rates {rates}"
    return x, y, w


def conv1d_net(T):
    """The MNIST-1D network, its BN scales raised so that every layer fires on random inputs."""
    torch.manual_seed(0)
    model = models.SpikingConv1d(5, T=T, compile=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            torch.nn.init.constant_(m.weight, 4.0)
    return model


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("net", ["tapnet-conv", "conv1d", "conv1d-sequence"])
def test_network_bound_dominates_each_layers_per_example_gradient(net, T):
    """S_l >= ||dl_b/d(W_l, b_l)|| for every layer and example, and S_net >= the norm over all of
    them, with non-uniform weights w (so the w_b / B the backward pass carries must be divided
    out exactly). Shown to catch: multiplying by w_b / B instead of dividing, and dividing by
    w_b alone (off by B); both fail at every layer. (c_l and the bias's P are too loose to show
    here: the constant-input test below catches those.) conv1d-sequence: one input per step,
    so the stem runs on the merged [T*B, ...] rows."""
    model = TapNet(T, conv=True) if net == "tapnet-conv" else conv1d_net(T)
    shape = {"tapnet-conv": (2, 5, 5), "conv1d": (1, 40), "conv1d-sequence": (T, 1, 40)}[net]
    x, y, w = spiking_inputs(model, 6, shape, seed=T)
    bounds, _ = network_bounds(model, x, y, w, T)
    truth = per_example_layer_norms(model, x, y)
    assert set(bounds) == set(truth) == set(tapped_layers(model))
    for name in truth:
        assert bool((truth[name] > 0).any()), f"{name}: no gradient, the test would be vacuous"
        assert torch.all(bounds[name] >= truth[name] * (1 - 1e-9)), (name, bounds[name], truth[name])
    S_net = torch.stack(list(bounds.values())).square().sum(0).sqrt()
    G_net = torch.stack(list(truth.values())).square().sum(0).sqrt()
    assert torch.all(S_net >= G_net * (1 - 1e-9))


@pytest.mark.parametrize("T", [1, 3])
def test_network_bound_is_exact_for_one_linear_step(T):
    """A linear layer applied once to one position has gradient delta [a; 1]^T, whose norm is
    exactly ||delta|| sqrt(||a||^2 + 1): the bound is an equality there. That holds for every
    layer at T = 1, and for the stem (applied once, then repeated) at any T. Shown to catch:
    dividing by w_b only (off by B), summing the stem over T steps (off by T at T = 3), a bias
    term for a layer without bias."""
    model = TapNet(T, conv=False)
    x, y, w = spiking_inputs(model, 5, (6,), seed=10 + T)
    bounds, head_scores = network_bounds(model, x, y, w, T)
    truth = per_example_layer_norms(model, x, y)
    exact = list(truth) if T == 1 else ["stem"]
    for name in exact:
        torch.testing.assert_close(bounds[name], truth[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bounds["classifier"], head_scores.double(), rtol=1e-6, atol=1e-9)


def test_network_tap_head_term_is_the_head_bound_and_scores_are_net():
    """The classifier's S_l is the head bound (same inequality, same +1), and pop() without
    per_layer is sqrt(sum_l S_l^2). Shown to catch: a bias-free fold (no +1) for the head.
    (The other errors of the multiplier fail here too; see the tests above.)"""
    model = conv1d_net(3)
    x, y, w = spiking_inputs(model, 4, (1, 40), seed=0)
    tap, head = NetworkTap(model, T=3), HeadTap(model.classifier, T=3)
    for per_layer in (True, False):
        model(x)
        outputs, head_inputs = head.pop()
        loss, head_scores = spike_aware_loss(outputs, y, head_inputs, w)
        loss.backward()
        result = tap.pop(w, per_layer=per_layer)
        if per_layer:
            bounds = result
            torch.testing.assert_close(bounds["classifier"], head_scores.double(), rtol=1e-6, atol=0)
        else:
            expected = torch.stack(list(bounds.values())).square().sum(0).sqrt()
            torch.testing.assert_close(result, expected)


def test_network_tap_errors_and_no_grad_forwards():
    """pop before backward, a weight of 0, a batch of the wrong size: each a clear error.
    A forward under no_grad (evaluation) records nothing."""
    model = TapNet(2, conv=False)
    tap = NetworkTap(model, T=2)
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="no layer ran with grad"):
        tap.pop(torch.ones(3))
    loss = F.cross_entropy(model(x).mean(0), y)
    with pytest.raises(RuntimeError, match="backward"):
        tap.pop(torch.ones(3))
    model(x).mean().backward()
    with pytest.raises(RuntimeError, match="neither"):
        tap.pop(torch.ones(4))
    F.cross_entropy(model(x).mean(0), y).backward()
    with pytest.raises(ValueError, match="> 0"):
        tap.pop(torch.tensor([1.0, 0.0, 1.0]))
    F.cross_entropy(model(x).mean(0), y).backward()
    with pytest.raises(ValueError, match="finite"):                 # was accepted: scores of 0
        tap.pop(torch.tensor([1.0, float("inf"), 1.0]))
    tap.remove()
    model(x).mean().backward()
    with pytest.raises(RuntimeError, match="no layer ran"):
        tap.pop(torch.ones(3))
    del loss
    with pytest.raises(ValueError, match="no Conv"):
        NetworkTap(torch.nn.ReLU(), T=1)


@pytest.mark.parametrize("dim, k, s, bias", [(1, 3, 1, False), (1, 3, 1, True), (1, 3, 2, False),
                                             (1, 5, 2, True), (1, 4, 2, True), (2, 3, 1, False),
                                             (2, 3, 2, True)])
def test_conv_bound_is_nearly_tight_for_constant_inputs_and_deltas(dim, k, s, bias):
    """All-ones input and delta: every patch is the same, so Cauchy-Schwarz is tight and each
    interior input element really lies in ceil(k/s)^d patches: S / ||grad|| is within 1.5
    (1.02 for stride 1). Shown to catch: c_l = 1 (S falls below the true norm), and the bias
    folded as +1 instead of +P (below as well); the random nets above are too loose for both."""
    L = 64 if dim == 1 else 24
    conv = (torch.nn.Conv1d if dim == 1 else torch.nn.Conv2d)(1, 1, k, s, bias=bias).double()
    tap = NetworkTap(conv, T=1)
    conv(torch.ones(1, 1, *[L] * dim, dtype=torch.float64)).sum().backward()   # delta = 1
    S = tap.pop(torch.ones(1, dtype=torch.float64))
    G = torch.sqrt(sum(p.grad.square().sum() for p in conv.parameters()))
    assert G <= S[0] <= G * (1.5 if s > 1 else 1.1)


def test_a_step_that_was_never_popped_does_not_leak_into_the_next():
    """Records of a forward + backward that nobody popped were kept, and the next pop summed
    two steps into one score per example."""
    model = TapNet(2, conv=False)
    x, y, w = torch.randn(3, 6), torch.tensor([0, 1, 2]), torch.ones(3)
    tap = NetworkTap(model, T=2)
    F.cross_entropy(model(x).mean(0), y).backward()
    once = tap.pop(w)
    F.cross_entropy(model(x).mean(0), y).backward()                 # not popped
    F.cross_entropy(model(x).mean(0), y).backward()
    torch.testing.assert_close(tap.pop(w), once)
