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

from diffprism import e2e_jobs, jobs, manifest, placement, sources
from diffprism.jobs import REPORT_DIR
from diffprism.lock import folder_lock
from diffprism.recipe import Recipe
from diffprism.store import Store
from diffprism.variant import Variant, unique
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR, REFERENCE_DIR
from exporters.files import HashCache, clean_staging, write_json_atomic
from targets.base import get_target
from validation.policy import row

log = logging.getLogger(__name__)

STAGES_DIR = manifest.STAGES  # excluded from the artifact set
HASHES = "hashes.json"  # under STAGES_DIR: sha256 of files by path, size, mtime, ctime, inode
EXPORT_TOOLS = ("diffprism", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx-ir", "numpy")

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
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant key -> image check (e2e_verdict)

    @property
    def passed(self) -> bool:
        """Every verdict passed or is structural (checked as far as this machine can; never a failure), and
        every image check passed."""
        return bool(self.verdicts) and all(v["status"] in ("passed", "structural") for v in self.verdicts.values()) \
            and all(v["passed"] for v in self.images.values())

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


def source_identity(recipe: Recipe, hashes: HashCache | None = None) -> dict[str, Any]:
    """What the exported weights depend on: preset+seed, the sha256 of every file of the folder, or Hub id+revision."""
    src = recipe.source
    if src.preset:
        return {"preset": src.preset, "seed": src.seed}
    if src.path:
        path = Path(src.path).expanduser()
        sources.check_folder(path, src.allow_pickle, recipe.components)
        return {"weights_sha256": sources.weights_digest(path, hashes)}
    if not src.revision:
        log.warning("hub source %s has no revision: pin a commit so reruns build the same weights", src.hub)
    return {"hub": src.hub, "revision": src.revision}


def dependencies(variant: Variant) -> list[Variant]:
    """The variants `variant` reads (e.g. TensorRT int8 reads ONNX Runtime int8), deepest first, then itself."""
    needed = get_target(variant.target).inputs(variant.config()).variant
    if needed is None:
        return [variant]
    return [*dependencies(Variant.of(*needed)), variant]


def compile_order(variants: list[Variant]) -> list[Variant]:
    return unique(v for variant in variants for v in dependencies(variant))


def calibration_needed(variants: list[Variant], reads: tuple[str, ...] = ("required",)) -> bool:
    """Whether a variant (or one it reads) reads the calibration capture as `reads` says (required/optional)."""
    return any(get_target(v.target).inputs(v.config()).calibration in reads for v in compile_order(variants))


class Keys:
    """Stage keys of one recipe (computable on any machine, no model loaded; only an optional capture's
    key reads the folder).

    Every input of a stage is in its key: the export's source bytes and settings, the calibration
    a variant reads (required: the calibration stage's key; optional: the content of the capture in
    `out` when there is one, whoever made it, since the target then reads it), the variant it reads
    (by that variant's own key), the variant's options digest and its target's tool versions.
    """

    def __init__(self, recipe: Recipe, hashes: HashCache | None = None, out: Path | None = None):
        self.recipe, self.hashes, self.out = recipe, hashes, out
        self.export = _digest({"source": source_identity(recipe, hashes),
                               "export": recipe.digest("components", "shapes", "opset", "streaming",
                                                        "reference_points", "dtype"),
                               "tools": _tool_versions(EXPORT_TOOLS)})
        # 'auto' is resolved here: machines with different runtimes present make different captures.
        self.calibration = _digest({"export": self.export, "calibration": recipe.digest("calibration"),
                                    "runtime": jobs.capture_runtime(recipe.calibration.runtime)})

    def capture(self) -> str | None:
        """sha256 over the files of the capture in <out>/calibration as it is now (None: there is none)."""
        from exporters.calibration import CALIBRATION_DIR

        folder = self.out / CALIBRATION_DIR if self.out is not None else None
        if folder is None or not (folder / "info.json").is_file():
            return None
        hashes = self.hashes or HashCache()
        return _digest({p.relative_to(folder).as_posix(): hashes.sha256(p)
                        for p in sorted(folder.rglob("*")) if p.is_file()})

    def compile(self, variant: Variant) -> str:
        tgt = get_target(variant.target)
        inputs = tgt.inputs(variant.config())
        base: dict[str, Any] = {"export": self.export}
        if inputs.calibration == "required":
            base["calibration"] = self.calibration
        elif inputs.calibration == "optional" and (capture := self.capture()) is not None:
            base["capture"] = capture
        if inputs.variant is not None:
            base["variant"] = self.compile(Variant.of(*inputs.variant))
        return _digest({"base": base, "variant": [variant.target, variant.precision, variant.options],
                        "components": self.recipe.components, "tools": _tool_versions(tgt.tools)})

    def validate(self, variant: Variant) -> str:
        tgt = get_target(variant.target)
        tolerance = tgt.tolerance_row(variant.config())
        bounds = self.recipe.validation.tolerances.get(tolerance, {})
        return _digest({"compile": self.compile(variant), "row": repr(row(tolerance)),
                        "tolerances": {k: v.model_dump() for k, v in bounds.items()},
                        "runtime": [variant.runtime_options(), tgt.weights_only_options(variant.config())]})

    def e2e(self, variant: Variant) -> str:
        """The image check: the variant, its tolerance row, the prompts and steps (the size follows from the export)."""
        return _digest({"compile": self.compile(variant), "row": repr(row(variant.tolerance_row)),
                        "prompts": self.recipe.validation.prompts, "steps": self.recipe.validation.steps,
                        "runtime": variant.runtime_options()})


def image_checked(variant: Variant) -> bool:
    """Whether the build judges this variant's images here: it runs component by component on this machine
    (a structural-only target has nothing to generate with; a whole-pipeline target is validated by its image)."""
    tgt = get_target(variant.target)
    return not tgt.runs_as_pipeline and tgt.runner_availability().ok


def stage_name(kind: str, variant: Variant) -> str:
    return f"{kind}-{variant.key}"


class Builder:
    def __init__(self, recipe: Recipe, out: Path, *, variants: list[Variant], store: Store | None,
                 merge: bool, progress: Progress):
        self.recipe, self.out, self.variants, self.store, self.merge = recipe, out, variants, store, merge
        self.progress = progress
        self.hashes = HashCache(out / STAGES_DIR / HASHES)
        self.keys = Keys(recipe, self.hashes, out)
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
            if not path.is_file() or path.stat().st_size != entry["size"] or self.hashes.sha256(path) != entry["sha256"]:
                return False
        return True

    def _files_under(self, dirs: list[str], exclude: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
        files = {}
        for d in dirs:
            root = self.out / d
            for path in sorted(root.rglob("*")) if root.is_dir() else []:
                rel = path.relative_to(self.out).as_posix()
                if path.is_file() and rel not in exclude:
                    files[rel] = {"sha256": self.hashes.sha256(path), "size": path.stat().st_size}
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
        self.hashes.save()
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

    def _load(self, *, empty: bool = False) -> sources.Source:
        src = self.recipe.source
        self.progress(f"loading {src.ref}")
        return sources.load(src.ref, allow_pickle=src.allow_pickle, revision=src.revision, seed=src.seed, empty=empty,
                            hashes=self.hashes)

    def _pipeline(self):
        if self._source is None:
            self._source = self._load()
        return self._source.pipeline

    # -- stages: each runs the job the CLI runs ---------------------------------------------
    def export(self) -> StageOutcome:
        def run():
            options = self.recipe.export_options()
            src = self._load(empty=True) if options.get("streaming") else self._source or self._load()
            if not options.get("streaming"):
                self._source = src
            result, entry = jobs.export_work(src, self.out, components=self.recipe.components,
                                             shapes=self.recipe.shapes.request(), opset=self.recipe.opset,
                                             progress=lambda s: self.progress(f"export {s}"), **options)
            return [ONNX_DIR, REFERENCE_DIR], {**entry, "source": src.info, "components": list(result.specs)}

        return self.stage("export", self.keys.export, run)

    def calibration(self) -> StageOutcome:
        from exporters import calibration

        def run():
            cal = self.recipe.calibration
            done = jobs.calibrate_work(self.out, self._pipeline, prompts=cal.prompts, steps=cal.steps, seed=cal.seed,
                                       runtime=cal.runtime, progress=self.progress)
            return [calibration.CALIBRATION_DIR], {"info": done["info"], "entry": done["entry"]}

        return self.stage("calibration", self.keys.calibration, run)

    def compile(self, variant: Variant, export_files: set[str]) -> StageOutcome:
        def run():
            result, entry = jobs.compile_work(self.out, variant, components=self.recipe.components,
                                              source=self._pipeline, progress=self.progress)
            return [entry["dir"]], entry

        # The fp32 ONNX Runtime variant is the exported tree itself: its files belong to export.
        return self.stage(stage_name("compile", variant), self.keys.compile(variant), run, exclude=export_files)

    def validate(self, variant: Variant) -> StageOutcome:
        def run():
            result = jobs.validate_work(self.out, variant, components=self.recipe.components,
                                        policy=self.recipe.validation.policy(),
                                        progress=lambda c: self.progress(f"validate {variant.key}: {c}"))
            return [], {"report": result.to_json(), "verdict": jobs.verdict_entry(self.out, result, variant),
                        "hardware": manifest.hardware()}

        outcome = self.stage(stage_name("validate", variant), self.keys.validate(variant), run)
        verdict = outcome.result.get("verdict") or {}
        self.report.verdicts[variant.key] = {**verdict, "hardware": outcome.result["hardware"]}
        return outcome

    def e2e(self, variant: Variant, source_info: dict[str, Any]) -> StageOutcome:
        """The recipe's [validation] prompts through PyTorch and the variant, as 'validate --e2e' does."""
        from runtimes.pipeline import needed as needed_components
        from validation.e2e import requests_for

        def run():
            info, specs = jobs.tree_specs(self.out)
            missing = [n for n in needed_components(info, specs) if n not in specs]
            if missing:
                raise UsageError(f"[validation] prompts need image generation, which needs {', '.join(missing)} too",
                                 "add them to the recipe's components, or drop [validation] prompts")
            requests = requests_for(self.recipe.validation.prompts, size=e2e_jobs.default_size(self.out),
                                    steps=self.recipe.validation.steps)
            runners = placement.Runners(self.out, source=self._pipeline, source_info=source_info)
            images = e2e_jobs.images_dir(variant.key)
            shutil.rmtree(self.out / images, ignore_errors=True)  # no image of other prompts stays in its outputs
            results, reference, ref_images = e2e_jobs.e2e_work(
                self.out, [{n: variant for n in needed_components(info, specs)}], requests, runners=runners,
                progress=lambda s: self.progress(f"e2e {variant.key}: {s}"))
            return [images], {"requests": [r.to_json() for r in requests], "result": results[0].to_json(),
                              "reference": {"images": ref_images, "seconds": [round(g.seconds, 3) for g in reference]}}

        outcome = self.stage(stage_name("e2e", variant), self.keys.e2e(variant), run)
        self.report.images[variant.key] = e2e_jobs.e2e_verdict(outcome.result["result"])
        return outcome

    # -- finish --------------------------------------------------------------------------
    def finish(self, export: StageOutcome, compiled: dict[str, StageOutcome], validated: dict[str, StageOutcome],
               request: dict[str, Any], imaged: dict[str, StageOutcome]) -> None:
        keys = {s.name: s.key for s in self.report.stages}
        old = manifest.load(self.out) if (self.out / manifest.MANIFEST).is_file() else None
        if old is not None and old.get("stages", {}).get("keys") == keys and old.get("request") == request:
            return  # nothing changed: the finished manifest stands
        report = {"results": {k: v.result["report"] for k, v in validated.items()}}
        if imaged:
            first = next(iter(imaged.values())).result
            report["e2e"] = e2e_jobs.e2e_section(None, first["requests"], first["reference"],
                                                 {v.result["result"]["label"]: v.result["result"] for v in imaged.values()})
        write_json_atomic(self.out / REPORT_DIR / "validation.json", report)
        data = manifest.new(request)
        data["source"] = export.result["source"]
        data["stages"] = {"export": {k: v for k, v in export.result.items() if k != "source"}}
        calibrated = next((s for s in self.report.stages if s.name == "calibration"), None)
        if calibrated is not None and "entry" in calibrated.result:
            data["stages"]["calibrate"] = calibrated.result["entry"]
        data["targets"] = {k: v.result for k, v in compiled.items()}
        data["validation"] = dict(self.report.verdicts)
        for outcome in imaged.values():
            data["validation"][f"e2e:{outcome.result['result']['label']}"] = e2e_jobs.e2e_verdict(outcome.result["result"])
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
    variants = [b.variant for b in recipe.select(only)]
    store = Store(store_url) if store_url else None
    if merge and store is None:
        raise SourceError("--merge needs --store URL", "pass the store the build jobs pushed to")
    request = {"command": "build", "recipe": recipe.model_dump(mode="json"), "only": sorted(only or [])}
    with folder_lock(out):
        manifest.check_output_folder(out)
        clean_staging(out)
        builder = Builder(recipe, out, variants=variants, store=store, merge=merge, progress=progress or (lambda s: None))
        order = compile_order(variants)
        if not merge and not export_only:
            for v in order:  # fail before any work if this machine cannot build a variant
                get_target(v.target).build_availability().require(f"cannot build {v.id} here")
        export = builder.export()
        export_files = set(_record_outputs(builder, "export"))
        # A recipe that captures has the capture in place before any variant that reads it compiles, so a
        # variant built by an --only job sees the same capture (and key) as in the full build.
        if calibration_needed([b.variant for b in recipe.build]) and \
                (export_only or calibration_needed(variants, ("required", "optional"))):
            builder.calibration()
        if export_only:
            return builder.report
        compiled, validated = {}, {}
        for v in order:
            compiled[v.key] = builder.compile(v, export_files)
        for v in variants:
            validated[v.key] = builder.validate(v)
        imaged = {}
        if recipe.validation.prompts:
            for v in variants:
                if image_checked(v):
                    imaged[v.key] = builder.e2e(v, export.result["source"])
                else:
                    log.info("no image check of %s: it does not run component by component here", v.key)
        builder.finish(export, compiled, validated, request, imaged)
        shutil.rmtree(out / ".staging", ignore_errors=True)
        return builder.report


def _record_outputs(builder: Builder, name: str) -> dict[str, Any]:
    record = builder._record(name)
    return record["outputs"] if record else {}
