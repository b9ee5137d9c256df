"""The jobs: export, calibrate, compile, validate. The CLI and the build recipe both call these.

Each job is a `*_work` function that does the work and returns what it found, plus a `*_job`
wrapper for the CLI that records it in the manifest (the manifest last). `diffprism build`
calls the same `*_work` functions and records into its stage records instead, so whatever
the CLI can build a recipe can build, by the same code.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from diffprism import manifest, sources
from diffprism.variant import Variant, resolve
from exporters import weights_dtype
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR, REFERENCE_DIR, ExportResult, export_pipeline
from exporters.files import clean_staging, write_json_atomic
from exporters.spec import DEFAULT_REFERENCE_POINTS, ComponentSpec, ShapeRequest
from exporters.streaming import StreamingUnsupported
from exporters.tree import geometry as tree_geometry, read_tree_info
from targets.base import get_target
from validation.policy import Policy, loosest
from validation.validate import WEIGHTS_ONLY, ValidationResult, validate

log = logging.getLogger(__name__)

REPORT_DIR = "report"
Progress = Callable[[str], None]
SourceLoader = Callable[[], Any]  # -> the torch pipeline, loaded on first need


# --- export -------------------------------------------------------------------------------------


def export_work(src: sources.Source, out: Path, *, components: list[str] | None = None,
                shapes: ShapeRequest = ShapeRequest(), opset: int = 18, streaming: bool = False,
                reference_points: str = DEFAULT_REFERENCE_POINTS,
                progress: Progress | None = None, dtype: str = "fp32",
                memory_budget: str | int | None = None) -> tuple[ExportResult, dict[str, Any]]:
    """Export the loaded source into out/onnx and out/reference; returns the result and its stage entry."""
    result = export_pipeline(
        src.pipeline, out, components=components, shapes=shapes, opset=opset, source_info=src.info,
        progress=(lambda c, s: progress(f"{c}: {s}")) if progress else None, streaming=streaming,
        reference_points=reference_points, dtype=dtype, memory_budget=memory_budget,
    )
    entry = {
        "family": result.family,
        "opset": opset,
        **({"dtype": dtype} if dtype != "fp32" else {}),
        "streamed": streaming,
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
               streaming: bool | None = None, reference_points: str = DEFAULT_REFERENCE_POINTS,
               adapters: list[Any] | None = None, dtype: str = "fp32",
               memory_budget: str | int | None = None) -> ExportResult:
    """streaming=None: streamed for a folder source (same bytes, a fraction of the memory), with the
    plain export as the fallback when a component cannot be streamed; True/False force one path.
    adapters (exporters.lora.Adapter): LoRA fused into the weights before the trace (needs them in memory)."""
    manifest.check_output_folder(out)
    clean_staging(out)
    if progress:
        progress(f"loading {source}")
    if adapters:
        if streaming:
            raise UsageError("a LoRA export cannot be streamed: the adapters are fused into weights in memory",
                             "drop --streaming")
        streaming = False
    auto = streaming is None
    # Pickled weights cannot be streamed (only safetensors are read tensor by tensor).
    src = sources.load(source, allow_pickle=allow_pickle, revision=revision,
                       empty=bool(streaming) if not auto else not allow_pickle, components=components)
    if adapters:
        from exporters import lora

        lora.fuse(src.pipeline, adapters)
        src.info = {**src.info, "adapters": lora.record(adapters)}

    def run(src: sources.Source, streamed: bool) -> tuple[ExportResult, dict[str, Any]]:
        return export_work(src, out, components=components, shapes=shapes, opset=opset, streaming=streamed,
                           reference_points=reference_points, progress=progress, dtype=dtype,
                           memory_budget=memory_budget)

    try:
        result, entry = run(src, src.empty or bool(streaming))
    except StreamingUnsupported as exc:
        if not (auto and src.empty):
            raise
        log.warning("streamed export not possible (%s); loading the weights for the plain export", exc.message)
        src = sources.load(source, allow_pickle=allow_pickle, revision=revision, components=components)
        result, entry = run(src, False)
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


CAPTURE_RUNTIMES = ("torch", "openvino", "onnxruntime", "auto")


def capture_runtime(runtime: str) -> str:
    """'auto': the fastest runtime present for the exported fp32 graph (OpenVINO, then ONNX Runtime, then torch)."""
    if runtime not in CAPTURE_RUNTIMES:
        raise UsageError(f"unknown capture runtime '{runtime}'", f"choose from {', '.join(CAPTURE_RUNTIMES)}")
    if runtime != "auto":
        return runtime
    import importlib.util

    return next((m for m in ("openvino", "onnxruntime") if importlib.util.find_spec(m)), "torch")


def _graph_pipeline(out: Path, runtime: str):
    """diffusers' pipeline over the exported fp32 ONNX graphs on `runtime` (OpenVINO at the f32 hint: its
    trajectories match PyTorch's to ~1e-6), for a capture that need not run PyTorch eager."""
    from runtimes.pipeline import load_pipeline

    def make(name: str, spec: ComponentSpec):
        model = out / ONNX_DIR / name / "model.onnx"
        if runtime == "openvino":
            from runtimes.openvino_runner import OpenVinoRunner

            return OpenVinoRunner(spec, model, hint="f32")
        from runtimes.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(spec, model)

    return load_pipeline(out / ONNX_DIR, make)


def calibrate_work(out: Path, source: SourceLoader, *, prompts: list[str] | None = None, num_prompts: int | None = None,
                   steps: int = 4, seed: int = 0, runtime: str = "torch",
                   progress: Progress | None = None) -> dict[str, Any]:
    """Capture real component inputs into <out>/calibration; returns its stage entry. `runtime` runs the
    denoising loop: the PyTorch source ("torch") or the exported fp32 graph on a runtime (CAPTURE_RUNTIMES)."""
    from exporters import calibration
    from runtimes.pipeline import activate, close, runners

    info, specs = tree_specs(out)
    chosen = calibration.pick_prompts(prompts, num_prompts)
    runtime = capture_runtime(runtime)
    pipeline = source() if runtime == "torch" else _graph_pipeline(out, runtime)
    if progress:
        progress(f"denoising {len(chosen)} prompts x {steps} steps on {runtime}")
    try:
        activate(pipeline)  # compiled first, so each runner reports the configuration it runs with
        folder = calibration.capture(pipeline, out, prompts=chosen, steps=steps, seed=seed, specs=specs,
                                     geometry=tree_geometry(info),
                                     runtime={"name": runtime,
                                              "runner": {n: r.describe() for n, r in runners(pipeline).items()}})
    finally:
        close(pipeline)
    info = calibration.info(folder)
    entry = {k: info[k] for k in ("steps", "seeds", "height", "width", "counts", "scheduler")}
    entry["prompts"] = len(info["prompts"])
    if runtime != "torch":  # the default capture's entry stays as it was
        entry["runtime"] = runtime
    return {"info": info, "entry": entry}


def calibrate_job(out: Path, *, prompts: list[str] | None = None, num_prompts: int | None = None, steps: int = 4,
                  seed: int = 0, runtime: str = "torch", progress: Progress | None = None) -> dict[str, Any]:
    from exporters.calibration import CALIBRATION_DIR

    data = manifest.load(out)
    manifest.preflight(out, [CALIBRATION_DIR])
    if not data or not data.get("source"):
        raise SourceError(f"{out} has no manifest recording its source", "re-run 'diffprism export SOURCE --out DIR'")
    if progress:
        progress(f"loading {data['source'].get('preset') or data['source'].get('path') or data['source'].get('repo_id')}")
    done = calibrate_work(out, recorded_source(out), prompts=prompts, num_prompts=num_prompts, steps=steps, seed=seed,
                          runtime=runtime, progress=progress)
    manifest.commit(out, [CALIBRATION_DIR], lambda d: d.setdefault("stages", {}).__setitem__("calibrate", done["entry"]))
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
    from exporters.calibration import CALIBRATION_DIR

    variant = Variant.of(target, precision, options)
    source = recorded_source(out)
    stages: dict[str, Any] = {}
    tgt = get_target(variant.target)
    planned = variant.folder(out)
    owned = [] if planned == out / ONNX_DIR else [planned.relative_to(out).as_posix()]
    capture = tgt.inputs(variant.config(components)).calibration == "required" and not has_capture(out)
    manifest.preflight(out, owned + ([CALIBRATION_DIR] if capture else []))
    if capture:
        log.warning("%s needs a calibration capture and %s has none: running 'diffprism calibrate' with its "
                    "defaults first", variant.key, out)
        if progress:
            progress("no calibration capture yet: capturing with 'diffprism calibrate' defaults")
        stages["calibrate"] = calibrate_work(out, source, progress=progress)["entry"]
    result, entry = compile_work(out, variant, components=components, source=source, progress=progress)
    # The fp32 ONNX Runtime variant is the exported tree itself: compile wrote nothing there.
    owned = [] if entry["dir"] == ONNX_DIR else [entry["dir"]]

    def update(data: dict[str, Any]) -> None:
        data.setdefault("stages", {}).update(stages)
        data.setdefault("targets", {})[variant.key] = entry

    manifest.commit(out, owned + ([CALIBRATION_DIR] if stages else []), update, request={"command": "compile"})
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
    info, specs = tree_specs(out)
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
    # Judged as deployed (the variant's runtime configuration), with the weights-only check beside it.
    deploy = variant.runtime_options(runner_options)
    # Weights stored in half precision (export --dtype) bound what any variant of the tree can reach.
    row = loosest([tgt.tolerance_row(config), weights_dtype.of_info(info)])
    result = validate(specs, lambda spec: tgt.runner(artifacts, spec, **deploy), out / REFERENCE_DIR,
                      target=variant.target, precision=row, policy=policy, progress=progress)
    weights = tgt.weights_only_options(config)
    if weights is not None and {**deploy, **weights} != deploy:
        full = {**deploy, **weights}
        result.add_weights_only(validate(specs, lambda spec: tgt.runner(artifacts, spec, **full), out / REFERENCE_DIR,
                                         target=variant.target, precision=row, policy=policy,
                                         check=WEIGHTS_ONLY, progress=progress))
    result.precision = variant.tag
    return result


def validate_job(out: Path, *, target: str, precision: str | None = None,
                 components: list[str] | None = None, policy: Policy = Policy(),
                 runner_options: dict[str, Any] | None = None, progress: Progress | None = None) -> ValidationResult:
    chosen, runner = split_options(target, runner_options)
    variant = resolve(out, Variant.of(target, precision, chosen))
    artifacts = variant.folder(out)
    owned = [REPORT_DIR, *_unrecorded(out, artifacts)]
    manifest.preflight(out, owned)
    result = validate_work(out, variant, components=components, policy=policy, runner_options=runner, progress=progress)
    record_validation(out, result, variant, owned)
    return result


def _unrecorded(out: Path, artifacts: Path) -> list[str]:
    """The artifact folder when the manifest records none of it (engines built by a job elsewhere, e.g. the
    TensorRT build job): validating it records it. Files the manifest already lists are never re-blessed."""
    data = manifest.load(out) or {}
    if not artifacts.is_relative_to(out):
        return []
    rel = artifacts.relative_to(out).as_posix()
    return [] if any(f == rel or f.startswith(rel + "/") for f in data.get("files", {})) else [rel]


def verdict_entry(out: Path, result: ValidationResult, variant: Variant,
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's record of one verdict: status passed, failed or structural (never passed off macOS),
    with the sha256 of every file each component's check read; a partial run merges per component."""
    artifacts = variant.folder(out)
    structural = result.status == "structural"
    checked = manifest.checked_files(out, artifacts, result.structure if structural else result.runner,
                                     references=not structural)
    exported = list(tree_specs(out)[1])
    folder = artifacts.relative_to(out).as_posix() if artifacts.is_relative_to(out) else None
    return manifest.verdict_entry(result.to_json(), checked, exported, previous, folder=folder)


def record_validation(out: Path, result: ValidationResult, variant: Variant, owned: list[str]) -> None:
    """Merge the verdict into report/validation.json and the manifest (manifest last)."""
    key = variant.key
    report_path = out / REPORT_DIR / "validation.json"
    report = _read_json(report_path)
    report.setdefault("results", {})[key] = result.to_json()
    write_json_atomic(report_path, report)

    def update(data: dict[str, Any]) -> None:
        verdicts = data.setdefault("validation", {})
        verdicts[key] = verdict_entry(out, result, variant, verdicts.get(key))

    manifest.commit(out, owned, update, request={"command": "validate"})


def _read_json(path: Path) -> dict[str, Any]:
    from validation.report import read_json

    return read_json(path)
