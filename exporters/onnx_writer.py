"""Write ONNX from a torch.export program: opset >= 18, readable dim names, one external-data file."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir
import torch

from exporters.errors import ExportError, UsageError
from exporters.spec import Axis, ComponentSpec

log = logging.getLogger(__name__)

MIN_OPSET = 18
ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx_data"
SPEC_KEY = "diffprism.spec"
RANGE_CONSTRAINTS_KEY = "pkg.torch.export.ExportedProgram.range_constraints"


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old", f"use --opset {MIN_OPSET} or newer")


def to_onnx(program: torch.export.ExportedProgram, spec: ComponentSpec, opset: int = MIN_OPSET,
            prepare: Callable[[ir.Model], None] | None = None) -> ir.Model:
    """Convert a traced program to an onnx_ir model with the spec's tensor and dim names.

    `prepare` (used by exporters.streaming) sees the graph before torch's optimizer runs; the
    steps then are the ones torch.onnx.export takes with optimize=True, in the same order.
    """
    check_opset(opset)
    try:
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            input_names=spec.input_names if prepare is None else None,
            output_names=spec.output_names if prepare is None else None,
            opset_version=opset,
            optimize=prepare is None,
            verbose=False,
        )
        if prepare is not None:
            from torch.onnx._internal.exporter import _ir_passes

            prepare(onnx_program.model)
            onnx_program.optimize()
            _ir_passes.rename_inputs(onnx_program.model, spec.input_names)
            _ir_passes.rename_outputs(onnx_program.model, spec.output_names)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"ONNX conversion of '{spec.name}' failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "try another --opset, or report the failing operator",
        ) from exc
    model = onnx_program.model
    # torch.export prints its range constraints in set order, which changes between runs;
    # the spec below records the same ranges, so drop it to keep exports byte-identical.
    model.graph.metadata_props.pop(RANGE_CONSTRAINTS_KEY, None)
    _rename_dims(model, spec)
    model.producer_name = "diffprism"
    model.metadata_props[SPEC_KEY] = json.dumps(spec.to_json(), sort_keys=True)
    return model


def _rename_dims(model: ir.Model, spec: ComponentSpec) -> None:
    """Replace exporter symbols (s53, 8*s69) on graph inputs/outputs with the spec's names."""
    mapping: dict[str, str] = {}
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.inputs, *model.graph.outputs):
        t = tensors.get(value.name)
        if t is None or value.shape is None:
            continue
        for dim, axis in zip(value.shape, t.axes):
            if isinstance(axis, Axis) and isinstance(dim, ir.SymbolicDim) and dim.value:
                mapping.setdefault(dim.value, axis.label())
    for value in _all_values(model.graph):
        if value.shape is None:
            continue
        new = [ir.SymbolicDim(mapping[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in mapping else d for d in value.shape]
        value.shape = ir.Shape(new)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph.all_nodes() if hasattr(graph, "all_nodes") else graph:
        yield from node.outputs


def save(model: ir.Model, directory: Path) -> Path:
    """Save as directory/model.onnx with every weight in directory/model.onnx_data, then check it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ONNX_NAME
    # Weights go to the one data file; tiny tensors (shape constants) stay inline because
    # shape inference in ONNX Runtime and OpenVINO must read them from the graph.
    ir.save(model, path, external_data=DATA_NAME, size_threshold_bytes=1024)
    onnx.checker.check_model(str(path))
    return path


def read_spec(path: Path) -> ComponentSpec | None:
    """The ComponentSpec stored in an ONNX file's metadata, or None for a foreign file."""
    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == SPEC_KEY:
            return ComponentSpec.from_json(json.loads(prop.value))
    return None
