"""Spiking neural networks: a leaky integrate-and-fire (LIF) neuron with surrogate gradients, and build_model()'s
networks: ResNet-19 (CIFAR), the ImageNet ResNet-34s (plain spiking and SEW), VGG-11, a small "convnet", a 1-D ConvNet.

Activations are time-first, [T, B, ...]. Only the neuron loops over T; stateless layers (conv, BN, pooling) run once
on the merged [T*B, ...] tensor. A network takes a static input [B, C, H, W], encoded once by the first conv + BN for
every step (direct encoding), or one input per step [B, T, C, H, W] (event-camera frames), and returns per-timestep
logits; its last layer, `model.classifier`, is an nn.Linear whose non-negative input spike-aware pruning hooks.

    model = build_model("resnet19", num_classes=10, T=4)     # compiles on the first forward
    logits = model(images)                                   # [4, B, 10]
    loss = F.cross_entropy(logits.mean(0), labels)
    rate = model.spike_rate()                                # 0-dim tensor, no host sync
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn


# -- Spikes with surrogate gradients ----------------------------------------------------------
# Forward: the Heaviside step H(x) = 1[x >= 0] (as in SpikingJelly, a neuron exactly at threshold fires). Backward:
# the derivative of a smooth primitive g_alpha instead. Each Function is written for alpha = 1 and receives
# u = alpha * x, so the chain rule supplies the factor alpha: a backward reading a float alpha from ctx fails in dynamo.
# Not the "detach trick" H + (g - g.detach()), which computes the surrogate in the forward pass too.

class _Spike(torch.autograd.Function):
    """H(u) forward, saving u; subclasses give the backward pass a surrogate derivative."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)


class ATanSpike(_Spike):
    """Backward: the derivative of (1/pi) atan(pi/2 * u) + 1/2 (SpikingJelly's ATan)."""

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        return grad * (0.5 / (1 + (math.pi / 2 * u) ** 2))


class SigmoidSpike(_Spike):
    """Backward: the derivative of sigmoid(u)."""

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        sg = torch.sigmoid(u)
        return grad * (sg * (1 - sg))


# name -> (Function, default alpha): SpikingJelly's, both a peak gradient of 1 (ATan: alpha/2, sigmoid: alpha/4).
SURROGATES = {"atan": (ATanSpike, 2.0), "sigmoid": (SigmoidSpike, 4.0)}


def _surrogate(name: str, alpha: float | None) -> tuple[type[torch.autograd.Function], float]:
    if name not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}.")
    fn, default_alpha = SURROGATES[name]
    alpha = default_alpha if alpha is None else float(alpha)
    if not alpha > 0:
        raise ValueError(f"surrogate alpha must be positive (it scales the slope); got {alpha}.")
    return fn, alpha


def spike(x: Tensor, surrogate: str = "atan", alpha: float | None = None) -> Tensor:
    """Heaviside step 1[x >= 0] whose gradient is the named surrogate's derivative at slope alpha:
    ATan:    d/dx = alpha/2 / (1 + (pi/2 * alpha * x)^2)      (alpha = 2 by default)
    sigmoid: d/dx = alpha * sg(alpha x) * (1 - sg(alpha x))   (alpha = 4 by default)"""
    fn, alpha = _surrogate(surrogate, alpha)
    return fn.apply(alpha * x)


# -- The LIF neuron ---------------------------------------------------------------------------

def lif_steps(x: Tensor, tau: float, v_threshold: float, v_reset: float,
              spike_fn: type[torch.autograd.Function], alpha: float, detach_reset: bool) -> Tensor:
    """[T, ...] input currents -> [T, ...] spikes: SpikingJelly's LIF (decay_input=True, hard reset) from v = v_reset:
        charge:  v <- v + (x_t - (v - v_reset)) / tau
        fire:    s_t = H(v - v_threshold)
        reset:   v <- v * (1 - s_t) + v_reset * s_t
    Gradients flow through time (BPTT), and through the reset unless detach_reset. v is float32 even for bf16/fp16 x:
    a rounded v flips spikes near the threshold, and every later step with them.
    """
    v_dtype = torch.promote_types(x.dtype, torch.float32)
    v = torch.full_like(x[0], v_reset, dtype=v_dtype)
    spikes = []
    for t in range(x.shape[0]):   # T is a Python int here: torch.compile unrolls the loop
        v = v + (x[t].to(v_dtype) - (v - v_reset)) / tau
        s = spike_fn.apply(alpha * (v - v_threshold))
        s_reset = s.detach() if detach_reset else s
        v = v * (1 - s_reset) + v_reset * s_reset
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype)


@functools.cache
def _compiled_lif_steps():
    """The one compiled lif_steps all LIF layers share. Not dynamic=True: floats turn symbolic, crashing the trace."""
    return torch.compile(lif_steps)


class LIF(nn.Module):
    """Multi-step LIF neuron (lif_steps), stateless between calls: [T, B, ...] currents -> spikes. After each forward,
    `last_rate` (0-dim float32, detached) is the spikes' mean and `last_numel` their number (for spike_rate())."""

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: float = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, compile: bool = True):
        super().__init__()
        if not tau > 1:
            raise ValueError(f"tau must be > 1 (the update divides by tau); got {tau}.")
        if not v_threshold > v_reset:
            raise ValueError(f"v_threshold ({v_threshold}) must be above v_reset ({v_reset}).")
        self.spike_fn, self.alpha = _surrogate(surrogate, alpha)
        self.surrogate = surrogate
        self.tau, self.v_threshold, self.v_reset = float(tau), float(v_threshold), float(v_reset)
        self.detach_reset = bool(detach_reset)
        self.use_compile = bool(compile)   # not `self.compile`: that is nn.Module.compile()
        self.last_rate: Tensor | None = None
        self.last_numel = 0

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(f"LIF expects floating-point input shaped [T, B, ...]; got {x.dtype} {list(x.shape)}.")
        # [T, N] for every layer: the loop is elementwise, and the graph sees rank-2 inputs only
        flat = x.reshape(x.shape[0], -1)
        args = (self.tau, self.v_threshold, self.v_reset, self.spike_fn, self.alpha, self.detach_reset)
        # inside an outer torch.compile (the whole model compiled), trace the plain function
        if self.use_compile and not torch.compiler.is_compiling():
            flat = flat.contiguous()   # the encoder's expand() gives stride 0; avoid a 2nd graph
            torch._dynamo.maybe_mark_dynamic(flat, 1)   # widths/batches share one graph
            s = _compiled_lif_steps()(flat, *args)
        else:
            s = lif_steps(flat, *args)
        self.last_rate = s.detach().mean(dtype=torch.float32)   # on the device: no host sync until .item()
        self.last_numel = s.numel()
        return s.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, surrogate={self.surrogate}, "
                f"alpha={self.alpha}, detach_reset={self.detach_reset}, compile={self.use_compile}")


def set_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """Switches every LIF in model between the compiled and the eager timestep loop."""
    for m in model.modules():
        if isinstance(m, LIF):
            m.use_compile = bool(enabled)
    return model


# -- Building blocks --------------------------------------------------------------------------

class MultiStep(nn.Sequential):
    """Stateless layers (conv, BN, pooling) on all timesteps at once: [T, B, ...] -> [T*B, ...] -> [T, B, ...].
    BatchNorm thus normalises over time and batch together: tdBN (Zheng et al., AAAI 2021) with alpha*V_th = 1."""

    def forward(self, x: Tensor) -> Tensor:
        T, B = x.shape[:2]
        return super().forward(x.flatten(0, 1)).unflatten(0, (T, B))


def conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, dims: int = 2) -> list:
    """A conv (2-D, or 1-D for dims=1) without bias (the BN has its own) and its BatchNorm."""
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    return [conv(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False), bn(c_out)]


class SpikingNet(nn.Module):
    """What the networks share: T, the LIF options, input encoding, weight init, spike_rate()."""

    input_dims = 4   # [B, C, H, W]; the 1-D network takes [B, C, L]

    def __init__(self, T: int, compile: bool, neuron: dict):
        super().__init__()
        if int(T) < 1:
            raise ValueError(f"T (timesteps) must be >= 1; got {T}.")
        self.T = int(T)
        self.neuron = dict(neuron, compile=compile)   # the keyword arguments of every LIF

    def encode(self, x: Tensor, stem: nn.Module) -> Tensor:
        """The stem's output at every step, [T, B, ...]: a static input [B, C, ...] passes the stem once, repeated
        over T (direct encoding); a sequence [B, T, C, ...] passes it step by step."""
        if x.dim() == self.input_dims:
            x = stem(x)
            return x.unsqueeze(0).expand(self.T, *x.shape)
        dims = "C, H, W" if self.input_dims == 4 else "C, L"
        if x.dim() != self.input_dims + 1:
            raise ValueError(f"{type(self).__name__} expects static inputs shaped [B, {dims}] or "
                             f"sequences shaped [B, T, {dims}] (T={self.T}); got {list(x.shape)}.")
        if x.shape[1] != self.T:
            raise ValueError(f"{type(self).__name__} got a sequence of {x.shape[1]} steps [B, T, "
                             f"{dims}] but was built for T={self.T}; build it with T={x.shape[1]}.")
        # to time-major rows (t * B + b), as MultiStep merges them
        return stem(x.transpose(0, 1).flatten(0, 1)).unflatten(0, (self.T, len(x)))

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):   # BN starts at weight 1, bias 0 already
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def spike_rate(self) -> Tensor:
        """Total spikes / total LIF outputs in the last forward: a 0-dim detached float32 tensor on the device."""
        lifs = [m for m in self.modules() if isinstance(m, LIF) and m.last_rate is not None]
        if not lifs:
            raise RuntimeError("spike_rate(): run a forward pass first.")
        total = sum(m.last_numel for m in lifs)
        return sum(m.last_rate * (m.last_numel / total) for m in lifs)


# -- Networks ---------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Spiking residual block: conv-BN-LIF-conv-BN (+ shortcut) -LIF, on [T, B, C, H, W] spikes. The shortcut is the
    identity, or 1x1 conv + BN where the shape changes. The sum is taken before the second LIF (as in tdBN and TET),
    so the block outputs binary spikes."""

    def __init__(self, c_in: int, c_out: int, stride: int, neuron: dict):
        super().__init__()
        self.conv1 = MultiStep(*conv_bn(c_in, c_out, 3, stride))
        self.lif1 = LIF(**neuron)
        self.conv2 = MultiStep(*conv_bn(c_out, c_out, 3))
        self.shortcut = (MultiStep(*conv_bn(c_in, c_out, 1, stride))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.lif2 = LIF(**neuron)

    def forward(self, x: Tensor) -> Tensor:
        return self.lif2(self.conv2(self.lif1(self.conv1(x))) + self.shortcut(x))


class SEWBlock(BasicBlock):
    """Spike-element-wise residual block with ADD (Fang et al., NeurIPS 2021): the sum after the second LIF, and a LIF
    after the shortcut's 1x1 conv + BN where the shape changes (both addends are spikes, as in SEW's code). The output
    is a sum of spikes: an integer up to i + 2 at the i-th block (from 0) of a stage."""

    def __init__(self, c_in: int, c_out: int, stride: int, neuron: dict):
        super().__init__(c_in, c_out, stride, neuron)
        if not isinstance(self.shortcut, nn.Identity):
            self.shortcut = nn.Sequential(self.shortcut, LIF(**neuron))   # on [T, B, ...]: after MultiStep

    def forward(self, x: Tensor) -> Tensor:
        return self.lif2(self.conv2(self.lif1(self.conv1(x)))) + self.shortcut(x)


# Residual stages: (width, number of blocks, stride of the first block).
RESNET19_STAGES = ((128, 3, 1), (256, 3, 2), (512, 2, 2))
RESNET34_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))   # He et al. 2016, Table 1


def residual_stages(block: type[nn.Module], c_in: int, stages, neuron: dict) -> nn.Sequential:
    """The blocks of a ResNet's stages in one nn.Sequential; each stage's first block takes its stride and width."""
    blocks = []
    for c_out, n, stride in stages:
        for i in range(n):
            blocks.append(block(c_in, c_out, stride if i == 0 else 1, neuron))
            c_in = c_out
    return nn.Sequential(*blocks)


class SpikingResNet19(SpikingNet):
    """The spiking ResNet-19 of the SNN literature for CIFAR (32x32 inputs), as in tdBN (Zheng et al., AAAI 2021) and
    TET (Deng et al., ICLR 2022): a 3x3 conv stem, 8 basic blocks (16 convs), FC 256 and the classifier. The stem has
    128 channels as in the paper (TET's code: 64, then a 1x1 projection). The FC 256 is followed by BN like every conv
    (not in TET's code): without it the pooled spikes times default-initialised weights stay far below threshold, and
    the classifier starts from all-zero inputs. `classifier` reads binary spikes."""

    def __init__(self, num_classes: int, T: int = 4, in_channels: int = 3, compile: bool = True, **neuron):
        super().__init__(T, compile, neuron)
        self.stem = nn.Sequential(*conv_bn(in_channels, 128))
        self.lif0 = LIF(**self.neuron)
        self.blocks = residual_stages(BasicBlock, 128, RESNET19_STAGES, self.neuron)
        self.fc1 = MultiStep(nn.Linear(512, 256, bias=False), nn.BatchNorm1d(256))
        self.lif_fc = LIF(**self.neuron)
        self.classifier = nn.Linear(256, num_classes)
        self.init_weights()

    def forward(self, x: Tensor) -> Tensor:
        x = self.lif0(self.encode(x, self.stem))   # [T, B, 128, H, W] spikes
        x = self.blocks(x)                          # [T, B, 512, H/4, W/4] spikes
        x = x.mean(dim=(-2, -1))                    # [T, B, 512] pooled spikes in [0, 1]
        x = self.lif_fc(self.fc1(x))                # [T, B, 256] binary spikes
        return self.classifier(x)                   # [T, B, num_classes]


class ImageNetResNet(SpikingNet):
    """The ImageNet ResNet-34 with spiking blocks: BasicBlock for the spiking ResNet-34 of tdBN and TET (torchvision's
    with every ReLU a LIF), SEWBlock for SEW-ResNet-34 with ADD (Fang et al., NeurIPS 2021; not SEW's AND and IAND).
    `stages` takes another depth in RESNET34_STAGES's format. `classifier` reads the spatial mean of the last blocks'
    outputs: fractions of spikes for BasicBlock; for SEW non-negative, as spike-aware pruning's bounds need, but not
    in [0, 1], so ||h_t||^2 is no spike count there. Unlike SEW's code: the project's LIF, not the IF neuron with
    detached reset; no zero-init of each block's last BN; per-timestep logits, whose mean over T SEW's code returns."""

    def __init__(self, num_classes: int, T: int = 4, in_channels: int = 3, stages=RESNET34_STAGES,
                 block: type[BasicBlock] = BasicBlock, compile: bool = True, **neuron):
        super().__init__(T, compile, neuron)
        if not stages or any(len(s) != 3 or s[1] < 1 for s in stages):
            raise ValueError(f"stages must be (width, blocks >= 1, stride) triples; got {stages}.")
        self.stem = nn.Sequential(*conv_bn(in_channels, 64, 7, 2))
        self.lif0 = LIF(**self.neuron)
        self.pool = MultiStep(nn.MaxPool2d(3, 2, padding=1))   # max of spikes: still binary
        self.blocks = residual_stages(block, 64, stages, self.neuron)
        self.classifier = nn.Linear(stages[-1][0], num_classes)
        self.init_weights()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.lif0(self.encode(x, self.stem)))   # [T, B, 64, H/4, W/4] spikes
        x = self.blocks(x)                                     # [T, B, 512, H/32, W/32]
        return self.classifier(x.mean(dim=(-2, -1)))           # [T, B, num_classes]


# VGG-11 (configuration "A" of Simonyan & Zisserman): channels, "M" = 2x2 max pool.
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
# A small spiking ConvNet for tests and CPU smoke runs: three conv-BN-LIF layers, two pools.
CONVNET = (16, "M", 32, "M", 64)


class SpikingVGG(SpikingNet):
    """Spiking VGG: conv-BN-LIF layers and 2x2 max pools (cfg: conv widths, "M" for a pool), then global average pool
    + classifier, without ImageNet VGG's 4096-wide FC layers (as usual for CIFAR). Max pools keep spikes binary;
    `classifier` reads their spatial mean, in [0, 1]."""

    def __init__(self, num_classes: int, T: int = 4, in_channels: int = 3, cfg=VGG11, compile: bool = True, **neuron):
        super().__init__(T, compile, neuron)
        if not cfg or cfg[0] == "M":
            raise ValueError(f"cfg must start with a conv width; got {cfg}.")
        self.stem = nn.Sequential(*conv_bn(in_channels, cfg[0]))
        layers, c_in = [LIF(**self.neuron)], cfg[0]
        for c in cfg[1:]:
            if c == "M":
                layers.append(MultiStep(nn.MaxPool2d(2)))
            else:
                layers += [MultiStep(*conv_bn(c_in, c)), LIF(**self.neuron)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        self.init_weights()

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.encode(x, self.stem))   # [T, B, C, h, w] spikes
        return self.classifier(x.mean(dim=(-2, -1)))    # [T, B, num_classes]


class SpikingConv1d(SpikingNet):
    """A small spiking 1-D ConvNet for MNIST-1D (signals [B, 1, 40]): Conv1d k5, then two Conv1d k3 stride 2, each +
    BN + LIF; `classifier` reads the flattened binary spikes, so ||h_t||^2 is exactly that step's spike count."""

    input_dims = 3

    def __init__(self, num_classes: int, T: int = 4, in_channels: int = 1, compile: bool = True, **neuron):
        super().__init__(T, compile, neuron)
        self.stem = nn.Sequential(*conv_bn(in_channels, 32, 5, dims=1))
        self.features = nn.Sequential(
            LIF(**self.neuron),
            MultiStep(*conv_bn(32, 32, 3, 2, dims=1)), LIF(**self.neuron),
            MultiStep(*conv_bn(32, 32, 3, 2, dims=1)), LIF(**self.neuron))
        self.classifier = nn.Linear(32 * 10, num_classes)   # 40 samples: 10 after the two stride-2 convs
        self.init_weights()

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.encode(x, self.stem))   # [T, B, 32, 10] binary spikes
        return self.classifier(x.flatten(2))            # [T, B, num_classes]


# -- Factory ----------------------------------------------------------------------------------

_BUILDERS = {
    "resnet19": SpikingResNet19,
    "vgg11": SpikingVGG,
    "convnet": functools.partial(SpikingVGG, cfg=CONVNET),
    "conv1d": SpikingConv1d,
    "spiking_resnet34": ImageNetResNet,
    "sew_resnet34": functools.partial(ImageNetResNet, block=SEWBlock),
}
MODELS = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, T: int = 4, in_channels: int | None = None,
                compile: bool = True, **kw) -> nn.Module:
    """Builds a network by name (one of MODELS). in_channels: the input's channels (None: 3 for the image networks, 1
    for conv1d). kw: LIF options (tau, v_threshold, v_reset, surrogate, alpha, detach_reset) and, for vgg11, cfg; for
    the ResNet-34s, stages."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}.")
    if in_channels is not None:
        kw["in_channels"] = in_channels
    return _BUILDERS[name](num_classes, T=T, compile=compile, **kw)


# The stride-2 layers of each image network. The VGGs' 2x2 max pools make n // 2 pixels of n; the ResNets' padded
# stride-2 convs (and ResNet-34's stem conv and 3x3 max pool) make ceil(n / 2).
_POOLS = {"vgg11": VGG11.count("M"), "convnet": CONVNET.count("M")}
_STRIDED = {"resnet19": sum(stride == 2 for *_, stride in RESNET19_STAGES),
            "spiking_resnet34": 2 + sum(stride == 2 for *_, stride in RESNET34_STAGES)}
_STRIDED["sew_resnet34"] = _STRIDED["spiking_resnet34"]


def min_image_size(name: str) -> int:
    """The smallest side (pixels) of square images network `name` takes: each of its stride-2 layers then halves a map
    of at least 2 pixels. One pixel less, the VGGs fail (a 2x2 pool of a 1x1 map is empty) and the ResNets run a
    strided conv on a 1x1 map. Walking back from the 2 pixels the last such layer needs: m pixels out need n >= 2m in
    (n // 2), or n >= 2m - 1 (ceil(n / 2))."""
    if name in _POOLS:
        return 2 ** _POOLS[name]
    if name in _STRIDED:
        return 2 ** (_STRIDED[name] - 1) + 1
    raise ValueError(f"{name!r} takes no images; the image networks are {', '.join([*_POOLS, *_STRIDED])}.")
