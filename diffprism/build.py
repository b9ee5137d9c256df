"""`diffprism build RECIPE`: export -> calibration -> compile per target -> validate -> report -> manifest.

Every stage has a content key: sha256 over what determines its outputs (the source's
weights or preset+seed, the recipe section it reads, the tool versions, the key of the
stage it builds on). After a stage's outputs are in place, a record
`.stages/<stage>.json` = {key, outputs with sha256} is written atomically. A rerun skips
a stage whose record has the same key and whose outputs still hash the same; anything
else runs again. So an unchanged rerun does nothing, a changed precision rebuilds only
its target, and a killed build resumes where it stopped.

With a store (diffprism.store), a stage missing here is pulled by key before it is
built, and every stage built here is pushed. `merge=True` never builds: it pulls every
stage (export, each target, each verdict) from the store and writes the final manifest;
that is the last job of a per-platform CI matrix.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffprism import manifest, sources
from diffprism.jobs import REPORT_DIR, select
from diffprism.lock import folder_lock
from diffprism.recipe import BuildSpec, Recipe
from diffprism.store import Store
from exporters.errors import SourceError
from exporters.export import ONNX_DIR, REFERENCE_DIR, export_pipeline
from exporters.files import clean_staging, sha256_file, write_json_atomic
from exporters.tree import read_tree_info
from targets.base import get_target

log = logging.getLogger(__name__)

STAGES_DIR = manifest.STAGES  # excluded from the artifact set
EXPORT_TOOLS = ("diffprism", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx-ir", "numpy")
TARGET_TOOLS = {
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino", "nncf"),
    "tensorrt": ("tensorrt", "polygraphy"),
    "coreml": ("coremltools",),
}
CALIBRATED = ("int8",)  # precisions whose quantizers read the calibration capture

Progress = Callable[[str], None]


@dataclass
class StageOutcome:
    name: str
    key: str
    action: str  # "built", "skipped", "pulled"
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildReport:
    out: Path
    stages: list[StageOutcome] = field(default_factory=list)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.verdicts) and all(v["passed"] for v in self.verdicts.values())

    def actions(self) -> dict[str, str]:
        return {s.name: s.action for s in self.stages}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _tool_versions(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def source_identity(recipe: Recipe) -> dict[str, Any]:
    """What the exported weights depend on: preset+seed, the folder's weight digest, or Hub id+revision."""
    src = recipe.source
    if src.preset:
        return {"preset": src.preset, "seed": src.seed}
    if src.path:
        path = Path(src.path).expanduser()
        sources.check_folder(path, src.allow_pickle, recipe.components)
        return {"weights_sha256": sources.weights_digest(path)}
    if not src.revision:
        log.warning("hub source %s has no revision: pin a commit so reruns build the same weights", src.hub)
    return {"hub": src.hub, "revision": src.revision}


def needs_calibration(build: BuildSpec) -> bool:
    # quantize_activations=[] asks for weight-only int8, which reads no captured inputs.
    return build.precision in CALIBRATED and build.options.get("quantize_activations") != []


class Keys:
    """Stage keys of one recipe (pure: computable on any machine, no model loaded)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.export = _digest({"source": source_identity(recipe), "export": recipe.digest("components", "shapes", "opset"),
                               "tools": _tool_versions(EXPORT_TOOLS)})
        self.calibration = _digest({"export": self.export, "calibration": recipe.digest("calibration")})

    def compile(self, build: BuildSpec) -> str:
        base = self.calibration if needs_calibration(build) else self.export
        return _digest({"base": base, "build": build.model_dump(mode="json", exclude={"runs_on"}),
                        "tools": _tool_versions(TARGET_TOOLS.get(build.target, ()))})

    def validate(self, build: BuildSpec) -> str:
        bounds = self.recipe.validation.tolerances.get(build.precision, {})
        return _digest({"compile": self.compile(build), "tolerances": {k: v.model_dump() for k, v in bounds.items()}})


def stage_name(kind: str, build: BuildSpec) -> str:
    return f"{kind}-{build.target}-{build.precision}"


class Builder:
    def __init__(self, recipe: Recipe, out: Path, *, builds: list[BuildSpec], store: Store | None,
                 merge: bool, progress: Progress):
        self.recipe, self.out, self.builds, self.store, self.merge = recipe, out, builds, store, merge
        self.progress = progress
        self.keys = Keys(recipe)
        self.report = BuildReport(out)
        self._source = None
        self._manifest_cleared = False

    # -- records -------------------------------------------------------------------------
    def _record_path(self, name: str) -> Path:
        return self.out / STAGES_DIR / f"{name}.json"

    def _record(self, name: str) -> dict[str, Any] | None:
        path = self._record_path(name)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    def _intact(self, record: dict[str, Any]) -> bool:
        for rel, entry in record["outputs"].items():
            path = self.out / rel
            if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                return False
        return True

    def _files_under(self, dirs: list[str], exclude: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
        files = {}
        for d in dirs:
            root = self.out / d
            for path in sorted(root.rglob("*")) if root.is_dir() else []:
                rel = path.relative_to(self.out).as_posix()
                if path.is_file() and rel not in exclude:
                    files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        return files

    def stage(self, name: str, key: str, run: Callable[[], tuple[list[str], dict[str, Any]]],
              exclude: set[str] = frozenset()) -> StageOutcome:
        """Skip, pull or run one stage; `run` returns (output dirs, result data)."""
        record = self._record(name)
        if record and record["key"] == key and self._intact(record):
            outcome = StageOutcome(name, key, "skipped", record["result"])
        elif self.store is not None and self.store.has(key):
            self._clear_manifest()
            self.progress(f"{name}: pulling from store")
            doc = self.store.pull(key, self.out)
            record = {"stage": name, "key": key, "outputs": doc["files"], "result": doc["record"]}
            write_json_atomic(self._record_path(name), record)
            outcome = StageOutcome(name, key, "pulled", doc["record"])
        elif self.merge:
            raise SourceError(f"stage {name} ({key[:12]}) is not in the store {self.store.url}",
                              "run its build job (diffprism plan RECIPE --matrix github) before merging")
        else:
            self._clear_manifest()
            self.progress(name)
            self._record_path(name).unlink(missing_ok=True)
            dirs, result = run()
            record = {"stage": name, "key": key, "outputs": self._files_under(dirs, exclude), "result": result}
            write_json_atomic(self._record_path(name), record)
            outcome = StageOutcome(name, key, "built", result)
        if self.store is not None and not self.store.has(key):
            self.progress(f"{name}: pushing to store")
            self.store.push(name, key, self.out, record["outputs"], record["result"])
        self.report.stages.append(outcome)
        return outcome

    def _clear_manifest(self) -> None:
        """A folder with a manifest is a finished one: drop it before the first change."""
        if not self._manifest_cleared:
            (self.out / manifest.MANIFEST).unlink(missing_ok=True)
            self._manifest_cleared = True

    def _pipeline(self):
        if self._source is None:
            src = self.recipe.source
            self.progress(f"loading {src.ref}")
            self._source = sources.load(src.ref, allow_pickle=src.allow_pickle, revision=src.revision, seed=src.seed)
        return self._source

    # -- stages --------------------------------------------------------------------------
    def export(self) -> StageOutcome:
        def run():
            src = self._pipeline()
            result = export_pipeline(src.pipeline, self.out, components=self.recipe.components,
                                     shapes=self.recipe.shapes.request(), opset=self.recipe.opset, source_info=src.info,
                                     progress=lambda c, s: self.progress(f"export {c}: {s}"))
            return [ONNX_DIR, REFERENCE_DIR], {"family": result.family, "opset": self.recipe.opset, "source": src.info,
                                               "components": list(result.specs)}

        return self.stage("export", self.keys.export, run)

    def calibration(self) -> StageOutcome:
        from exporters import calibration

        def run():
            _, specs = read_tree_info(self.out / ONNX_DIR)
            cal = self.recipe.calibration
            calibration.capture(self._pipeline().pipeline, self.out, prompts=cal.prompts, steps=cal.steps,
                                seed=cal.seed, specs=specs)
            return [calibration.CALIBRATION_DIR], {"info": calibration.info(self.out / calibration.CALIBRATION_DIR)}

        return self.stage("calibration", self.keys.calibration, run)

    def compile(self, build: BuildSpec, export_files: set[str]) -> StageOutcome:
        def run():
            _, specs = read_tree_info(self.out / ONNX_DIR)
            specs = select(specs, self.recipe.components)
            tgt = get_target(build.target)
            config = tgt.config(precision=build.precision, components=self.recipe.components, **build.options)
            plan = tgt.plan(self.out / ONNX_DIR, specs, config)
            result = tgt.build(plan, self.out)
            rel = result.out_dir.relative_to(self.out).as_posix()
            return [rel], {"dir": rel, "config": config.model_dump(mode="json"), "details": result.details,
                           "note": result.note}

        # The fp32 ONNX Runtime variant is the exported tree itself: its files belong to export.
        return self.stage(stage_name("compile", build), self.keys.compile(build), run, exclude=export_files)

    def validate(self, build: BuildSpec) -> StageOutcome:
        from validation.validate import validate

        def run():
            _, specs = read_tree_info(self.out / ONNX_DIR)
            specs = select(specs, self.recipe.components)
            tgt = get_target(build.target)
            config = tgt.config(precision=build.precision, components=self.recipe.components, **build.options)
            artifacts = tgt.output_dir(self.out, config)
            result = validate(specs, lambda spec: tgt.runner(artifacts, spec), self.out / REFERENCE_DIR,
                              target=build.target, precision=build.precision, policy=self.recipe.validation.policy(),
                              progress=lambda c: self.progress(f"validate {build.id}: {c}"))
            folder = artifacts.relative_to(self.out).as_posix()
            return [], {"report": result.to_json(), "hardware": manifest.hardware(), "dir": folder,
                        "checked": manifest.checked_files(self.out, artifacts, specs)}

        outcome = self.stage(stage_name("validate", build), self.keys.validate(build), run)
        report = outcome.result["report"]
        exported = list(read_tree_info(self.out / ONNX_DIR)[1])
        self.report.verdicts[f"{build.target}-{build.precision}"] = {
            **manifest.verdict_entry(report, outcome.result.get("checked") or {}, exported,
                                     folder=outcome.result.get("dir")),
            "hardware": outcome.result["hardware"],
        }
        return outcome

    # -- finish --------------------------------------------------------------------------
    def finish(self, export: StageOutcome, compiled: dict[str, StageOutcome], validated: dict[str, StageOutcome],
               request: dict[str, Any]) -> None:
        keys = {s.name: s.key for s in self.report.stages}
        old = manifest.load(self.out) if (self.out / manifest.MANIFEST).is_file() else None
        if old is not None and old.get("stages", {}).get("keys") == keys and old.get("request") == request:
            return  # nothing changed: the finished manifest stands
        write_json_atomic(self.out / REPORT_DIR / "validation.json",
                          {"results": {k: v.result["report"] for k, v in validated.items()}})
        data = manifest.new(request)
        data["source"] = export.result["source"]
        data["stages"] = {"export": {k: v for k, v in export.result.items() if k != "source"}}
        data["targets"] = {k: v.result for k, v in compiled.items()}
        data["validation"] = dict(self.report.verdicts)
        data["stages"]["keys"] = keys
        if self._html_report_module():
            # The HTML report renders from the manifest data about to be written (one manifest write).
            cache = manifest.hash_cache(self.out)
            data["files"] = manifest.scan_files(self.out, cache)
            cache.save()
            self._html_report_module().write_report(self.out, manifest=data)
        manifest.write(self.out, data)

    @staticmethod
    def _html_report_module():
        try:
            from validation import report
        except ImportError:  # builds without the report module write validation.json only
            return None
        return report if hasattr(report, "write_report") else None


def run_build(recipe: Recipe, out: Path, *, only: list[str] | None = None, store_url: str | None = None,
              merge: bool = False, export_only: bool = False, progress: Progress | None = None) -> BuildReport:
    builds = recipe.select(only)
    store = Store(store_url) if store_url else None
    if merge and store is None:
        raise SourceError("--merge needs --store URL", "pass the store the build jobs pushed to")
    request = {"command": "build", "recipe": recipe.model_dump(mode="json"), "only": sorted(only or [])}
    with folder_lock(out):
        manifest.check_output_folder(out)
        clean_staging(out)
        builder = Builder(recipe, out, builds=builds, store=store, merge=merge, progress=progress or (lambda s: None))
        if not merge and not export_only:
            for b in builds:  # fail before any work if this machine cannot build a variant
                get_target(b.target).availability().require(f"cannot build {b.id} here")
        export = builder.export()
        export_files = set(_record_outputs(builder, "export"))
        if any(needs_calibration(b) for b in (recipe.build if export_only else builds)):
            builder.calibration()
        if export_only:
            return builder.report
        compiled, validated = {}, {}
        for b in builds:
            compiled[f"{b.target}-{b.precision}"] = builder.compile(b, export_files)
            validated[f"{b.target}-{b.precision}"] = builder.validate(b)
        builder.finish(export, compiled, validated, request)
        shutil.rmtree(out / ".staging", ignore_errors=True)
        return builder.report


def _record_outputs(builder: Builder, name: str) -> dict[str, Any]:
    record = builder._record(name)
    return record["outputs"] if record else {}
