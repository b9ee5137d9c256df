"""The front door's jobs: export, validate, compile. The CLI and the build recipe both call these."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from diffprism import manifest, sources
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR, REFERENCE_DIR, ExportResult, export_pipeline
from exporters.files import clean_staging, write_json_atomic
from exporters.spec import DEFAULT_REFERENCE_POINTS, ComponentSpec, ShapeRequest
from exporters.streaming import StreamingUnsupported
from exporters.tree import geometry as tree_geometry, read_tree_info
from targets.base import get_target
from validation.policy import Policy
from validation.validate import ValidationResult, validate

log = logging.getLogger(__name__)

REPORT_DIR = "report"
Progress = Callable[[str], None]


def export_job(source: str, out: Path, *, components: list[str] | None = None, shapes: ShapeRequest = ShapeRequest(),
               opset: int = 18, allow_pickle: bool = False, revision: str | None = None,
               progress: Progress | None = None, request: dict[str, Any] | None = None,
               streaming: bool | None = None, reference_points: str = DEFAULT_REFERENCE_POINTS) -> ExportResult:
    """streaming=None: streamed for a folder source (same bytes, a fraction of the memory), with the
    plain export as the fallback when a component cannot be streamed; True/False force one path."""
    manifest.check_output_folder(out)
    clean_staging(out)
    if progress:
        progress(f"loading {source}")
    auto = streaming is None
    # Pickled weights cannot be streamed (only safetensors are read tensor by tensor).
    src = sources.load(source, allow_pickle=allow_pickle, revision=revision,
                       empty=bool(streaming) if not auto else not allow_pickle,
                       components=components)
    streamed = src.empty

    def run(src: sources.Source, streamed: bool) -> ExportResult:
        return export_pipeline(
            src.pipeline, out, components=components, shapes=shapes, opset=opset, source_info=src.info,
            progress=(lambda c, s: progress(f"{c}: {s}")) if progress else None, streaming=streamed,
            reference_points=reference_points,
        )

    try:
        result = run(src, streamed or bool(streaming))
    except StreamingUnsupported as exc:
        if not (auto and streamed):
            raise
        log.warning("streamed export not possible (%s); loading the weights for the plain export", exc.message)
        src = sources.load(source, allow_pickle=allow_pickle, revision=revision, components=components)
        streamed = False
        result = run(src, False)
    data = manifest.new(request or {"command": "export", "source": source})
    data["source"] = src.info
    data["stages"]["export"] = {
        "family": result.family,
        "opset": opset,
        "streamed": streamed,
        "reference_points": reference_points,
        "components": {
            c.name: {"seconds": round(c.seconds, 2), "bytes": c.onnx_bytes, "spec": c.spec.to_json()}
            for c in result.components
        },
    }
    manifest.write(out, data)
    return result


def tree_specs(out: Path) -> tuple[dict[str, Any], dict[str, ComponentSpec]]:
    tree = out / ONNX_DIR
    if not tree.is_dir():
        raise SourceError(f"{out} has no exported ONNX tree ({ONNX_DIR}/)", "run 'diffprism export SOURCE --out DIR' first")
    return read_tree_info(tree)


def select(specs: dict[str, ComponentSpec], components: list[str] | None) -> dict[str, ComponentSpec]:
    if not components:
        return specs
    unknown = [c for c in components if c not in specs]
    if unknown:
        raise UsageError(f"component(s) {unknown} are not in this export", f"exported: {list(specs)}")
    return {n: s for n, s in specs.items() if n in components}


def validate_job(out: Path, *, target: str = "onnxruntime", precision: str | None = "fp32",
                 components: list[str] | None = None, policy: Policy = Policy(),
                 runner_options: dict[str, Any] | None = None, progress: Progress | None = None) -> ValidationResult:
    _, exported = tree_specs(out)
    specs = select(exported, components)
    tgt = get_target(target)
    options = dict(runner_options or {})
    # Options that are target config fields (e.g. Core ML compress) pick the variant; the rest go to the runner.
    variant = {k: options.pop(k) for k in list(options) if k in tgt.Config.model_fields and k != "precision"}
    config = tgt.config(precision=precision, **variant)
    precision = config.precision
    label = tgt.variant_label(config) if hasattr(tgt, "variant_label") else precision  # e.g. fp16-palettize4
    artifacts = tgt.output_dir(out, config)
    if not artifacts.is_dir():
        raise SourceError(f"no {target} {precision} artifacts at {artifacts}",
                          f"run 'diffprism compile {out} --target {target} --precision {precision}' first")
    owned = [REPORT_DIR, *_unrecorded(out, artifacts)]
    manifest.preflight(out, owned)
    missing = tgt.runner_availability() if hasattr(tgt, "inspect") else None
    if missing is not None and not missing.ok:
        # Numerics cannot run here (e.g. Core ML off macOS): check the artifacts' structure and say so.
        result = ValidationResult(target, label, status="structural", numerics_skipped=missing.reason)
        for name, spec in specs.items():
            if progress:
                progress(name)
            result.structure[name] = tgt.inspect(artifacts, spec, config)
        record_validation(out, result, artifacts, list(exported), owned, references=False)
        return result
    tolerance = tgt.tolerance_precision(config) if hasattr(tgt, "tolerance_precision") else precision
    result = validate(specs, lambda spec: tgt.runner(artifacts, spec, **options), out / REFERENCE_DIR,
                      target=target, precision=tolerance, policy=policy, progress=progress)
    result.precision = label
    record_validation(out, result, artifacts, list(exported), owned)
    return result


def _unrecorded(out: Path, artifacts: Path) -> list[str]:
    """The artifact folder when the manifest records none of it (engines built by a job elsewhere, e.g. the
    TensorRT build job): validating it records it. Files the manifest already lists are never re-blessed."""
    data = manifest.load(out) or {}
    if not artifacts.is_relative_to(out):
        return []
    rel = artifacts.relative_to(out).as_posix()
    return [] if any(f == rel or f.startswith(rel + "/") for f in data.get("files", {})) else [rel]


def record_validation(out: Path, result: ValidationResult, artifacts: Path, exported: list[str],
                      owned: list[str], *, references: bool = True) -> None:
    """Merge the verdict into report/validation.json and the manifest (manifest last), naming the
    sha256 of every file each component's check read; a partial run merges per component."""
    key = f"{result.target}-{result.precision}"
    checked = manifest.checked_files(out, artifacts, result.structure or result.runner, references=references)
    report_path = out / REPORT_DIR / "validation.json"
    report = _read_json(report_path)
    report.setdefault("results", {})[key] = result.to_json()
    write_json_atomic(report_path, report)
    folder = artifacts.relative_to(out).as_posix() if artifacts.is_relative_to(out) else None

    def update(data: dict[str, Any]) -> None:
        verdicts = data.setdefault("validation", {})
        verdicts[key] = manifest.verdict_entry(result.to_json(), checked, exported, verdicts.get(key), folder=folder)

    manifest.commit(out, owned, update, request={"command": "validate"})


def _read_json(path: Path) -> dict[str, Any]:
    from validation.report import read_json

    return read_json(path)


def compile_job(out: Path, *, target: str, precision: str | None, components: list[str] | None = None,
                options: dict[str, Any] | None = None, progress: Progress | None = None):
    """Plan and build one target variant from the ONNX tree; records it in the manifest."""
    _, specs = tree_specs(out)
    specs = select(specs, components)
    tgt = get_target(target)
    config = tgt.config(precision=precision, components=components, **(options or {}))
    planned = tgt.output_dir(out, config)
    manifest.preflight(out, [] if planned == out / ONNX_DIR else [planned.relative_to(out).as_posix()])
    plan = tgt.plan(out / ONNX_DIR, specs, config)
    if progress:
        progress(f"building {target} {config.precision}")
    needs_source = getattr(tgt, "needs_source", False)  # e.g. Core ML converts from the torch.export program
    if callable(needs_source):  # per variant, e.g. ONNX Runtime's pruned/qat compress the torch model
        needs_source = needs_source(config)
    if needs_source:
        recorded = (manifest.load(out) or {}).get("source")
        if not recorded:
            raise SourceError(f"{out} has no manifest recording its source, which the {target} build needs",
                              "re-run 'diffprism export SOURCE --out DIR'")
        if progress:
            progress("reloading the source pipeline")
        result = tgt.build(plan, out, source=sources.load_recorded(recorded).pipeline)
    else:
        result = tgt.build(plan, out)
    variant = f"{target}-{config.precision}"
    if getattr(config, "compress", "none") != "none":  # compressed variants sit beside the plain one
        variant += f"-{config.compress}"
    elif hasattr(tgt, "variant_label"):  # e.g. onnxruntime-pruned-structured beside onnxruntime-pruned
        variant = f"{target}-{tgt.variant_label(config)}"
    rel = result.out_dir.relative_to(out).as_posix() if result.out_dir.is_relative_to(out) else str(result.out_dir)
    entry = {"dir": rel, "config": config.model_dump(), "details": result.details, "note": result.note}
    # The fp32 ONNX Runtime variant is the exported tree itself: compile wrote nothing there.
    owned = [] if rel == ONNX_DIR else [rel]
    manifest.commit(out, owned, lambda data: data.setdefault("targets", {}).__setitem__(variant, entry),
                    request={"command": "compile"})
    return result


def calibrate_job(out: Path, *, prompts: list[str] | None = None, num_prompts: int | None = None, steps: int = 4,
                  seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Capture real component inputs from the export's own source into <out>/calibration (manifest last)."""
    from exporters import calibration

    info, specs = tree_specs(out)
    geometry = tree_geometry(info)
    data = manifest.load(out)
    manifest.preflight(out, [calibration.CALIBRATION_DIR])
    if not data or not data.get("source"):
        raise SourceError(f"{out} has no manifest recording its source", "re-run 'diffprism export SOURCE --out DIR'")
    chosen = calibration.pick_prompts(prompts, num_prompts)
    if progress:
        progress(f"loading {data['source'].get('preset') or data['source'].get('path') or data['source'].get('repo_id')}")
    src = sources.load_recorded(data["source"])
    if progress:
        progress(f"denoising {len(chosen)} prompts x {steps} steps")
    folder = calibration.capture(src.pipeline, out, prompts=chosen, steps=steps, seed=seed, specs=specs,
                                 geometry=geometry)
    info = calibration.info(folder)
    stage = {k: info[k] for k in ("steps", "seeds", "height", "width", "counts", "scheduler")}
    stage["prompts"] = len(info["prompts"])
    manifest.commit(out, [folder.relative_to(out).as_posix()],
                    lambda d: d.setdefault("stages", {}).__setitem__("calibrate", stage))
    return info
