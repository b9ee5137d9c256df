"""Quantization-aware training: fake-quantized INT8 Conv2d/Linear that export as ONNX QDQ.

Weights: symmetric per-output-channel int8, scale = max|w| / 127 recomputed from the
weights on every call (so it follows them while they train). Activations (each layer's
input): asymmetric uint8 per tensor, range observed on the training feeds (min/max),
then frozen before fine-tuning. Gradients pass the rounding straight through (torch's
fake-quant ops) while grad is enabled. Without grad (evaluation and export) the same
rounding runs as explicit quantize/dequantize ops (quantized_decomposed): torch.export
has no symbolic-shape kernel for aten's fake-quant ops under dynamic dims, while the
explicit pair traces and torch.onnx lowers it to QuantizeLinear/DequantizeLinear, so the
exported graph is a QDQ model that ONNX Runtime runs. After fine-tuning, `freeze_weights`
stores each weight as int8 with constant scales, so the export carries int8 initializers.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

from exporters.compress.prune import weight_layers

log = logging.getLogger(__name__)

QMIN, QMAX = -128, 127  # int8 weights; torch.onnx accepts (-128, 127), (0, 127), (0, 255)
AMIN, AMAX = 0, 255  # uint8 activations, as ONNX Runtime's static QDQ uses
_QD = torch.ops.quantized_decomposed


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scale per output channel (axis 0): max|w| / 127."""
    return (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / QMAX).clamp_min(1e-8)


class WeightFakeQuant(nn.Module):
    """Parametrization: weight -> fake int8, per output channel (axis 0)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = weight_scale(w)
        if torch.is_grad_enabled():
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX)
        zero = torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)
        q = _QD.quantize_per_channel(w, scale, zero, 0, QMIN, QMAX, torch.int8)
        return _QD.dequantize_per_channel(q, scale, zero, 0, QMIN, QMAX, torch.int8)


class FrozenWeight(nn.Module):
    """Parametrization after fine-tuning: the int8 weight and its per-channel scales as constants.

    The export then holds DequantizeLinear(int8 initializer, constant scale) before each layer,
    the weight form of ONNX Runtime's static QDQ graphs, which TensorRT also requires (constant
    Q/DQ scales); the file stores int8 weights, not fp32 ones with scales computed at run time.
    """

    def __init__(self, w: torch.Tensor):
        super().__init__()
        scale = weight_scale(w)
        zero = torch.zeros(w.shape[0], dtype=torch.int64)
        self.register_buffer("q", _QD.quantize_per_channel(w.detach(), scale, zero, 0, QMIN, QMAX, torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        return _QD.dequantize_per_channel(self.q, self.scale, self.zero, 0, QMIN, QMAX, torch.int8)


class ActivationFakeQuant:
    """Forward pre-hook on a layer: observes its input range, or fake-quantizes the input once frozen."""

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")
        self.observing = True
        self.scale = 1.0
        self.zero = 0

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.observing:
            self.lo = min(self.lo, float(x.detach().min()))
            self.hi = max(self.hi, float(x.detach().max()))
            return args
        if torch.is_grad_enabled():
            return (torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, AMIN, AMAX), *args[1:])
        q = _QD.quantize_per_tensor(x, self.scale, self.zero, AMIN, AMAX, torch.uint8)
        return (_QD.dequantize_per_tensor(q, self.scale, self.zero, AMIN, AMAX, torch.uint8), *args[1:])

    def freeze(self) -> None:
        """uint8 qparams from the observed range (widened to hold 0, as ONNX quantizers do)."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if hi - lo < 1e-8:  # a layer never called, or a constant input: any valid range
            hi = lo + 1e-3
        self.scale = (hi - lo) / (AMAX - AMIN)
        self.zero = int(min(AMAX, max(AMIN, round(AMIN - lo / self.scale))))
        self.observing = False


def attach(module: nn.Module) -> list[ActivationFakeQuant]:
    """Fake-quantize every Conv2d/Linear of `module` in place; returns the activation quantizers."""
    quantizers = []
    for _, layer in weight_layers(module):
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant())
        q = ActivationFakeQuant()
        layer.register_forward_pre_hook(q)
        quantizers.append(q)
    return quantizers


@torch.no_grad()
def freeze_weights(module: nn.Module) -> int:
    """Replace every trained fake-quant weight by its int8 form (FrozenWeight); returns the count.

    The fp32 weight is dropped (an empty placeholder stays where the parametrization needs one).
    """
    count = 0
    for _, layer in weight_layers(module):
        if not parametrize.is_parametrized(layer, "weight"):
            continue
        w = layer.parametrizations.weight.original.detach()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        parametrize.register_parametrization(layer, "weight", FrozenWeight(w), unsafe=True)
        count += 1
    return count


@torch.no_grad()
def calibrate(wrapper: nn.Module, quantizers: list[ActivationFakeQuant], batches) -> None:
    """Observe activation ranges on `batches`, then freeze them (fine-tuning trains weights only)."""
    for q in quantizers:
        q.observing = True
    wrapper.eval()
    for b in batches:
        wrapper(*b)
    for q in quantizers:
        q.freeze()


def qdq_counts(onnx_path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    return {op: ops.count(op) for op in ("QuantizeLinear", "DequantizeLinear")}
