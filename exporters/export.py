"""export_pipeline: split a pipeline, trace each component once, write the ONNX tree and references."""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exporters import memory, onnx_writer, reference, tree, weights_dtype
from exporters import streaming as streaming_mod
from exporters.components import ComponentExporter
from exporters.families import Family, exporter_for, family_of, select_components
from exporters.geometry import Geometry, compute as compute_geometry, dims_for
from exporters.files import staged_dir
from exporters.spec import DEFAULT_REFERENCE_POINTS, ComponentSpec, ShapeRequest, select_points
from exporters.trace import trace

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
REFERENCE_DIR = "reference"

Progress = Callable[[str, str], None]  # (component, stage) -> None


@dataclass
class ComponentResult:
    name: str
    spec: ComponentSpec
    seconds: float
    onnx_bytes: int


@dataclass
class ExportResult:
    tree: Path
    family: str
    specs: dict[str, ComponentSpec]
    geometry: Geometry | None = None
    components: list[ComponentResult] = field(default_factory=list)
    references: dict[str, Path] = field(default_factory=dict)


def plan_export(pipe: Any, components: list[str] | None = None, shapes: ShapeRequest = ShapeRequest()
                ) -> tuple[Family, Geometry, dict[str, ComponentSpec]]:
    """Family, geometry and the specs an export would use, without tracing anything (checks the request)."""
    family = family_of(type(pipe).__name__)
    names = select_components(family, components, pipe)
    geometry = compute_geometry(pipe, family)
    specs = {}
    for name in names:
        exporter = family.exporter(pipe, name)
        spec = exporter.spec(pipe, geometry, dims_for(geometry, shapes, exporter))
        specs[name] = dataclasses.replace(spec, meta={**spec.meta, "kind": exporter.kind})
    return family, geometry, specs


def plan_specs(pipe: Any, components: list[str] | None = None, shapes: ShapeRequest = ShapeRequest()
               ) -> tuple[Family, dict[str, ComponentSpec]]:
    family, _, specs = plan_export(pipe, components, shapes)
    return family, specs


def trace_component(pipe: Any, spec: ComponentSpec) -> tuple[Any, Any]:
    """(wrapper, torch.export program) of one component: the one trace every format starts from."""
    exporter = exporter_for(pipe, spec.name)
    wrapper = exporter.wrap(exporter.module(pipe), spec)
    return wrapper, trace(wrapper, spec)


def export_component(pipe: Any, spec: ComponentSpec, directory: Path, opset: int,
                     streaming: bool = False, exporter: ComponentExporter | None = None, dtype: str = "fp32",
                     memory_budget: str | int | None = None) -> tuple[Any, Path]:
    """Trace one component and write directory/{model.onnx, model.onnx_data, config.json}.

    streaming=True traces without weights and streams them into the data file (exporters.streaming);
    the returned wrapper then runs PyTorch references with weights read layer by layer if the
    pipeline itself holds none. `exporter` defaults to the one the pipeline's family picks.
    dtype: the weights' storage dtype (exporters.weights_dtype), converted on the way into the data file.
    """
    exporter = exporter or exporter_for(pipe, spec.name)
    module = exporter.module(pipe)
    sizes = [p.numel() * 4 for p in module.parameters()]  # fp32: what tracing and references compute in
    if streaming or streaming_mod.has_no_storage(module):
        fix = f"raise --memory-budget, or export '{spec.name}' on a machine with more memory"
        memory.check("streamed export", max(sizes, default=0), fix=fix, override=memory_budget)
        memory.check("streamed reference", max(sizes, default=0), fix=fix, override=memory_budget)
        try:
            return _export_streamed(exporter, module, spec, directory, opset, dtype)
        except streaming_mod.StreamingUnsupported as exc:
            if streaming_mod.has_no_storage(module):
                raise
            log.warning("%s: streamed export not possible (%s); using the plain export", spec.name, exc.message)
    memory.check("plain export", sum(sizes), override=memory_budget,
                 fix="export from a diffusers folder with --streaming (weights are streamed from its safetensors)")
    wrapper = exporter.wrap(module, spec)
    program = trace(wrapper, spec)
    model = onnx_writer.to_onnx(program, spec, opset)
    weights_dtype.convert(model, dtype)
    path = onnx_writer.save(model, directory)
    tree.write_component_config(directory, exporter.config(module))
    del model, program
    return wrapper, path


def _export_streamed(exporter: Any, module: Any, spec: ComponentSpec, directory: Path, opset: int,
                     dtype: str = "fp32") -> tuple[Any, Path]:
    folder = streaming_mod.weights_folder(module)
    source = streaming_mod.source_for(module, folder)
    empty = streaming_mod.empty_copy(module)
    path = streaming_mod.export_streamed(exporter.wrap(empty, spec), empty, spec, source, directory, opset,
                                         edit=lambda model: weights_dtype.convert(model, dtype))
    tree.write_component_config(directory, exporter.config(module))
    if streaming_mod.has_no_storage(module):  # references: a fresh meta copy that reads weights per layer
        runnable = streaming_mod.empty_copy(module)
        streaming_mod.stream_weights_in_forward(runnable, source)
        return exporter.wrap(runnable, spec), path
    return exporter.wrap(module, spec), path


def _source_dir(pipe: Any, source_info: dict[str, Any] | None) -> Path | None:
    """The local folder the pipeline was loaded from, if any (its tokenizer files are copied)."""
    for candidate in ((source_info or {}).get("path"), getattr(pipe, "name_or_path", None)):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def export_pipeline(
    pipe: Any,
    out: Path,
    *,
    components: list[str] | None = None,
    shapes: ShapeRequest = ShapeRequest(),
    opset: int = onnx_writer.MIN_OPSET,
    source_info: dict[str, Any] | None = None,
    progress: Progress | None = None,
    streaming: bool = False,
    reference_points: str = DEFAULT_REFERENCE_POINTS,
    dtype: str = "fp32",
    memory_budget: str | int | None = None,
) -> ExportResult:
    """Write <out>/onnx (HF-ONNX tree) and <out>/reference (PyTorch outputs), each atomically.

    reference_points: "small" (min and a small off-square point), "all" validation points or "opt"
    (exporters.spec.select_points). dtype: weights stored in fp32, fp16 or bf16 (computed in fp32;
    exporters.weights_dtype); memory_budget: overrides the memory the steps are checked against.
    """
    onnx_writer.check_opset(opset)
    weights_dtype.numpy_dtype(dtype)  # checks the name
    family, geometry, specs = plan_export(pipe, components, shapes)
    result = ExportResult(out / ONNX_DIR, family.name, specs, geometry)
    notify = progress or (lambda component, stage: None)
    with staged_dir(out / ONNX_DIR) as tree_dir, staged_dir(out / REFERENCE_DIR) as ref_dir:
        for name, spec in specs.items():
            start = time.perf_counter()
            notify(name, "export")
            wrapper, path = export_component(pipe, spec, tree_dir / name, opset, streaming=streaming, dtype=dtype,
                                             memory_budget=memory_budget)
            notify(name, "reference")
            points = select_points(spec, reference_points)
            log.info("%s: PyTorch references at %d point(s)", name, len(points))
            reference.save(reference.compute(wrapper, spec, points), ref_dir / f"{name}.npz")
            size = path.stat().st_size + (path.parent / onnx_writer.DATA_NAME).stat().st_size
            result.components.append(ComponentResult(name, spec, time.perf_counter() - start, size))
            log.info("exported %s in %.1fs (%d bytes)", name, result.components[-1].seconds, size)
            del wrapper
            gc.collect()
        tree.write_pipeline_files(pipe, tree_dir, family.tokenizers, _source_dir(pipe, source_info))
        info = {"family": family.name, "precision": "fp32", "opset": opset, "source": source_info or {},
                "geometry": geometry.to_json(), "weights_dtype": dtype}
        tree.write_tree_info(tree_dir, info, specs)
    result.references = {name: out / REFERENCE_DIR / f"{name}.npz" for name in specs}
    return result
