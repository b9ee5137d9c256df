"""The jobs: export, calibrate, compile, validate. The CLI and the build recipe both call these.

Each job is a `*_work` function that does the work and returns what it found, plus a `*_job`
wrapper for the CLI that records it in the manifest (the manifest last). `diffprism build`
calls the same `*_work` functions and records into its stage records instead, so whatever
the CLI can build a recipe can build, by the same code.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from diffprism import manifest, sources
from diffprism.variant import Variant, resolve
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR, REFERENCE_DIR, ExportResult, export_pipeline
from exporters.files import clean_staging, write_json_atomic
from exporters.spec import ComponentSpec, ShapeRequest
from exporters.tree import read_tree_info
from targets.base import get_target
from validation.policy import Policy
from validation.validate import ValidationResult, validate

log = logging.getLogger(__name__)

REPORT_DIR = "report"
Progress = Callable[[str], None]
SourceLoader = Callable[[], Any]  # -> the torch pipeline, loaded on first need


# --- export -------------------------------------------------------------------------------------


def export_work(src: sources.Source, out: Path, *, components: list[str] | None = None,
                shapes: ShapeRequest = ShapeRequest(), opset: int = 18, streaming: bool = False,
                reference_points: str = "all", progress: Progress | None = None) -> tuple[ExportResult, dict[str, Any]]:
    """Export the loaded source into out/onnx and out/reference; returns the result and its stage entry."""
    result = export_pipeline(
        src.pipeline, out, components=components, shapes=shapes, opset=opset, source_info=src.info,
        progress=(lambda c, s: progress(f"{c}: {s}")) if progress else None, streaming=streaming,
        reference_points=reference_points,
    )
    entry = {
        "family": result.family,
        "opset": opset,
        "reference_points": reference_points,
        "components": {
            c.name: {"seconds": round(c.seconds, 2), "bytes": c.onnx_bytes, "spec": c.spec.to_json()}
            for c in result.components
        },
    }
    return result, entry


def export_job(source: str, out: Path, *, components: list[str] | None = None, shapes: ShapeRequest = ShapeRequest(),
               opset: int = 18, allow_pickle: bool = False, revision: str | None = None,
               progress: Progress | None = None, request: dict[str, Any] | None = None,
               streaming: bool = False, reference_points: str = "all") -> ExportResult:
    manifest.check_output_folder(out)
    clean_staging(out)
    if progress:
        progress(f"loading {source}")
    src = sources.load(source, allow_pickle=allow_pickle, revision=revision, empty=streaming)
    result, entry = export_work(src, out, components=components, shapes=shapes, opset=opset, streaming=streaming,
                                reference_points=reference_points, progress=progress)
    data = manifest.new(request or {"command": "export", "source": source})
    data["source"] = src.info
    data["stages"]["export"] = entry
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


def recorded_source(out: Path) -> SourceLoader:
    """A loader of the source the export recorded in its manifest (for jobs run after the export)."""
    def load() -> Any:
        recorded = (manifest.load(out) or {}).get("source")
        if not recorded:
            raise SourceError(f"{out} has no manifest recording its source", "re-run 'diffprism export SOURCE --out DIR'")
        return sources.load_recorded(recorded).pipeline

    return _once(load)


def _once(load: SourceLoader) -> SourceLoader:
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            cache.append(load())
        return cache[0]

    return get


# --- calibrate ----------------------------------------------------------------------------------


def calibrate_work(out: Path, source: SourceLoader, *, prompts: list[str] | None = None, num_prompts: int | None = None,
                   steps: int = 4, seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Capture real component inputs from the source into <out>/calibration; returns its stage entry."""
    from exporters import calibration

    _, specs = tree_specs(out)
    chosen = calibration.pick_prompts(prompts, num_prompts)
    pipeline = source()
    if progress:
        progress(f"denoising {len(chosen)} prompts x {steps} steps")
    folder = calibration.capture(pipeline, out, prompts=chosen, steps=steps, seed=seed, specs=specs)
    info = calibration.info(folder)
    entry = {k: info[k] for k in ("steps", "seeds", "height", "width", "counts", "scheduler")}
    entry["prompts"] = len(info["prompts"])
    return {"info": info, "entry": entry}


def calibrate_job(out: Path, *, prompts: list[str] | None = None, num_prompts: int | None = None, steps: int = 4,
                  seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    data = manifest.load(out)
    if not data or not data.get("source"):
        raise SourceError(f"{out} has no manifest recording its source", "re-run 'diffprism export SOURCE --out DIR'")
    if progress:
        progress(f"loading {data['source'].get('preset') or data['source'].get('path') or data['source'].get('repo_id')}")
    done = calibrate_work(out, recorded_source(out), prompts=prompts, num_prompts=num_prompts, steps=steps, seed=seed,
                          progress=progress)
    data["stages"]["calibrate"] = done["entry"]
    manifest.write(out, data)
    return done["info"]


def has_capture(out: Path) -> bool:
    from exporters.calibration import CALIBRATION_DIR

    return (out / CALIBRATION_DIR / "info.json").is_file()


# --- compile ------------------------------------------------------------------------------------


def compile_work(out: Path, variant: Variant, *, components: list[str] | None = None, source: SourceLoader,
                 progress: Progress | None = None):
    """Plan and build one variant from the ONNX tree; returns (BuildResult, its manifest entry)."""
    _, specs = tree_specs(out)
    specs = select(specs, components)
    tgt = get_target(variant.target)
    config = variant.config(components)
    plan = tgt.plan(out / ONNX_DIR, specs, config)
    if progress:
        progress(f"building {variant.key}")
    pipeline = None
    if tgt.needs_source(config):  # e.g. Core ML converts from the torch.export program; pruned/qat retrain it
        if progress:
            progress("loading the source pipeline")
        pipeline = source()
    result = tgt.build(plan, out, source=pipeline)
    entry = {
        "target": variant.target,
        "precision": variant.precision,
        "options": variant.options,
        "dir": result.out_dir.relative_to(out).as_posix() if result.out_dir.is_relative_to(out) else str(result.out_dir),
        "config": config.model_dump(mode="json"),
        "details": result.details,
        "note": result.note,
    }
    return result, entry


def compile_job(out: Path, *, target: str, precision: str | None, components: list[str] | None = None,
                options: dict[str, Any] | None = None, progress: Progress | None = None):
    """`diffprism compile`: build one variant; a calibrated precision without a capture captures first."""
    variant = Variant.of(target, precision, options)
    source = recorded_source(out)
    stages: dict[str, Any] = {}
    tgt = get_target(variant.target)
    if tgt.inputs(variant.config(components)).calibration == "required" and not has_capture(out):
        log.warning("%s needs a calibration capture and %s has none: running 'diffprism calibrate' with its "
                    "defaults first", variant.key, out)
        if progress:
            progress("no calibration capture yet: capturing with 'diffprism calibrate' defaults")
        stages["calibrate"] = calibrate_work(out, source, progress=progress)["entry"]
    result, entry = compile_work(out, variant, components=components, source=source, progress=progress)
    data = manifest.load(out) or manifest.new({"command": "compile"})
    data.setdefault("stages", {}).update(stages)
    data.setdefault("targets", {})[variant.key] = entry
    manifest.write(out, data)
    return result


# --- validate -----------------------------------------------------------------------------------


def split_options(target: str, options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variant options, runner options): options that are target config fields pick the variant."""
    fields = get_target(target).Config.model_fields
    options = dict(options or {})
    chosen = {k: options.pop(k) for k in list(options) if k in fields and k not in ("precision", "components")}
    return chosen, options


def validate_work(out: Path, variant: Variant, *, components: list[str] | None = None, policy: Policy = Policy(),
                  runner_options: dict[str, Any] | None = None, progress: Progress | None = None) -> ValidationResult:
    """Numerics against the PyTorch references, or the structural check where numerics cannot run here."""
    _, specs = tree_specs(out)
    specs = select(specs, components)
    tgt = get_target(variant.target)
    config = variant.config()
    artifacts = variant.folder(out)
    if not artifacts.is_dir():
        raise SourceError(f"no {variant.key} artifacts at {artifacts}",
                          f"run 'diffprism compile {out} --target {variant.target} --precision {variant.precision}' first")
    here = tgt.runner_availability()
    if not here.ok:
        # Numerics cannot run here (e.g. Core ML off macOS): check the artifacts' structure and say so.
        result = ValidationResult(variant.target, variant.tag, status="structural", numerics_skipped=here.reason)
        for name, spec in specs.items():
            if progress:
                progress(name)
            result.structure[name] = tgt.inspect(artifacts, spec, config)
        return result
    options = dict(runner_options or {})
    result = validate(specs, lambda spec: tgt.runner(artifacts, spec, **options), out / REFERENCE_DIR,
                      target=variant.target, precision=tgt.tolerance_row(config), policy=policy, progress=progress)
    result.precision = variant.tag
    return result


def validate_job(out: Path, *, target: str, precision: str | None = None,
                 components: list[str] | None = None, policy: Policy = Policy(),
                 runner_options: dict[str, Any] | None = None, progress: Progress | None = None) -> ValidationResult:
    chosen, runner = split_options(target, runner_options)
    variant = resolve(out, Variant.of(target, precision, chosen))
    result = validate_work(out, variant, components=components, policy=policy, runner_options=runner, progress=progress)
    record_validation(out, result)
    return result


def verdict_entry(result: ValidationResult) -> dict[str, Any]:
    """The manifest's record of one verdict: status passed, failed or structural (never passed off macOS)."""
    return {
        "passed": result.passed if result.status == "numeric" else None,
        "status": verdict_status(result),
        "verdict": result.verdict,
        "comparisons": len(result.comparisons),
        "failed": sum(not c.passed for c in result.comparisons),
        "runner": result.runner,
    }


def verdict_status(result: ValidationResult) -> str:
    if result.status == "structural":
        return "structural" if result.structure_ok else "failed"
    return "passed" if result.passed else "failed"


def record_validation(out: Path, result: ValidationResult) -> None:
    """Merge the verdict into report/validation.json and the manifest (manifest last)."""
    key = f"{result.target}-{result.precision}"
    report_path = out / REPORT_DIR / "validation.json"
    report = _read_json(report_path)
    report.setdefault("results", {})[key] = result.to_json()
    write_json_atomic(report_path, report)
    data = manifest.load(out) or manifest.new({"command": "validate"})
    data.setdefault("validation", {})[key] = verdict_entry(result)
    manifest.write(out, data)


def _read_json(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", path)
    return {}
