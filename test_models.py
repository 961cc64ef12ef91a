"""Tests for models.py: LIF semantics, surrogate gradients, compiled vs eager, the networks."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models import LIF, MODELS, build_model, set_compile, spike


@pytest.fixture(autouse=True)
def one_thread():
    """Runs each test with one intra-op thread, then restores the setting.

    The tensors here are small, so a second thread gains little; but with two OpenMP threads on
    two cores, any other busy process on the machine stalls every parallel op at its barrier,
    and this file then runs many times slower than with one thread.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lif_reference(xs, tau=2.0, v_threshold=1.0, v_reset=0.0):
    """The LIF equations on a list of Python floats, written straight from the spec."""
    v, out = v_reset, []
    for x in xs:
        v = v + (x - (v - v_reset)) / tau
        s = 1.0 if v >= v_threshold else 0.0
        v = v * (1 - s) + v_reset * s
        out.append(s)
    return out


def run_lif(x, **kw):
    """LIF over a [T] sequence of one neuron (T steps, batch 1) -> list of spikes."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)
    return LIF(compile=False, **kw)(x).flatten().tolist()


# ---------------------------------------------------------------------------------------------
# LIF semantics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, kw, expected", [
    # v: 0.75, 1.125 -> spike, reset to 0, 0.75, 1.125 -> spike
    (1.5, {}, [0, 1, 0, 1]),
    # v = 1.0 exactly at t=0: a neuron at threshold fires (H(0) = 1)
    (2.0, {}, [1, 1, 1, 1]),
    # v: 0.3, 0.45, 0.525, 0.5625 -> leaks towards 0.6 < 1, never fires
    (0.6, {}, [0, 0, 0, 0]),
    # tau = 4: v: 0.375, 0.65625, 0.8671875, 1.025390625 -> one spike at the end
    (1.5, {"tau": 4.0}, [0, 0, 0, 1]),
    # v_reset = -0.5: v: 0.75, 1.375 -> spike, reset to -0.5 (not 0), 0.75, 1.375 -> spike.
    # A reset to 0 would give v = 1.0 at t=2 and a spike there.
    (2.5, {"v_reset": -0.5}, [0, 1, 0, 1]),
    # v_threshold = 0.5: v: 0.4, 0.6 -> spike, 0.4, 0.6 -> spike
    (0.8, {"v_threshold": 0.5}, [0, 1, 0, 1]),
])
def test_lif_hand_worked(x, kw, expected):
    assert run_lif([x] * 4, **kw) == expected
    assert lif_reference([x] * 4, **kw) == expected   # the reference agrees with the hand


@settings(max_examples=60, deadline=None)
@given(xs=st.lists(st.floats(-1.0, 3.0), min_size=1, max_size=12),
       tau=st.floats(1.1, 5.0), v_threshold=st.floats(0.2, 2.0), v_reset=st.floats(-1.0, 0.1))
def test_lif_matches_reference(xs, tau, v_threshold, v_reset):
    kw = dict(tau=tau, v_threshold=v_threshold, v_reset=v_reset)
    assert run_lif(xs, **kw) == lif_reference(xs, **kw)


def test_lif_shapes_and_dtypes():
    lif = LIF(compile=False)
    for shape in [(3, 2), (3, 2, 5), (2, 2, 3, 4, 4)]:
        x = torch.randn(shape) * 2
        s = lif(x)
        assert s.shape == x.shape and s.dtype == x.dtype
        assert set(s.unique().tolist()) <= {0.0, 1.0}
    assert lif(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError):
        lif(torch.randn(5))
    with pytest.raises(ValueError):
        lif(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        LIF(surrogate="relu")


def test_bf16_input_uses_float32_membrane():
    # The membrane is float32 even for bf16 input: bf16 spikes equal the float32 computation on
    # the same (bf16-representable) values. A bf16 membrane rounds near the threshold and flips spikes.
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(8, 20000, generator=g) * 1.2 + 0.4).to(torch.bfloat16)
    lif = LIF(compile=False)
    s16 = lif(x)
    assert s16.dtype == torch.bfloat16
    assert torch.equal(s16.float(), lif(x.float()))


# ---------------------------------------------------------------------------------------------
# Surrogate gradients
# ---------------------------------------------------------------------------------------------

def atan_grad(x, a):
    return a / 2 / (1 + (math.pi / 2 * a * x) ** 2)


def sigmoid_grad(x, a):
    sg = torch.sigmoid(a * x)
    return a * sg * (1 - sg)


@pytest.mark.parametrize("name, alpha, expected_alpha, grad_fn", [
    ("atan", None, 2.0, atan_grad),
    ("atan", 3.0, 3.0, atan_grad),
    ("sigmoid", None, 4.0, sigmoid_grad),
    ("sigmoid", 1.5, 1.5, sigmoid_grad),
])
def test_surrogate_gradients(name, alpha, expected_alpha, grad_fn):
    x = torch.tensor([-1.0, -0.25, 0.0, 0.1, 0.7], dtype=torch.float64, requires_grad=True)
    s = spike(x, name, alpha)
    assert s.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    s.sum().backward()
    torch.testing.assert_close(x.grad, grad_fn(x.detach(), expected_alpha), rtol=1e-12, atol=0)

    # Through a LIF at T=1: v = x / tau, s = H(v - v_th), so ds/dx = g'(x / tau - v_th) / tau.
    tau, v_th = 2.0, 1.0
    x1 = torch.tensor([[0.5], [1.9], [2.0], [2.6]], dtype=torch.float64).T.requires_grad_()
    LIF(tau=tau, v_threshold=v_th, surrogate=name, alpha=alpha, compile=False)(x1).sum().backward()
    torch.testing.assert_close(x1.grad, grad_fn(x1.detach() / tau - v_th, expected_alpha) / tau,
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("detach_reset", [False, True])
def test_detach_reset_gradient(detach_reset):
    # Two steps of one neuron, x0 = x1 = 2.2, tau = 2, loss = s_1 (the second spike).
    # v_0 = 1.1 -> s_0 = 1, reset to 0; v_1 = 0 + 2.2 / 2 = 1.1 -> s_1 = 1. With g = g'(0.1):
    #   dL/dx1 = g / 2
    #   dL/dx0 = g * dv_1/dv_0r * dv_0r/dx0,  dv_1/dv_0r = 1 - 1/tau = 1/2,
    #   v_0r = v_0 (1 - s_0):  dv_0r/dx0 = (1 - s_0)/2 - v_0 * (g / 2) = -1.1 g / 2
    #   (the second term is the path through the reset, which detach_reset cuts).
    x = torch.tensor([[2.2], [2.2]], dtype=torch.float64, requires_grad=True)
    s = LIF(detach_reset=detach_reset, compile=False)(x)
    assert s.flatten().tolist() == [1.0, 1.0]
    s[1].sum().backward()
    g = atan_grad(torch.tensor(0.1, dtype=torch.float64), 2.0)
    expected_x0 = 0.0 if detach_reset else g * 0.5 * (-1.1 * g * 0.5)
    torch.testing.assert_close(x.grad.flatten(), torch.stack([torch.as_tensor(expected_x0).double(), g / 2]),
                               rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Compiled vs eager (the one test that compiles)
# ---------------------------------------------------------------------------------------------

# Importing torch's compiler stack trips a DeprecationWarning inside torch itself (torch.utils.mkldnn).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_matches_eager():
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(2)
    eager, compiled = LIF(compile=False), LIF(compile=True)
    graphs = None
    for shape in [(4, 2, 3, 5, 5), (4, 3, 7)]:   # a new batch and width must reuse the graph
        x = (torch.randn(shape, generator=g) * 1.5 + 0.5).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        w = torch.randn(shape, generator=g)          # a loss that weights every spike differently
        s_e, s_c = eager(x), compiled(x2)
        (s_e * w).sum().backward()
        (s_c * w).sum().backward()
        assert torch.equal(s_e, s_c)
        assert s_e.sum() > 0
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled.last_rate, s_e.mean())
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
        else:
            assert counters["stats"]["unique_graphs"] == graphs, "a new batch size recompiled"


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

# name, input shape of one example, what enters the classifier at that size: "binary" spikes,
# a "fraction" of spikes (spatial mean of binary spikes) or a "count" (SEW: sums of spikes; the
# last map is 1x1 at 32x32, so the pooled counts are integers). 32x32 keeps the ResNet-34s at
# about a second each (backward included) on one CPU thread.
NETS = [("resnet19", (3, 16, 16), "binary"), ("vgg11", (3, 32, 32), "binary"),
        ("convnet", (3, 32, 32), "fraction"), ("conv1d", (1, 40), "binary"),
        ("spiking_resnet34", (3, 32, 32), "binary"), ("sew_resnet34", (3, 32, 32), "count")]


def test_nets_cover_models():
    assert sorted(name for name, _, _ in NETS) == sorted(MODELS)   # a new model joins NETS


@pytest.mark.parametrize("name, shape, head", NETS)
def test_network_shapes_hook_and_backward(name, shape, head):
    torch.manual_seed(0)
    T, B, C = 2, 4, 5
    model = build_model(name, num_classes=C, T=T, compile=False)
    assert model.T == T and isinstance(model.classifier, torch.nn.Linear)

    seen, lif_out = {}, []
    model.classifier.register_forward_hook(lambda m, a, out: seen.update(h=a[0], o=out))
    for m in model.modules():
        if isinstance(m, LIF):
            m.register_forward_hook(lambda m, a, out: lif_out.append(out.detach()))

    out = model(torch.randn(B, *shape))
    assert out.shape == (T, B, C)
    h = seen["h"]
    assert h.shape == (T, B, model.classifier.in_features)
    assert seen["o"] is out
    assert h.min() >= 0                                  # what spike-aware pruning relies on
    assert h.max() > 0                                   # the head's inputs are not silent
    if head == "binary":
        assert set(h.unique().tolist()) == {0.0, 1.0}
    elif head == "fraction":
        assert h.max() <= 1
        assert not set(h.unique().tolist()) <= {0.0, 1.0}   # pooled: fractions of spikes
    else:                                                   # SEW: sums of spikes, 1 + 3 blocks
        assert torch.equal(h, h.round()) and 1 < h.max() <= 4

    rate = model.spike_rate()
    assert rate.dim() == 0 and not rate.requires_grad and rate.dtype == torch.float32
    assert 0 < rate.item() < 1
    all_spikes = torch.cat([s.flatten() for s in lif_out])
    torch.testing.assert_close(rate, all_spikes.mean())   # every LIF output, weighted by size

    F.cross_entropy(out.mean(0), torch.arange(B) % C).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.stem[0].weight.grad.abs().sum() > 0   # gradient reaches the first layer


def test_direct_encoding_runs_stem_once():
    model = build_model("convnet", num_classes=3, T=3, compile=False)
    calls, lif_in = [], []
    model.stem.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    model.features[0].register_forward_hook(lambda m, a, out: lif_in.append(a[0]))
    x = torch.randn(4, 3, 8, 8)
    model(x)
    assert calls == [x.shape]                           # once, on [B, 3, H, W]
    first = lif_in[0]
    assert first.shape[:2] == (3, 4)
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2])
    with pytest.raises(ValueError):
        model(torch.randn(3, 4, 3, 8, 8))                # a sequence of 4 steps, but T = 3


def test_build_model():
    assert set(MODELS) == {"resnet19", "vgg11", "convnet", "conv1d", "spiking_resnet34",
                           "sew_resnet34"}
    with pytest.raises(ValueError) as err:
        build_model("resnet18", num_classes=10)
    assert all(name in str(err.value) for name in MODELS)

    model = build_model("convnet", num_classes=7, T=3, surrogate="sigmoid", alpha=2.5,
                        detach_reset=True, tau=3.0)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert model.T == 3 and model.classifier.out_features == 7 and len(lifs) == 3
    assert all(m.use_compile and m.spike_fn is models.SigmoidSpike and m.alpha == 2.5
               and m.detach_reset and m.tau == 3.0 for m in lifs)
    set_compile(model, False)
    assert not any(m.use_compile for m in lifs)
    for name in MODELS:                                  # the flag reaches every LIF
        lifs = [m for m in build_model(name, 10, compile=False).modules() if isinstance(m, LIF)]
        assert lifs and not any(m.use_compile for m in lifs), name
    with pytest.raises(RuntimeError):
        model.spike_rate()                               # no forward yet
    with pytest.raises(ValueError):
        build_model("sew_resnet34", 10, stages=())


# ---------------------------------------------------------------------------------------------
# One input per timestep (event-camera frames, [B, T, 2, H, W])
# ---------------------------------------------------------------------------------------------

SEQUENCE_NETS = ["vgg11", "resnet19", "sew_resnet34"]


def calibrated_eval(model, x):
    """The model in eval mode, its BN statistics those of x: BN then treats every row alone (no
    coupling of steps through batch statistics), while the layers fire as in training."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None                            # running statistics := the batch's
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_sequence_input_gives_logits_and_gradients(name):
    torch.manual_seed(0)
    T, B, C = 3, 2, 5
    side = max(8, models.min_image_size(name))           # the smallest side, at 2 channels too
    model = build_model(name, num_classes=C, T=T, in_channels=2, compile=False)
    stem_rows = []
    model.stem.register_forward_hook(lambda m, a, out: stem_rows.append(a[0].shape[0]))
    out = model(torch.rand(B, T, 2, side, side) * 4)     # event counts per polarity
    assert out.shape == (T, B, C) and out.mean(0).shape == (B, C)
    assert stem_rows == [T * B]                          # the stem runs on every step
    F.cross_entropy(out.mean(0), torch.arange(B) % C).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_each_step_of_a_sequence_drives_its_own_and_later_outputs(name):
    """Changing frame t changes the logits from step t on (the last frame: the last step's) and
    leaves the earlier steps as they were: the steps are neither collapsed nor shifted. (Not
    always step t itself: a deep network's head can still be silent at the first steps.)"""
    torch.manual_seed(0)
    T, B = 3, 2
    side = models.min_image_size(name)
    x = torch.rand(B, T, 2, side, side) * 4
    model = calibrated_eval(build_model(name, num_classes=5, T=T, in_channels=2, compile=False), x)
    with torch.no_grad():
        base = model(x)
        for t in range(T):
            x2 = x.clone()
            x2[:, t] = torch.rand(B, 2, side, side) * 4
            out = model(x2)
            assert torch.equal(out[:t], base[:t]), t
            assert not torch.equal(out[t:], base[t:]), t


def test_a_sequence_of_one_repeated_frame_is_direct_encoding():
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=5, T=3, in_channels=2, compile=False)
    x = torch.rand(4, 2, 8, 8) * 4
    static = model(x)
    assert static.shape == (3, 4, 5)
    torch.testing.assert_close(model(x.unsqueeze(1).expand(4, 3, 2, 8, 8)), static)


def test_sequence_of_another_length_or_wrong_rank_is_refused():
    model = build_model("convnet", num_classes=5, T=4, in_channels=2, compile=False)
    with pytest.raises(ValueError, match=r"3 steps.*T=4"):
        model(torch.rand(2, 3, 2, 8, 8))
    for shape in [(2, 8, 8), (1, 2, 4, 2, 8, 8)]:
        with pytest.raises(ValueError, match=r"\[B, C, H, W\] or sequences shaped \[B, T, C, H, W\]"):
            model(torch.rand(shape))
    with pytest.raises(ValueError, match=r"\[B, C, L\]"):
        build_model("conv1d", num_classes=5, T=4, compile=False)(torch.rand(2, 40))


@pytest.mark.parametrize("name", [name for name in MODELS if name != "conv1d"])
def test_min_image_size_is_the_smallest_side_every_stride_2_layer_halves(name):
    side = models.min_image_size(name)
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, T=2, compile=False)
    sides = []                                   # the input side of every stride-2 conv and pool
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d)) and m.stride in (2, (2, 2)):
            m.register_forward_pre_hook(lambda m, a: sides.append(a[0].shape[-1]))
    out = model(torch.randn(2, 3, side, side))
    F.cross_entropy(out.mean(0), torch.arange(2)).backward()
    assert torch.isfinite(out).all() and min(sides) >= 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    sides.clear()
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, side - 1, side - 1))
    except RuntimeError:                         # the VGGs: a 2x2 pool of a 1x1 map
        return
    assert min(sides) == 1                       # the ResNets: a stride-2 conv on a 1x1 map


def test_min_image_size_refuses_what_takes_no_images():
    for name in ("conv1d", "resnet18"):
        with pytest.raises(ValueError, match="image networks are"):
            models.min_image_size(name)


def test_convnet_learns_synthetic_task():
    # Four classes, each a fixed random image plus noise: a few dozen full-batch steps must fit it.
    torch.manual_seed(0)
    K, N = 4, 32
    templates = torch.randn(K, 3, 16, 16)
    y = torch.arange(N) % K
    x = templates[y] + 0.5 * torch.randn(N, 3, 16, 16)
    model = build_model("convnet", num_classes=K, T=2, compile=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).mean(0), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    model.eval()
    with torch.no_grad():
        assert (model(x).mean(0).argmax(1) == y).float().mean() >= 0.9


# ---------------------------------------------------------------------------------------------
# The ImageNet ResNet-34s
# ---------------------------------------------------------------------------------------------

def resnet34_parameters(num_classes):
    """torchvision's ResNet-34 counted by hand: bias-free convs, BN (weight + bias), FC."""
    n = 3 * 64 * 7 * 7 + 2 * 64                                       # stem
    c_in = 64
    for c, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            n += 9 * (c_in + c) * c + 2 * 2 * c                        # two 3x3 conv + BN
            if c_in != c:
                n += c_in * c + 2 * c                                  # 1x1 conv + BN shortcut
            c_in = c
    return n + 512 * num_classes + num_classes


@pytest.mark.parametrize("name", ["spiking_resnet34", "sew_resnet34"])
def test_resnet34_parameter_count(name):
    # The literature's figure for ResNet-34 (and SEW-ResNet-34, whose neurons add none): 21.8M.
    assert resnet34_parameters(1000) == 21_797_672
    with torch.device("meta"):                          # no memory, no initialisation time
        model = build_model(name, num_classes=1000, compile=False)
        small = build_model(name, num_classes=10, compile=False)
    n = sum(p.numel() for p in model.parameters())
    assert n == resnet34_parameters(1000)
    assert abs(n - 21.8e6) / 21.8e6 < 0.01
    assert sum(p.numel() for p in small.parameters()) == resnet34_parameters(10) == 21_289_802


@pytest.mark.parametrize("name", ["spiking_resnet34", "sew_resnet34"])
def test_resnet34_block_outputs(name):
    """Spiking ResNet blocks output binary spikes; SEW blocks sums of spikes, integers 0..i+2
    at the i-th block of a stage (its first block's downsample ends with a LIF)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, T=2, compile=False)
    blocks = list(model.blocks)
    sew = name == "sew_resnet34"
    assert [type(b) for b in blocks] == [models.SEWBlock if sew else models.BasicBlock] * 16
    outs = []
    for b in blocks:
        b.register_forward_hook(lambda m, a, out: outs.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    bounds = [i + 2 for _, n, _ in models.RESNET34_STAGES for i in range(n)]
    for b, out, bound in zip(blocks, outs, bounds):
        if not sew:
            assert set(out.unique().tolist()) <= {0.0, 1.0}
            continue
        assert out.min() >= 0 and torch.equal(out, out.round()) and out.max() <= bound
        if not isinstance(b.shortcut, torch.nn.Identity):
            assert isinstance(b.shortcut[-1], LIF)           # both addends are spikes
    if sew:
        assert max(out.max().item() for out in outs) > 1    # not binary: spikes do add up
