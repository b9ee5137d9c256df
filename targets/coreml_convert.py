"""torch.export program -> Core ML ML program (.mlpackage), with flexible shapes from the ComponentSpec.

The program is the same one the ONNX export starts from (exporters.export.trace_component);
coremltools 9 converts it directly (its TorchScript path breaks with numpy >= 2.4 and with
flexible shapes). Three adjustments make the torch 2.13 program convertible:
- `run_decompositions` to ATen, with group_norm decomposed by `_group_norm` below: coremltools'
  own group_norm builds a reshape from a symbolic batch and fails on any dynamic batch;
- `aten.alias` nodes (CLIP text encoders) have no coremltools translation and are no-ops;
- outputs are named after the ComponentSpec (the program's own names are node names).
coremltools is imported inside the functions that need it, so importing this module is free.
"""
from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from exporters.errors import UsageError
from exporters.spec import ComponentSpec, TensorSpec

log = logging.getLogger(__name__)

# Shape modes: "range" (RangeDim per dynamic axis), "enumerated" (listed shapes), "static" (opt only).
SHAPE_MODES = ("range", "enumerated", "static")


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """aten.group_norm with reshapes that keep the batch symbolic (x.shape[0] becomes a sym_size node)."""
    grouped = x.reshape(x.shape[0], num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(affine_shape)
    if bias is not None:
        y = y + bias.reshape(affine_shape)
    return y


def lower(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The ATen program coremltools can read (see the module notes)."""
    program = program.run_decompositions({torch.ops.aten.group_norm.default: _group_norm})
    graph = program.graph_module.graph
    aliases = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.alias.default]
    for node in aliases:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    if aliases:
        program.graph_module.recompile()
    return program


def static_spec(spec: ComponentSpec) -> ComponentSpec:
    """The spec pinned at its opt point (the fallback when a flexible conversion fails)."""
    return spec.restrict(**{d.name: (d.opt, d.opt, d.opt) for d in spec.dims})


def coreml_dtype(tensor: TensorSpec) -> type:
    """Core ML multiarrays have no int64: integer inputs (token ids) become int32."""
    return np.int32 if np.dtype(tensor.dtype).kind in "iu" else np.float32


# Deployment targets from which Core ML takes several enumerated inputs (coremltools: iOS 18 = macOS 15).
MULTI_ENUMERATED = ("macOS15", "iOS18")


def enumerate_shapes(spec: ComponentSpec, latent_sizes: Iterable[tuple[int, int]],
                     deployment_target: str) -> dict[str, Any]:
    """Enumerated shapes that follow coremltools' rules for `deployment_target`.

    Returns {"points": [dim values], "inputs": [enumerated input names], "notes": [what was reduced]}.
    Shape i of every enumerated input belongs to point i; the other inputs are static.
    - An EnumeratedShapes needs at least two shapes: with fewer points, every input is static.
    - Below iOS 18 / macOS 15 only one input may be enumerated. When several would vary (the UNet:
      sample, timestep and encoder_hidden_states all carry the batch), the batch is fixed at its opt
      value so only the latent input varies, and a note says so.
    - From iOS 18 on every enumerated input needs the same number of shapes, matched by index: the
      lists run in parallel, in point order, duplicates kept. coremltools moves each input's default
      shape to the front, so the default point comes first and the points run batch by batch, which
      keeps every default shape a prefix of its list and the lists aligned.
    """
    sizes = list(dict.fromkeys(tuple(s) for s in latent_sizes))
    batch = spec.dim("batch") if _has(spec, "batch") else None
    batches = list(dict.fromkeys(batch.at(p) for p in ("opt", "min", "max"))) if batch else [None]
    notes: list[str] = []
    points = _points(spec, sizes, batches)
    varying = _varying(spec, points)
    if len(varying) > 1 and deployment_target not in MULTI_ENUMERATED:
        points = _points(spec, sizes, batches[:1])
        notes.append(f"batch fixed at {batches[0]}: below iOS 18 / macOS 15 Core ML allows one enumerated input, "
                     f"and {', '.join(varying)} all vary (use minimum_deployment_target=macOS15 or iOS18 for all)")
        varying = _varying(spec, points)
        if len(varying) > 1:
            raise UsageError(f"{spec.name}: {', '.join(varying)} vary with the resolution, and below iOS 18 / "
                             "macOS 15 Core ML allows one enumerated input",
                             "use minimum_deployment_target=macOS15 or iOS18, or shapes=range")
    if len(points) < 2:
        notes.append("one shape to enumerate: every input is static at it (an enumerated input needs two)")
        varying = []
    for name in varying:
        shapes = [spec.shape(spec.input(name), p) for p in points]
        first = [s == shapes[0] for s in shapes]
        if first != sorted(first, reverse=True):  # coremltools would reorder this list: indices would not match
            raise UsageError(f"{spec.name}.{name}: its enumerated shapes cannot stay aligned with the other inputs'",
                             "enumerate fewer resolutions or use shapes=range")
    return {"points": points, "inputs": varying, "notes": notes}


def _points(spec: ComponentSpec, sizes: list[tuple[int, int]], batches: list[int | None]) -> list[dict[str, int]]:
    """Dim values, batch by batch (opt first), then size by size (the first listed first)."""
    points: list[dict[str, int]] = []
    for b, (h, w) in itertools.product(batches, sizes):
        overrides = {k: v for k, v in (("height", h), ("width", w), ("batch", b)) if v is not None and _has(spec, k)}
        values = spec.dim_values(overrides)
        if values not in points:  # a text encoder has no height/width: the sizes collapse
            points.append(values)
    return points


def _varying(spec: ComponentSpec, points: list[dict[str, int]]) -> list[str]:
    return [t.name for t in spec.inputs if len({spec.shape(t, p) for p in points}) > 1]


def _has(spec: ComponentSpec, dim: str) -> bool:
    return any(d.name == dim for d in spec.dims)


def input_types(spec: ComponentSpec, mode: str, enumeration: Mapping[str, Any] | None = None) -> list[Any]:
    import coremltools as ct

    types = []
    for t in spec.inputs:
        if mode == "enumerated":
            points = enumeration["points"]  # the first point is every input's default
            if t.name in enumeration["inputs"]:
                shape: Any = ct.EnumeratedShapes(shapes=[list(spec.shape(t, p)) for p in points],
                                                 default=list(spec.shape(t, points[0])))
            else:
                shape = ct.Shape(list(spec.shape(t, points[0])))
        else:
            dims = []
            for a in t.axes:
                if isinstance(a, int):
                    dims.append(a)
                    continue
                d = spec.dim(a.dim)
                if mode == "range" and not d.is_static:
                    dims.append(ct.RangeDim(lower_bound=a.size(d.min), upper_bound=a.size(d.max),
                                            default=a.size(d.opt)))
                else:
                    dims.append(a.size(d.opt))
            shape = ct.Shape(dims)
        types.append(ct.TensorType(name=t.name, shape=shape, dtype=coreml_dtype(t)))
    return types


def convert(program: torch.export.ExportedProgram, spec: ComponentSpec, *, precision: str, mode: str,
            deployment_target: str, compute_units: str, enumeration: Mapping[str, Any] | None = None) -> Any:
    """One ML program from a lowered program; fp32 inputs/outputs whatever the compute precision."""
    import coremltools as ct

    return ct.convert(
        program,
        inputs=input_types(spec, mode, enumeration),
        outputs=[ct.TensorType(name=o.name, dtype=np.float32) for o in spec.outputs],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, deployment_target),
        compute_units=getattr(ct.ComputeUnit, compute_units.upper()),
        skip_model_load=True,  # loading needs the macOS Core ML framework
    )


def compress(model: Any, kind: str) -> Any:
    """Weight compression with coremltools.optimize.coreml (post-training, data-free)."""
    if kind == "none":
        return model
    from coremltools.optimize import coreml as cto

    if kind == "linear8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op))
    nbits = {"palettize4": 4, "palettize6": 6}[kind]
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits)
    return cto.palettize_weights(model, cto.OptimizationConfig(global_config=op))


def describe_tensor(spec: ComponentSpec, tensor: TensorSpec, mode: str, enumeration: Mapping[str, Any] | None) -> str:
    """Human description of a tensor's dtype and shape, written into the package."""
    dtype = "int32 (int64 token ids, cast)" if coreml_dtype(tensor) is np.int32 and tensor.dtype != "int32" else "float32"
    if mode == "enumerated":
        shapes = list(dict.fromkeys(spec.shape(tensor, p) for p in enumeration["points"]))
        if len(shapes) == 1:
            return f"{dtype}, {'x'.join(map(str, shapes[0]))}"
        return f"{dtype}, one of {['x'.join(map(str, s)) for s in shapes]}"
    parts = []
    for a in tensor.axes:
        if isinstance(a, int):
            parts.append(str(a))
            continue
        d = spec.dim(a.dim)
        label = a.label()
        if mode == "static" or d.is_static:
            parts.append(f"{label}={a.size(d.opt)}")
        else:
            parts.append(f"{label} in [{a.size(d.min)}, {a.size(d.max)}]")
    return f"{dtype}, [{', '.join(parts)}]"


def io_names(model: Any, spec: ComponentSpec) -> dict[str, str]:
    """Spec name -> package name where they differ: Core ML feature names are identifiers, so
    coremltools turns e.g. `hidden_states.1` into `hidden_states_1` (matched by position)."""
    desc = model.get_spec().description
    pairs = zip((*spec.input_names, *spec.output_names), (*(f.name for f in desc.input), *(f.name for f in desc.output)))
    return {ours: theirs for ours, theirs in pairs if ours != theirs}


def set_metadata(model: Any, spec: ComponentSpec, facts: Mapping[str, str], mode: str,
                 enumeration: Mapping[str, Any] | None) -> None:
    """Author, description, version and diffprism.* user metadata (what, from where, built how)."""
    names = io_names(model, spec)
    model.user_defined_metadata["diffprism.io_names"] = json.dumps(names, sort_keys=True)
    model.author = "diffprism"
    model.version = facts.get("diffprism.version", "")
    model.short_description = (f"{spec.name} of {facts.get('diffprism.source_name', '?')} "
                               f"({facts['diffprism.precision']}, compress={facts['diffprism.compress']}), "
                               "converted from its torch.export program")
    for key, value in facts.items():
        model.user_defined_metadata[key] = value
    for t in spec.inputs:
        model.input_description[names.get(t.name, t.name)] = describe_tensor(spec, t, mode, enumeration)
    for t in spec.outputs:
        model.output_description[names.get(t.name, t.name)] = describe_tensor(spec, t, mode, enumeration)


def check_program(program: torch.export.ExportedProgram, case: Mapping[str, Any], spec: ComponentSpec) -> float:
    """Relative L2 of the lowered program against a stored PyTorch reference case (worst output).

    Proves the program handed to coremltools computes what the exported component computes;
    it says nothing about Core ML's numerics, which need macOS.
    """
    args = [torch.from_numpy(np.ascontiguousarray(case["inputs"][n])) for n in spec.input_names]
    with torch.no_grad():
        out = program.module()(*args)
    if isinstance(out, torch.Tensor):
        out = (out,)
    worst = 0.0
    for name, value in zip(spec.output_names, out):
        ref = case["outputs"][name].astype(np.float64)
        got = value.detach().double().numpy()
        worst = max(worst, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)))
    return worst
