"""Refit: a new export from an existing one with other weights and the same graphs (no re-trace).

`refit_export` reads an export folder and writes <dst>/onnx and <dst>/reference:

- every component's model.onnx keeps its graph; model.onnx_data is rewritten one tensor at a time
  (exporters.streaming.map_weights) from the fused torch pipeline's state dict, so the ONNX side
  never holds more than one weight;
- references are recomputed from the fused pipeline at the base export's shape points.

An initializer maps to a torch tensor by its name (the wrapper's state-dict key) or, when torch's
optimizer folded a layout op into it, through the single weight its `folded_from` metadata names
(a transposed Linear weight, a reshaped GroupNorm weight). Tensors no adapter touched must equal
the base's bytes: that checks the mapping on every refit. A touched weight that reached the graph
through an op the mapping cannot redo is refused (re-export with --lora instead).
"""
from __future__ import annotations

import ast
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from exporters import onnx_writer, reference, tree
from exporters.errors import ExportError
from exporters.export import ONNX_DIR, REFERENCE_DIR
from exporters.families import exporter_for
from exporters.files import staged_dir
from exporters.streaming import FOLDED_FROM_KEY, map_weights, prefix_of

log = logging.getLogger(__name__)

SAME, TRANSPOSE, RESHAPE = "same", "transpose", "reshape"


class RefitError(ExportError):
    """The export's graph holds a weight the refit cannot recompute."""


def plan_component(model_path: Path, weights: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """ONNX initializer name -> (state-dict key, layout) for every initializer made from one weight."""
    model = ir.load(str(model_path))  # external data stays on disk until read
    plan: dict[str, tuple[str, str]] = {}
    for name, value in model.graph.initializers.items():
        shape = tuple(value.shape.numpy()) if value.shape is not None else ()
        if name in weights:
            key, layout = name, SAME
        else:
            folded = value.metadata_props.get(FOLDED_FROM_KEY) or value.meta.get(FOLDED_FROM_KEY)
            if isinstance(folded, str):
                folded = ast.literal_eval(folded)
            sources = [s for s in folded or () if s in weights]
            if len(sources) != 1:
                if sources:
                    plan[name] = ("+".join(sources), "")  # several weights combined: refused if touched
                continue
            key = sources[0]
            w_shape = tuple(weights[key].shape)
            if len(w_shape) == 2 and shape == w_shape[::-1]:
                layout = TRANSPOSE
            elif int(np.prod(shape)) == int(np.prod(w_shape)):
                layout = RESHAPE
            else:
                plan[name] = (key, "")
                continue
        plan[name] = (key, layout)
    return plan


def _laid_out(weight: Any, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = weight.detach().cpu().numpy()
    if layout == TRANSPOSE:
        arr = arr.T
    return np.ascontiguousarray(arr.reshape(shape))


def rewrite_component(src_dir: Path, dst_dir: Path, weights: Mapping[str, Any], touched: set[str]) -> dict[str, int]:
    """Write dst_dir/model.onnx(+_data): src_dir's graph with its weights taken from `weights`.

    `touched`: state-dict keys the adapters may have changed; every other mapped tensor must equal
    the base's bytes. Returns counts (rewritten, changed).
    """
    plan = plan_component(src_dir / onnx_writer.ONNX_NAME, weights)
    for name, (key, layout) in plan.items():
        if not layout and any(k in touched for k in key.split("+")):
            raise RefitError(f"initializer '{name}' of {src_dir.name} was computed from adapted weight(s) {key} "
                             "through ops a refit cannot redo", "export again with --lora instead of refitting")
    counts = {"rewritten": 0, "changed": 0}

    def fn(name: str, array: np.ndarray) -> np.ndarray | None:
        key, layout = plan.get(name, ("", ""))
        if not layout:
            return None
        weight = weights[key]
        dtype = np.dtype(weight.detach().cpu().numpy().dtype) if weight.dtype.is_floating_point else None
        if array.size == 0:  # map_weights' probe: which dtype the tensor will have
            return np.empty((0,), dtype=dtype or array.dtype)
        new = _laid_out(weight, layout, array.shape)
        if new.dtype != array.dtype:
            raise RefitError(f"'{name}' is {array.dtype} in the export but '{key}' is {new.dtype} in the pipeline",
                             "refit an fp32 export (diffprism export) with a pipeline of the same precision")
        same = np.array_equal(new, array)
        if not same and key not in touched:
            raise RefitError(f"initializer '{name}' does not match '{key}' of the source pipeline, which no adapter "
                             "changes", "refit the export from the source its manifest records")
        counts["rewritten"] += 1
        counts["changed"] += int(not same)
        return new

    map_weights(src_dir, dst_dir, fn)
    for item in src_dir.iterdir():  # config.json and anything else beside the graph
        if item.name not in (onnx_writer.ONNX_NAME, onnx_writer.DATA_NAME):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst_dir / item.name)
    return counts


def refit_export(pipe: Any, out: Path, dst: Path, *, touched: Mapping[str, set[str]], record: dict[str, Any],
                 source_info: dict[str, Any]) -> dict[str, Any]:
    """Write <dst>/onnx and <dst>/reference from the export in <out> with the weights of `pipe`.

    `touched`: per pipeline attribute, the parameter names the adapters (the base's and the new ones)
    adapt. Returns `record` with per-component counts added.
    """
    src = out / ONNX_DIR
    info, specs = tree.read_tree_info(src)
    record = {**record, "components": {}}
    with staged_dir(dst / ONNX_DIR) as tree_dir, staged_dir(dst / REFERENCE_DIR) as ref_dir:
        for item in src.iterdir():  # model_index.json, scheduler/, tokenizer*/
            if item.name != tree.TREE_INFO and item.name not in specs:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tree_dir / item.name)
        for name, spec in specs.items():
            exporter = exporter_for(pipe, name)
            module = exporter.module(pipe)
            wrapper = exporter.wrap(module, spec)
            prefix = prefix_of(wrapper, module)
            if prefix is None:
                raise RefitError(f"the {name} exporter's wrapper does not hold its module", "export again with --lora")
            names = touched.get(exporter.attribute, set())
            weights = wrapper.state_dict()
            counts = rewrite_component(src / name, tree_dir / name, weights, {prefix + n for n in names})
            ref = out / REFERENCE_DIR / f"{name}.npz"
            points = [(p, case["dims"]) for p, case in reference.load(ref).items()] if ref.is_file() else None
            reference.save(reference.compute(wrapper, spec, points), ref_dir / ref.name)
            record["components"][name] = counts
            log.info("%s: %d tensors rewritten, %d changed", name, counts["rewritten"], counts["changed"])
        tree.write_tree_info(tree_dir, {**info, "source": source_info, "refit": record}, specs)
    return record
