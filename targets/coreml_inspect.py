"""Structural checks of a Core ML package against its ComponentSpec: what Linux can prove.

Reads the package as a protobuf spec (no Core ML framework needed): input/output names,
dtypes and shape ranges, the weight precision and compression visible in the ML program
(fp16 consts; constexpr_lut_to_dense for palettization; constexpr_affine_dequantize or
constexpr_blockwise_shift_scale for 8-bit linear), the op histogram and the metadata.
It proves nothing about numerics, which need Core ML predictions (macOS).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from exporters.spec import Axis, ComponentSpec

PALETTIZE_OPS = ("constexpr_lut_to_dense",)
LINEAR8_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
REQUIRED_METADATA = ("diffprism.component", "diffprism.precision", "diffprism.compress", "diffprism.shapes",
                     "diffprism.spec", "diffprism.source", "diffprism.versions")


def _operations(block) -> list:
    """Every op of a MIL block, nested blocks included."""
    ops = []
    for op in block.operations:
        ops.append(op)
        for inner in op.blocks:
            ops.extend(_operations(inner))
    return ops


def _elements(tensor_type) -> int:
    n = 1
    for d in tensor_type.dimensions:
        n *= d.constant.size if d.HasField("constant") else 1
    return n


def _feature_dtype(feature) -> str:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(feature.type.multiArrayType.dataType).lower()


def _feature_shapes(feature) -> dict[str, Any]:
    """{"range": [[lo, hi], ...]} or {"enumerated": [[...], ...]} or {"static": [...]} of an input."""
    array = feature.type.multiArrayType
    if array.HasField("shapeRange"):
        return {"range": [[r.lowerBound, r.upperBound] for r in array.shapeRange.sizeRanges]}
    if array.HasField("enumeratedShapes"):  # in stored order: from iOS 18 shape i of each input goes together
        return {"enumerated": [list(s.shape) for s in array.enumeratedShapes.shapes]}
    return {"static": list(array.shape)}


def expected_shapes(spec: ComponentSpec, tensor_name: str, mode: str, points: list[dict[str, int]] | None,
                    enumerated: list[str] | None = None) -> dict:
    """What an input must declare: enumerated inputs list one shape per point, in point order (the
    first is the default); in an enumerated package every other input is static at the first point."""
    tensor = spec.input(tensor_name)
    if mode == "enumerated":
        if not points:
            return {"enumerated": "the package records no enumerated points"}
        if tensor_name in (enumerated or []):
            return {"enumerated": [list(spec.shape(tensor, p)) for p in points]}
        return {"static": list(spec.shape(tensor, points[0]))}
    if mode == "static" or all(spec.dim(a.dim).is_static for a in tensor.axes if isinstance(a, Axis)):
        return {"static": list(spec.shape(tensor, spec.dim_values("opt")))}
    ranges = []
    for a in tensor.axes:
        if isinstance(a, int):
            ranges.append([a, a])
        else:
            d = spec.dim(a.dim)
            ranges.append([a.size(d.min), a.size(d.max)])
    return {"range": ranges}


def enumeration_problems(enumerated: list[str], io: dict[str, Any], deployment_target: str) -> list[str]:
    """coremltools' rules, checked on the package: one enumerated input below iOS 18 / macOS 15, equal
    counts from there on, at least two shapes each."""
    from targets.coreml_convert import MULTI_ENUMERATED

    found = {n: v["enumerated"] for n, v in io.items() if "enumerated" in v}
    problems = []
    if sorted(found) != sorted(enumerated):
        problems.append(f"enumerated inputs {sorted(found)} != recorded {sorted(enumerated)}")
    if len(found) > 1 and deployment_target not in MULTI_ENUMERATED:
        problems.append(f"{len(found)} enumerated inputs, but {deployment_target or 'this target'} takes one "
                        "(several need iOS 18 / macOS 15)")
    if len({len(v) for v in found.values()}) > 1:
        problems.append(f"enumerated inputs with different shape counts {({n: len(v) for n, v in found.items()})}")
    problems += [f"input {n} enumerates {len(v)} shape(s); Core ML needs at least two" for n, v in found.items()
                 if len(v) < 2]
    return problems
def read_spec(package: Path):
    """The model specification of an .mlpackage, read without coremltools' package class (which
    rewrites Manifest.json on open: a check must not change the artifact it checks)."""
    from coremltools.proto import Model_pb2

    manifest = json.loads((package / "Manifest.json").read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    pb = Model_pb2.Model()
    pb.ParseFromString((package / "Data" / root["path"]).read_bytes())
    return pb


def inspect_package(path: Path, spec: ComponentSpec, *, precision: str, compress: str) -> dict[str, Any]:
    """Facts about the package and the problems found ({"ok", "problems", ...}); never raises on a mismatch."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    problems: list[str] = []
    pb = read_spec(path) if path.is_dir() else ct.utils.load_spec(str(path))
    if pb.WhichOneof("Type") != "mlProgram":
        return {"ok": False, "problems": [f"{path.name} is not an ML program ({pb.WhichOneof('Type')})"]}
    meta = dict(pb.description.metadata.userDefined)
    missing_meta = [k for k in REQUIRED_METADATA if k not in meta]
    if missing_meta:
        problems.append(f"metadata lacks {missing_meta}")
    if pb.description.metadata.author != "diffprism":
        problems.append(f"author is {pb.description.metadata.author!r}, not 'diffprism'")
    mode = meta.get("diffprism.shapes", "range")
    points = json.loads(meta.get("diffprism.enumerated", "null"))
    enumerated = json.loads(meta.get("diffprism.enumerated_inputs", "null"))
    if meta.get("diffprism.precision", precision) != precision:
        problems.append(f"metadata precision {meta.get('diffprism.precision')} != requested {precision}")
    if meta.get("diffprism.compress", compress) != compress:
        problems.append(f"metadata compression {meta.get('diffprism.compress')} != requested {compress}")

    # -- inputs and outputs ------------------------------------------------------------------
    # Feature names are identifiers in Core ML; the package records how spec names were renamed.
    renamed = json.loads(meta.get("diffprism.io_names", "{}"))
    unknown = [n for n in renamed if n not in (*spec.input_names, *spec.output_names)]
    if unknown:
        problems.append(f"metadata renames unknown tensors {unknown}")
    inputs = {next((k for k, v in renamed.items() if v == f.name), f.name): f for f in pb.description.input}
    outputs = {next((k for k, v in renamed.items() if v == f.name), f.name): f for f in pb.description.output}
    if list(inputs) != spec.input_names:
        problems.append(f"inputs {list(inputs)} != spec {spec.input_names}")
    if list(outputs) != spec.output_names:
        problems.append(f"outputs {list(outputs)} != spec {spec.output_names}")
    io: dict[str, Any] = {}
    for t in spec.inputs:
        if t.name not in inputs:
            continue
        dtype = _feature_dtype(inputs[t.name])
        want_dtype = "int32" if t.dtype.startswith(("int", "uint")) else "float32"
        if dtype != want_dtype:
            problems.append(f"input {t.name} is {dtype}, expected {want_dtype}")
        shapes = _feature_shapes(inputs[t.name])
        want = expected_shapes(spec, t.name, mode, points, enumerated)
        if shapes != want:
            problems.append(f"input {t.name} shapes {shapes} != expected {want}")
        io[t.name] = {"dtype": dtype, **shapes}
    for t in spec.outputs:
        if t.name in outputs:
            dtype = _feature_dtype(outputs[t.name])
            if dtype != "float32":
                problems.append(f"output {t.name} is {dtype}, expected float32")
            io[t.name] = {"dtype": dtype}

    # -- program: ops, weight precision, compression ------------------------------------------
    main = pb.mlProgram.functions["main"]
    ops = _operations(main.block_specializations[main.opset])
    histogram = Counter(op.type for op in ops)
    weights = Counter()  # dtype of float consts with more than 64 elements (weights, not scalars)
    for op in ops:
        if op.type == "const":
            tensor = op.outputs[0].type.tensorType
            name = MIL_pb2.DataType.Name(tensor.dataType).lower()
            if name.startswith(("float", "bfloat")) and _elements(tensor) > 64:
                weights[name] += 1
    if precision == "fp16" and weights.get("float32", 0):
        problems.append(f"{weights['float32']} float32 weight tensors in an fp16 package")
    if precision == "fp32" and weights.get("float16", 0):
        problems.append(f"{weights['float16']} float16 weight tensors in an fp32 package")
    palettized = sum(histogram[o] for o in PALETTIZE_OPS)
    quantized = sum(histogram[o] for o in LINEAR8_OPS)
    if compress.startswith("palettize") and not palettized:
        problems.append("no palettized weights (constexpr_lut_to_dense) in a palettized package")
    if compress == "linear8" and not quantized:
        problems.append("no 8-bit linear weights (constexpr_affine_dequantize/blockwise_shift_scale)")
    if compress == "none" and (palettized or quantized):
        problems.append("compressed weights in a package built without compression")
    if mode == "enumerated":
        problems += enumeration_problems(enumerated or [], io, meta.get("diffprism.minimum_deployment_target", ""))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "ok": not problems,
        "problems": problems,
        "io": io,
        "renamed": renamed,
        "shapes": mode,
        "opset": main.opset,
        "ops": dict(sorted(histogram.items())),
        "weights": dict(weights),
        "palettized_ops": palettized,
        "linear8_ops": quantized,
        "bytes": size,
    }
