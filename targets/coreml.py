"""Core ML target: each component's torch.export program -> an ML program package (.mlpackage).

<out>/coreml-<precision>[-<compress>]/<component>.mlpackage, with diffusers' tensor names and layouts.
These packages are not laid out for Apple's Swift StableDiffusion package: its loader opens compiled
.mlmodelc files, feeds Float32 token ids, passes encoder_hidden_states as (B, 768, 1, 77) and reads
SDXL's second encoder as hidden_embeds/pooled_outputs, none of which diffprism produces.

Conversion starts from the same trace as the ONNX export (coremltools no longer reads ONNX), so
the build needs the source pipeline: the compile job reloads it from the export's manifest.

Shapes (`shapes` option):
- range (default): a RangeDim per dynamic axis, over the spec's min..max. Core ML cannot express
  the spec's "multiple of 8" constraint; feeds are checked against the spec before prediction.
- enumerated: the listed `resolutions` (pixels, "HxW") x batch opt/min/max, by coremltools' rules
  for the deployment target (targets/coreml_convert.enumerate_shapes): below iOS 18 / macOS 15 one
  enumerated input per model (the UNet's batch is then fixed at opt), from iOS 18 on parallel lists
  matched by index; what a rule reduced is recorded in details[<component>]["enumerated"]["notes"].
- static: the spec's opt point.
If a flexible conversion fails for a component, it is retraced and converted at the static opt
point; `details[<component>]["fallback"]` records that and why, the build's note names the
component, and the log warns.
"""
from __future__ import annotations

import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from exporters import reference
from exporters.errors import ExportError, UsageError
from exporters.export import REFERENCE_DIR, trace_component
from exporters.files import staged_dir
from exporters.spec import ComponentSpec
from exporters.tree import read_geometry, read_tree_info
from targets.base import Availability, BuildResult, Target, TargetConfig

log = logging.getLogger(__name__)

EXTRA = "pip install 'diffprism[coreml]'"
COMPRESSIONS = ("none", "linear8", "palettize4", "palettize6")
DEPLOYMENT_TARGETS = ("macOS13", "macOS14", "macOS15", "iOS16", "iOS17", "iOS18")
PROGRAM_CHECK_REL_L2 = 1e-3  # the lowered program must match the stored PyTorch reference this closely


class CoreMlConfig(TargetConfig):
    precision: str = "fp16"
    compress: Literal["none", "linear8", "palettize4", "palettize6"] = "none"
    compute_units: Literal["all", "cpu_only", "cpu_and_gpu", "cpu_and_ne"] = "all"
    minimum_deployment_target: str = "macOS14"
    shapes: Literal["range", "enumerated", "static"] = "range"
    resolutions: list[str] | None = None  # pixels "HxW"; implies shapes=enumerated

    @field_validator("minimum_deployment_target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        if value not in DEPLOYMENT_TARGETS:
            raise ValueError(f"unknown deployment target {value!r}; choose from {', '.join(DEPLOYMENT_TARGETS)}")
        return value

    @field_validator("resolutions", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def variant_name(precision: str, compress: str) -> str:
    return f"coreml-{precision}" + ("" if compress == "none" else f"-{compress}")


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"resolution {text!r} is not HEIGHTxWIDTH", "write e.g. resolutions=512x512,768x512") from None
    return h, w


class CoreMlTarget(Target):
    name = "coreml"
    precisions = ("fp16", "fp32")
    Config = CoreMlConfig
    tools = ("coremltools",)
    named_options = ("compress",)
    runs_on = ("macos-14",)
    gitlab_tag = "saas-macos-medium-m1"

    def needs_source(self, config: TargetConfig) -> bool:
        return True  # conversion starts from the torch.export program, so it needs the pipeline

    def base_label(self, config: TargetConfig) -> str:
        """fp16, or fp16-palettize4 etc."""
        assert isinstance(config, CoreMlConfig)
        return variant_name(config.precision, config.compress).removeprefix("coreml-")

    def availability(self) -> Availability:
        try:
            import coremltools  # noqa: F401
        except ImportError:
            return Availability(False, "coremltools is not installed", EXTRA)
        return Availability(True)

    def tolerance_row(self, config: TargetConfig) -> str:
        """The validation policy row for a variant: compressed weights get the int8/int4 tolerances."""
        return {"linear8": "int8", "palettize6": "int8", "palettize4": "int4"}.get(config.compress, config.precision)

    def runner_availability(self) -> Availability:
        from runtimes.coreml_runner import unavailable

        missing = unavailable()
        return Availability(True) if missing is None else Availability(False, *missing)

    # -- plan (pure) -------------------------------------------------------------------------
    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        assert isinstance(config, CoreMlConfig)
        mode = "enumerated" if config.resolutions else config.shapes
        if mode == "enumerated" and not config.resolutions:
            raise UsageError("shapes=enumerated needs the resolutions to enumerate",
                             "add --option resolutions=512x512,768x512 (pixels)")
        latent: list[list[int]] = []
        if mode == "enumerated":
            scale = read_geometry(tree).vae_scale_factor
            for text in config.resolutions or []:
                h, w = parse_resolution(text)
                if h % scale or w % scale:
                    raise UsageError(f"resolution {text} is not a multiple of the VAE scale {scale}",
                                     f"use sizes divisible by {scale}")
                latent.append([h // scale, w // scale])
        components = {}
        for name, spec in specs.items():
            entry: dict[str, Any] = {"spec": spec.to_json(), "package": f"{name}.mlpackage"}
            if mode == "enumerated":
                from targets.coreml_convert import enumerate_shapes

                # Components without height/width (text encoders) enumerate their batch sizes only.
                entry["enumeration"] = enumerate_shapes(spec, [tuple(x) for x in latent],
                                                        config.minimum_deployment_target)
            components[name] = entry
        info, _ = read_tree_info(tree) if (tree / "diffprism.json").is_file() else ({}, {})
        return {
            "target": self.name,
            "precision": config.precision,
            "compress": config.compress,
            "compute_units": config.compute_units,
            "minimum_deployment_target": config.minimum_deployment_target,
            "shapes": mode,
            "resolutions": config.resolutions,
            "tree": str(tree),
            "source": info.get("source", {}),
            "family": info.get("family"),
            "dir": self.output_dir(Path("."), config).name,
            "components": components,
        }

    # -- build ---------------------------------------------------------------------------------
    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        self.availability().require("Core ML conversion")
        if source is None:
            raise UsageError("the Core ML build needs the source pipeline (it converts from the torch.export program)",
                             "run it through 'diffprism compile', which reloads the source named in the manifest")
        from targets import coreml_convert as cc

        final = out / plan["dir"]
        result = BuildResult(self.name, plan["precision"], final)
        facts = self._facts(plan)
        with staged_dir(final) as stage:
            for name, entry in plan["components"].items():
                spec = ComponentSpec.from_json(entry["spec"])
                result.details[name] = self._build_component(cc, source, spec, entry, plan, facts, out,
                                                             stage / entry["package"])
        result.files = sorted(p for p in final.rglob("*") if p.is_file())
        fallbacks = [n for n, d in result.details.items() if isinstance(d, dict) and d.get("fallback")]
        result.note = ("packages converted and checked structurally; Core ML predictions need macOS"
                       + (f"; static-shape fallback for {fallbacks}" if fallbacks else ""))
        return result

    def _facts(self, plan: dict[str, Any]) -> dict[str, str]:
        versions = {}
        for pkg in ("diffprism", "torch", "coremltools", "diffusers", "transformers"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                continue
        source = plan.get("source") or {}
        return {
            "diffprism.version": versions.get("diffprism", ""),
            "diffprism.source": json.dumps(source, sort_keys=True),
            "diffprism.source_name": str(source.get("preset") or source.get("repo_id") or source.get("path") or "?"),
            "diffprism.family": str(plan.get("family")),
            "diffprism.precision": plan["precision"],
            "diffprism.compress": plan["compress"],
            "diffprism.compute_units": plan["compute_units"],
            "diffprism.minimum_deployment_target": plan["minimum_deployment_target"],
            "diffprism.versions": json.dumps(versions, sort_keys=True),
        }

    def _build_component(self, cc, source: Any, spec: ComponentSpec, entry: dict[str, Any], plan: dict[str, Any],
                         facts: dict[str, str], out: Path, path: Path) -> dict[str, Any]:
        from targets.coreml_inspect import inspect_package

        start = time.perf_counter()
        mode, enumeration, fallback = plan["shapes"], entry.get("enumeration"), None
        options = dict(precision=plan["precision"], deployment_target=plan["minimum_deployment_target"],
                       compute_units=plan["compute_units"])
        _, program = trace_component(source, spec)
        program = cc.lower(program)
        check = self._check_program(cc, program, spec, out)
        try:
            model = cc.convert(program, spec, mode=mode, enumeration=enumeration, **options)
        except Exception as exc:  # coremltools raises many types for unsupported dynamic graphs
            if mode == "static":
                raise ExportError(f"Core ML conversion of '{spec.name}' failed: {type(exc).__name__}: "
                                  f"{_first_line(exc)}", "run with -v for the converter log") from exc
            fallback = f"{mode} shapes failed ({type(exc).__name__}: {_first_line(exc)}); converted at the static opt point"
            log.warning("%s: %s", spec.name, fallback)
            mode, enumeration = "static", None
            del program
            _, program = trace_component(source, cc.static_spec(spec))
            program = cc.lower(program)
            try:
                model = cc.convert(program, spec, mode=mode, **options)
            except Exception as exc2:
                raise ExportError(f"Core ML conversion of '{spec.name}' failed even at static shapes: "
                                  f"{type(exc2).__name__}: {_first_line(exc2)}", "run with -v for the converter log") from exc2
        convert_seconds = time.perf_counter() - start
        model = cc.compress(model, plan["compress"])
        component_facts = {**facts, "diffprism.component": spec.name, "diffprism.shapes": mode,
                           "diffprism.spec": json.dumps(spec.to_json(), sort_keys=True)}
        if enumeration:
            component_facts["diffprism.enumerated"] = json.dumps(enumeration["points"])
            component_facts["diffprism.enumerated_inputs"] = json.dumps(enumeration["inputs"])
        cc.set_metadata(model, spec, component_facts, mode, enumeration)
        model.save(str(path))
        del model, program
        inspection = inspect_package(path, spec, precision=plan["precision"], compress=plan["compress"])
        if not inspection["ok"]:
            raise ExportError(f"Core ML package for '{spec.name}' does not match its spec: "
                              f"{'; '.join(inspection['problems'])}", "report this with the -v log")
        details = {
            "package": path.name,
            "shapes": mode,
            "seconds": round(time.perf_counter() - start, 2),
            "convert_seconds": round(convert_seconds, 2),
            "bytes": inspection["bytes"],
            "program_rel_l2": check,
            "ops": inspection["ops"],
            "palettized_ops": inspection["palettized_ops"],
            "linear8_ops": inspection["linear8_ops"],
        }
        if enumeration:
            details["enumerated"] = {"inputs": enumeration["inputs"], "shapes": len(enumeration["points"])}
            if enumeration["notes"]:
                details["enumerated"]["notes"] = enumeration["notes"]
        if fallback:
            details["fallback"] = fallback
        log.info("converted %s to Core ML (%s, %s) in %.1fs", spec.name, plan["precision"], mode, details["seconds"])
        return details

    def _check_program(self, cc, program, spec: ComponentSpec, out: Path) -> float | None:
        """The lowered program against the stored reference (catches a changed source or a bad lowering)."""
        path = out / REFERENCE_DIR / f"{spec.name}.npz"
        if not path.is_file():
            log.warning("no reference for %s at %s; the lowered program is not checked", spec.name, path)
            return None
        cases = reference.load(path)
        case = cases.get("opt") or next(iter(cases.values()))
        rel = cc.check_program(program, case, spec)
        if rel > PROGRAM_CHECK_REL_L2:
            raise ExportError(f"the traced '{spec.name}' differs from the export's PyTorch reference "
                              f"(relative L2 {rel:.2e})", "the source changed since export: re-run 'diffprism export'")
        return float(f"{rel:.3e}")

    # -- validation ----------------------------------------------------------------------------
    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        from runtimes.coreml_runner import CoreMlRunner

        return CoreMlRunner(spec, artifact_dir / f"{spec.name}.mlpackage", **options)

    def inspect(self, artifact_dir: Path, spec: ComponentSpec, config: TargetConfig) -> dict[str, Any]:
        """Structural check of one built package (what can be proven without Core ML predictions)."""
        from exporters.errors import SourceError
        from targets.coreml_inspect import inspect_package

        assert isinstance(config, CoreMlConfig)
        path = artifact_dir / f"{spec.name}.mlpackage"
        if not path.is_dir():
            raise SourceError(f"no Core ML package for '{spec.name}' at {path}",
                              f"run 'diffprism compile DIR --target coreml --precision {config.precision}' first")
        return inspect_package(path, spec, precision=config.precision, compress=config.compress)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
