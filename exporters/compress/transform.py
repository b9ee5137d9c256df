"""Compression as a source transform: a compressed copy of an export that every target compiles.

`compress_export` reads an export folder (onnx/ + reference/) and writes a new one:

  <dst>/onnx/        the same HF-ONNX tree, the compressed components re-exported from their
                     distilled torch students, the rest copied; its diffprism.json records the
                     transform (method, options, per-component facts) beside the geometry
  <dst>/reference/   PyTorch references of the students, at the shape points of the original's
  <dst>/torch/<component>/model.safetensors
                     the students' weights (pruned methods), from which `load_student` rebuilds
                     the torch pipeline that calibration and Core ML conversion start from

The new folder is an export like any other: `diffprism compile DST --target openvino --precision
int8` builds the pruned model for OpenVINO, as ModelOpt's prune-then-export flow does.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

from exporters import reference, tree
from exporters.compress import prune
from exporters.compress.build import CompressOptions, export_student, make_student
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR, REFERENCE_DIR
from exporters.families import exporter_for
from exporters.files import staged_dir

log = logging.getLogger(__name__)

TORCH_DIR = "torch"
WEIGHTS = "model.safetensors"
# transform name -> (compress method, structured); the name is also the default folder suffix.
TRANSFORMS = {"pruned": ("pruned", False), "pruned-structured": ("pruned", True), "qat": ("qat", False)}
RELOADABLE = ("pruned",)  # the QAT student's fake-quant layers are not rebuilt from weights


def options_for(transform: str, **values: Any) -> CompressOptions:
    if transform not in TRANSFORMS:
        raise UsageError(f"unknown compression '{transform}'", f"choose from {', '.join(TRANSFORMS)}")
    return CompressOptions(structured=TRANSFORMS[transform][1], **values)


def compress_export(pipe: Any, out: Path, dst: Path, *, transform: str, options: CompressOptions | None = None,
                    components: list[str] | None = None) -> dict[str, Any]:
    """Write the compressed export <dst>/{onnx, reference, torch}; returns the transform's record.

    `pipe` is the export's source pipeline (unchanged); `components` defaults to the denoiser.
    Distillation feeds come from <out>/calibration if captured there, else <out>/reference.
    """
    options = options_for(transform) if options is None else options
    if transform not in TRANSFORMS:
        raise UsageError(f"unknown compression '{transform}'", f"choose from {', '.join(TRANSFORMS)}")
    method = TRANSFORMS[transform][0]
    src = out / ONNX_DIR
    info, specs = tree.read_tree_info(src)
    geometry = tree.geometry(info)
    names = components or [geometry.denoiser]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise UsageError(f"component(s) {unknown} are not in this export", f"exported: {list(specs)}")
    record: dict[str, Any] = {"transform": transform, "method": method, "options": dataclasses.asdict(options),
                              "from": str(out.resolve()), "components": {}}
    opset = int(info.get("opset", 18))
    with staged_dir(dst / ONNX_DIR) as tree_dir, staged_dir(dst / REFERENCE_DIR) as ref_dir, \
            staged_dir(dst / TORCH_DIR) as torch_dir:
        for item in src.iterdir():  # model_index.json, scheduler/, tokenizer*/ and the untouched components
            if item.name == tree.TREE_INFO or item.name in names:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tree_dir / item.name)
        for name, spec in specs.items():
            ref = out / REFERENCE_DIR / f"{name}.npz"
            if name not in names:
                if ref.is_file():
                    shutil.copy2(ref, ref_dir / ref.name)
                continue
            student = make_student(pipe, spec, method, options, out)
            details = export_student(student, spec, tree_dir / name, opset)
            points = [(p, case["dims"]) for p, case in reference.load(ref).items()] if ref.is_file() else None
            reference.save(reference.compute(student.wrapper, spec, points), ref_dir / ref.name)
            if method in RELOADABLE:
                from safetensors.torch import save_file

                (torch_dir / name).mkdir(parents=True)
                save_file({k: v.contiguous() for k, v in student.module.state_dict().items()},
                          str(torch_dir / name / WEIGHTS))
            details["torch_weights"] = method in RELOADABLE
            record["components"][name] = details
        tree.write_tree_info(tree_dir, {**info, "transform": record}, specs)
    return record


def load_student(pipe: Any, folder: Path, components: list[str]) -> Any:
    """Put the students saved in <folder>/torch into the source pipeline (in place); returns it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    for name in components:
        path = Path(folder) / TORCH_DIR / name / WEIGHTS
        if not path.is_file():
            raise SourceError(f"the compressed export keeps no torch weights for '{name}' ({path})",
                              "the qat transform exports ONNX only; use a pruned transform for targets that "
                              "convert from PyTorch (Core ML)")
        module = exporter_for(pipe, name).module(pipe)
        with safe_open(str(path), framework="pt") as f:
            shapes: Mapping[str, tuple[int, ...]] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        prune.shrink_to(module, shapes)
        module.load_state_dict(load_file(str(path)), strict=True)
        module.eval()
    return pipe
