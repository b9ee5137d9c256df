"""A component's torch.export program in a reduced precision: what the PyTorch-native targets compile.

The trace is the one the ONNX export makes (exporters.families picks the exporter, exporters.trace
gives the spec's dynamic dims as torch.export.Dim min/max); here the module may first be cast to
fp16/bf16 or int8-quantized with torchao. Inputs and outputs stay float32, so runners and
pipelines need no change. A changed module is always a copy: the caller's pipeline stays intact.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from exporters.families import exporter_for
from exporters.spec import ComponentSpec
from exporters.trace import trace


def cast(wrapper: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The wrapper in `dtype` between casts: float inputs to `dtype` on the way in, outputs to float32 on the way
    out. Hooks, not another wrapper, so the forward keeps its named positional inputs for torch.export."""
    wrapper.to(dtype)
    wrapper.register_forward_pre_hook(
        lambda _, args: tuple(a.to(dtype) if a is not None and a.is_floating_point() else a for a in args))
    wrapper.register_forward_hook(
        lambda _, args, out: out.float() if isinstance(out, torch.Tensor) else tuple(o.float() for o in out))
    return wrapper


def int8_dynamic(module: nn.Module) -> None:
    """torchao's dynamic int8-activation / int8-weight quantization of every nn.Linear, in place."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig())


def traced_program(source: Any, spec: ComponentSpec, dtype: torch.dtype = torch.float32, *,
                   int8: bool = False) -> torch.export.ExportedProgram:
    exporter = exporter_for(source, spec.name)
    module = exporter.module(source)
    if dtype != torch.float32 or int8:
        module = copy.deepcopy(module)
    if int8:
        int8_dynamic(module)
    wrapper = exporter.wrap(module, spec)
    if dtype != torch.float32:
        wrapper = cast(wrapper, dtype)
    return trace(wrapper, spec)
