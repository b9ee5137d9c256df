"""Compress one component of a source pipeline, distill it against the original, export it to ONNX."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from exporters.families import exporter_for
from exporters.compress import data, distill, prune, qat
from exporters.errors import UsageError
from exporters.export import export_component
from exporters.onnx_writer import ONNX_NAME
from exporters.spec import ComponentSpec

log = logging.getLogger(__name__)

METHODS = ("pruned", "qat")


@dataclass(frozen=True)
class CompressOptions:
    sparsity: float = 0.5  # fraction of weights (unstructured) or inner channels (structured) removed
    structured: bool = False
    scope: str = "global"  # unstructured threshold: one over all layers, or one per layer
    distill_steps: int = 20
    distill_lr: float = 1e-4
    distill_batch: int = 2  # feeds per step (feeds of equal shape are stacked)


@dataclass
class Student:
    """A compressed copy of one component, distilled against the original."""

    exporter: Any
    module: Any
    wrapper: Any
    held_feeds: list
    details: dict[str, Any]


def make_student(pipe: Any, spec: ComponentSpec, method: str, options: CompressOptions, out: Path) -> Student:
    """Compress and distill a deep copy of the component (the source pipeline is not modified)."""
    if method not in METHODS:
        raise UsageError(f"unknown compression method '{method}'", f"choose from {', '.join(METHODS)}")
    exporter = exporter_for(pipe, spec.name)
    teacher_module = exporter.module(pipe)
    student_module = copy.deepcopy(teacher_module).float()
    student_module.requires_grad_(True)
    teacher, student = exporter.wrap(teacher_module, spec), exporter.wrap(student_module, spec)
    train_feeds, held_feeds, source = data.split_feeds(out, spec)
    train = data.batches(train_feeds, spec, options.distill_batch)
    held = data.batches(held_feeds, spec, options.distill_batch)
    details: dict[str, Any] = {"method": method, "feeds": source, "parameters_before": prune.parameter_count(teacher_module)}

    if method == "pruned" and options.structured:
        details["structured"] = prune.prune_structured(student_module, options.sparsity)
    elif method == "pruned":
        prune.prune_unstructured(student_module, options.sparsity, options.scope)
        details["scope"] = options.scope
    else:
        quantizers = qat.attach(student_module)
        qat.calibrate(student, quantizers, train)
        details["fake_quantized_layers"] = len(quantizers)
    details["requested_sparsity"] = options.sparsity if method == "pruned" else None

    report = distill.distill(student, teacher, train, held, steps=options.distill_steps, lr=options.distill_lr,
                             batch=options.distill_batch)
    details["distillation"] = report.to_json()
    if method == "pruned":
        prune.make_permanent(student_module)
        details["weights"] = prune.sparsity_report(student_module)
    details["parameters_after"] = prune.parameter_count(student_module)
    if method == "qat":  # int8 weights with constant scales from here on (buffers, not parameters)
        details["int8_weights"] = qat.freeze_weights(student_module)
    student_module.requires_grad_(False)
    log.info("%s %s: %d -> %d parameters, held-out error %.4g -> %.4g", method, spec.name,
             details["parameters_before"], details["parameters_after"], report.error_before, report.error_after)
    return Student(exporter, student_module, student, held_feeds, details)


def export_student(student: Student, spec: ComponentSpec, dst: Path, opset: int) -> dict[str, Any]:
    """Write dst/{model.onnx, model.onnx_data, config.json} for the student; returns its facts."""
    holder = SimpleNamespace(**{student.exporter.attribute: student.module})  # the student in the pipeline's place
    export_component(holder, spec, dst, opset, exporter=student.exporter)
    details = dict(student.details)
    if details["method"] == "qat":
        details["qdq"] = qat.qdq_counts(dst / ONNX_NAME)
    details["export_rel_l2"] = _export_error(student.wrapper, spec, student.held_feeds[0], dst / ONNX_NAME)
    return details


def compress_component(pipe: Any, spec: ComponentSpec, method: str, options: CompressOptions, out: Path,
                       dst: Path, opset: int) -> dict[str, Any]:
    """Write dst/{model.onnx, model.onnx_data, config.json} for the compressed component; returns its facts."""
    return export_student(make_student(pipe, spec, method, options, out), spec, dst, opset)


def _export_error(student: Any, spec: ComponentSpec, feed: Any, path: Path) -> float:
    """rel. L2 of ONNX Runtime's output vs the torch student on one held-out feed: the export's own fidelity."""
    import numpy as np
    import onnxruntime as ort

    from exporters.reference import torch_outputs

    want = torch_outputs(student, spec, feed)[spec.output_names[0]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([spec.output_names[0]], {n: feed[n] for n in spec.input_names})[0]
    return round(float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)), 8)
