"""Trace a wrapped component once with torch.export, with dynamic dims from its spec."""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from exporters.errors import ExportError
from exporters.inputs import make_feed, trace_values
from exporters.spec import Axis, ComponentSpec

log = logging.getLogger(__name__)


def dynamic_shapes(spec: ComponentSpec) -> dict[str, dict[int, object]]:
    """torch.export dynamic_shapes for the spec's inputs (static dims are left out)."""
    roots = {}
    for d in spec.dims:
        if d.is_static:
            continue
        m = d.multiple_of
        # torch.export expresses "multiple of m" as m * Dim(range / m).
        roots[d.name] = (torch.export.Dim(f"{d.name}_div{m}" if m > 1 else d.name, min=d.min // m, max=d.max // m), m)
    shapes = {}
    for t in spec.inputs:
        axes = {}
        for i, a in enumerate(t.axes):
            if isinstance(a, Axis) and a.dim in roots:
                root, m = roots[a.dim]
                factor = a.size(m)  # the axis is root * (m * scale / per); whole by ComponentSpec's check
                axes[i] = root * factor if factor > 1 else root
        shapes[t.name] = axes
    return shapes


def _by_signature(wrapper: nn.Module, shapes: tuple) -> tuple:
    """dynamic_shapes laid out as the forward's parameters: inputs taken by *args form one tuple
    (a wrapper whose input count follows the model, e.g. a UNet's ControlNet residuals)."""
    params = list(inspect.signature(wrapper.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            # torch.export sees the call's arguments, so no *args at all means no tuple for them
            return (*shapes[:i], tuple(shapes[i:])) if shapes[i:] else shapes[:i]
    return shapes


def example_inputs(spec: ComponentSpec, seed: int = 0) -> tuple[torch.Tensor, ...]:
    feed = make_feed(spec, trace_values(spec), seed=seed)
    return tuple(torch.from_numpy(feed[name]) for name in spec.input_names)


def trace(wrapper: nn.Module, spec: ComponentSpec, fake_mode=None) -> torch.export.ExportedProgram:
    """torch.export the wrapper with the spec's inputs as named, dynamic arguments.

    With a FakeTensorMode, the inputs are fake too: that traces a wrapper whose parameters are
    fake tensors without storage (exporters.streaming).
    """
    wrapper.eval()
    args = example_inputs(spec)
    if fake_mode is not None:
        args = tuple(fake_mode.from_tensor(a) for a in args)
    try:
        with torch.no_grad():
            shapes = dynamic_shapes(spec)
            ordered = _by_signature(wrapper, tuple(shapes[name] for name in spec.input_names))
            return torch.export.export(wrapper, args, dynamic_shapes=ordered, strict=False)
    except Exception as exc:  # torch raises many types here; one clear message is what users need
        raise ExportError(
            f"tracing '{spec.name}' failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "check that the component is a supported diffusers/transformers model; run with -v for the trace log",
        ) from exc
