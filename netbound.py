"""The whole-network bound: sadp.py bounds an example's gradient at the classifier head; `NetworkTap` extends the
bound to every Conv1d/2d/3d and Linear weight, off the backward pass training runs (train.py --score network):

    tap = NetworkTap(model, T=4)
    loss, _ = spike_aware_loss(outputs, y, head_inputs, w)
    loss.backward()
    scores = tap.pop(w)                 # [B], in place of the head's scores
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class NetworkTap:
    """Bounds each example's gradient norm over *every* conv and linear weight, from hooks.

    The bound. Layer l applies W_l at step t to its input a_{l,t} (spikes of the layer below, or the encoded input
    for the stem), u_{l,t} = W_l * a_{l,t}; let delta_{l,t} = dl/du_{l,t}.

        ||dl/d(W_l, b_l)||_F <= S_l = sum_t ||delta_{l,t}||_F * sqrt(c_l n_{l,t} + P_l [bias])
        ||dl/d(all W, b)||   <= S_net = sqrt(sum_l S_l^2)

    with n = ||a||^2 (the spike count, for spikes), P_l the output positions, c_l = ceil(k/s)^d for a d-dim
    convolution (kernel k, stride s; 1 for linear). Proof: the gradient is sum_t sum_p delta_{t,p} [patch_p(a_t); 1]^T.
    Triangle inequality over t; Cauchy-Schwarz over positions p gives ||delta_t|| * sqrt(sum_p ||patch_p||^2 + P); and
    each input element lies in at most c_l patches, so sum_p ||patch_p||^2 <= c_l n_t. The layers' parameter blocks
    are disjoint, so their squared norms add. For the head, S_l is the head bound.

    The hooks. A forward hook records ||a|| per input row, a hook on the output ||delta|| per row in the backward
    pass: one norm per example per step, no extra pass. A layer may run on [B, ...] once (a stem whose output repeats
    over T: its delta sums the T steps), on time-major [T*B, ...] rows (MultiStep, a stem run on every step), on
    [T, B, D] (a Linear head), or several times (the calls add, as steps do); not on tokens [B, P, D]. Forwards
    without grad are ignored, and the records of a step never popped are dropped.

    The contract: the backward pass computes delta of the minibatch loss L = (1/B) sum_b w_b l_b, which is
    (w_b / B) delta_b; `pop(w)` divides that out, so S scores the unweighted l_b. Pass the very weights the loss used;
    with a GradScaler, divide the scores by the scale. Caveats: BN parameters are not covered, and BN in training mode
    couples a batch's examples, so the bound holds exactly only with BN in eval mode (or no BN). Compiling the whole
    model with the tap is not supported (a compiled LIF is fine: the hooks are on conv/linear modules).
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
            call = {"name": name, "a": _row_norms(args[0], linear), "c": 1 if linear else _patches_per_input(module),
                    "P": 1 if linear else math.prod(output.shape[2:]), "bias": module.bias is not None, "d": None}
            if any(c["d"] is not None for c in self._calls):
                self._calls = []                             # a step that was never popped
            self._calls.append(call)

            def record_delta(grad: Tensor) -> None:          # grad = dL/du, the layer's output
                call["d"] = _row_norms(grad, linear)
            output.register_hook(record_delta)
        return record

    def pop(self, weights: Tensor, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """S_net [B] (at least float32) for the forward and backward since the last pop, or with per_layer=True a dict
        {layer name: S_l [B]}. weights: [B], the loss's w_b (ones if none)."""
        calls, self._calls = self._calls, []
        if not calls:
            raise RuntimeError("NetworkTap.pop: no layer ran with grad since the last pop; run the model and backward.")
        if any(c["d"] is None for c in calls):
            raise RuntimeError("NetworkTap.pop: the backward has not reached every layer; call loss.backward() first.")
        w = torch.as_tensor(weights).detach().reshape(-1).to(calls[0]["a"].dtype)
        B = w.numel()
        # checked on the CPU (SADPSampler.weights), where it costs no host-device sync
        if w.device.type == "cpu" and not bool(((w > 0) & w.isfinite()).all()):
            raise ValueError("NetworkTap.pop: every weight must be finite and > 0; a zero weight's unweighted "
                             "gradient cannot be recovered from the backward (pass 1 for it, drop its score).")
        bounds: dict[str, Tensor] = {}
        for c in calls:
            rows = c["a"].numel()
            if rows not in (B, self.T * B):
                raise RuntimeError(f"NetworkTap: layer {c['name']!r} saw {rows} rows, neither B = {B} "
                                   f"nor T*B = {self.T * B}; pass this batch's weights, the model's T.")
            term = c["d"] * (c["c"] * c["a"].square() + (c["P"] if c["bias"] else 0)).sqrt()
            S = term.reshape(-1, B).sum(0)                   # time-major rows: sum over t
            bounds[c["name"]] = bounds.get(c["name"], 0) + S.to(w.device) * (B / w)   # undo w_b / B
        return bounds if per_layer else torch.stack(list(bounds.values())).square().sum(0).sqrt()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._calls = [], []


def _row_norms(x: Tensor, linear: bool) -> Tensor:
    """||x_r|| per row (a Linear's rows: all but the last dim; a conv's: the first dim), in at least float32."""
    x = x.detach()
    x = x.reshape(-1, x.shape[-1]) if linear else x.flatten(1)
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.promote_types(x.dtype, torch.float32))


def _patches_per_input(conv: nn.Module) -> int:
    """c = the most output positions one input element feeds: ceil(k gcd(s, d) / s) per dimension (kernel k, stride
    s, dilation d: the taps that land on one element are s / gcd apart)."""
    return math.prod(-(-k * math.gcd(s, d) // s) for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation))
