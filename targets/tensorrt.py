"""TensorRT target: engines with optimization profiles from the spec, or a build job for a GPU machine.

With TensorRT and a CUDA GPU present, `build` makes the engines with the TensorRT Python API
(ONNX parser, builder config, one optimization profile per requested range, a shared timing
cache). Without them it writes the same plan as a trtexec build job (targets/tensorrt_job.py)
and says so in BuildResult.note; it never pretends engines exist.

Engines live in <out>/tensorrt-<precision>-sm<cc>-trt<version>-<flags|typed>[-<digest>]/<component>/model.plan:
an engine only deserializes on the GPU architecture and TensorRT version that built it, and TensorRT 10.x and 11.x build the same precision two ways (10.x: builder precision flags on the
fp32 graph; 11.x: strongly typed from a graph that carries its types, e.g. onnx-fp16/); the options digest
suffix (the one the variant's label carries) keeps variants that differ only in options apart. When the GPU
is not given and cannot be detected, the plan records "unknown"; when the TensorRT version is not,
the plan is for TensorRT 11 and the build job fills in the exact version from the machine it runs on.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

from exporters.errors import SourceError
from exporters.files import staged_dir, write_bytes_atomic, write_json_atomic
from exporters.spec import ComponentSpec
from exporters.tree import read_geometry
from targets.base import Availability, BuildResult, Inputs, Target, TargetConfig
from targets.tensorrt_job import build_script
from targets.tensorrt_plan import (
    PLAN_FILE, PRECISIONS, SCRIPT_FILE, UNKNOWN, TensorRtConfig, cc_text, engine_dir_name, gpu_tag, make_plan, parse_gpu,
    parse_trt_version, strongly_typed, trt_target, version_tag,
)

log = logging.getLogger(__name__)

EXTRA = "pip install 'diffprism[tensorrt]' (tensorrt wheels come from NVIDIA's package index) on a machine with a CUDA GPU"


def detect_cc() -> int | None:
    """This machine's first CUDA GPU as major*10+minor, or None."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return major * 10 + minor
    except Exception:  # a broken CUDA install is "no GPU" for planning purposes
        log.debug("no CUDA GPU detected", exc_info=True)
    return None


def gpu_package_availability(package: str, fix: str) -> Availability:
    """Whether `package` imports and a CUDA GPU is visible: what the GPU targets need to run here."""
    try:
        importlib.import_module(package)
    except ImportError:
        return Availability(False, f"the {package} Python package is not installed", fix)
    if detect_cc() is None:
        return Availability(False, "no CUDA GPU is visible (torch.cuda.is_available() is False)",
                            "run on a machine with an NVIDIA GPU and a CUDA build of torch")
    return Availability(True)


def detect_trt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return parse_trt_version(trt.__version__)


class TensorRtTarget(Target):
    name = "tensorrt"
    precisions = PRECISIONS
    Config = TensorRtConfig
    tools = ("tensorrt", "polygraphy")
    # The label and the engine folder spell out these; any other option adds the options digest suffix to
    # both (folder_tag), so TensorRT variants that differ only in options get their own folders.
    named_options = ("gpu", "trt_version", "hardware_compatibility")
    gpu = True

    def base_label(self, config: TargetConfig) -> str:
        """fp16, or fp16-sm89-trt10.8.0 / fp16-sm80plus when the options name the GPU or TensorRT."""
        assert isinstance(config, TensorRtConfig)
        parts = [config.precision]
        if config.gpu or config.hardware_compatibility == "ampere_plus":
            parts.append(gpu_tag(parse_gpu(config.gpu) if config.gpu else None, config.hardware_compatibility))
        if config.hardware_compatibility == "same_compute_capability":
            parts.append("samecc")
        if config.trt_version:
            parts.append(f"trt{parse_trt_version(config.trt_version)}")
        return "-".join(parts)

    def folder_tag(self, config: TargetConfig) -> str:
        """What ends the engine folder's name after the GPU, TensorRT and typing tags: what the label has
        beyond them (same-compute-capability engines, the options suffix)."""
        same_cc = getattr(config, "hardware_compatibility", "none") == "same_compute_capability"
        return ("-samecc" if same_cc else "") + self.options_suffix(config)

    def inputs(self, config: TargetConfig) -> Inputs:
        # int8 builds the ONNX Runtime int8 variant's Q/DQ graph (onnx-int8/) strongly typed.
        return Inputs(variant=("onnxruntime", "int8", {})) if config.precision == "int8" else Inputs()

    def runner_labels(self, matrix: dict[str, Any]) -> list[str]:
        return ["self-hosted", "linux", "x64", "gpu", f"tensorrt-{matrix.get('tensorrt', '10')}"]

    def gitlab_runner(self, matrix: dict[str, Any]) -> str:
        return f"gpu-tensorrt-{matrix.get('tensorrt', '10')}"

    def matrix_facts(self, matrix: dict[str, Any]) -> dict[str, Any]:
        return {"tensorrt": matrix.get("tensorrt", "10")}

    def output_dir(self, out: Path, config: TargetConfig) -> Path:
        """The engine folder for this machine (or for the gpu/trt_version the config names)."""
        assert isinstance(config, TensorRtConfig)
        cc = parse_gpu(config.gpu) if config.gpu else detect_cc()
        major, version = trt_target(config.trt_version, detect_trt_version())
        typed, tag = strongly_typed(config.precision, major), version_tag(major, version)
        suffix = self.folder_tag(config)
        exact = out / engine_dir_name(config.precision, gpu_tag(cc, config.hardware_compatibility), tag, typed, suffix)
        if exact.is_dir() or cc is None or cc < 80 or config.hardware_compatibility != "none":
            return exact
        portable = out / engine_dir_name(config.precision, gpu_tag(cc, "ampere_plus"), tag, typed, suffix)
        return portable if portable.is_dir() else exact  # Ampere-compatible engines also run here

    def availability(self) -> Availability:
        return gpu_package_availability("tensorrt", EXTRA)

    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        assert isinstance(config, TensorRtConfig)
        return make_plan(tree, specs, config, detected_cc=detect_cc(), detected_trt=detect_trt_version(),
                         geometry=read_geometry(tree), options_tag=self.folder_tag(config))

    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        final = out / plan["dir"]
        reason = self.cannot_build_here(plan)
        if reason:
            return self._write_job(plan, out, final, reason)
        return self._build_engines(plan, out, final)

    def build_availability(self) -> Availability:
        return Availability(True)  # without TensorRT and a GPU, build writes the build job for a GPU machine

    def runner_availability(self) -> Availability:
        here = self.availability()
        return here if here.ok else Availability(False, f"TensorRT engines need an NVIDIA GPU with TensorRT ({here.reason})",
                                                 here.fix)

    def inspect(self, artifact_dir: Path, spec: ComponentSpec, config: TargetConfig) -> dict[str, Any]:
        """What can be checked without a GPU: the plan names the component, its ONNX graph and the job exist."""
        plan_path = artifact_dir / PLAN_FILE
        if not plan_path.is_file():
            raise SourceError(f"{artifact_dir} has no {PLAN_FILE}", "run 'diffprism compile DIR --target tensorrt' first")
        plan = json.loads(plan_path.read_text())
        component = plan["components"].get(spec.name)
        problems = []
        if component is None:
            problems.append(f"the plan has no '{spec.name}'")
        else:
            if not (artifact_dir.parent / component["onnx"]).is_file():
                problems.append(f"the plan's ONNX graph {component['onnx']} is missing")
            if not component.get("profiles"):
                problems.append("the plan has no optimization profile")
        if not (artifact_dir / SCRIPT_FILE).is_file():
            problems.append(f"{SCRIPT_FILE} is missing")
        engine = artifact_dir / component["engine"] if component else None
        return {"ok": not problems, "problems": problems, "profiles": len(component["profiles"]) if component else 0,
                "engine_built": bool(engine and engine.is_file())}

    def cannot_build_here(self, plan: dict[str, Any]) -> str:
        """Why this machine cannot build the plan's engines ("" if it can): engines are per GPU and TensorRT."""
        available = self.availability()
        if not available.ok:
            return available.reason
        cc, version = detect_cc(), detect_trt_version()
        if version is None or int(version.split(".")[0]) != plan["trt_major"] \
                or plan["trt_version"] not in (UNKNOWN, version):
            planned = plan["trt_version"] if plan["trt_version"] != UNKNOWN else f"{plan['trt_major']}.x"
            return f"the plan targets TensorRT {planned} but this machine has {version}"
        if cc is None or cc < plan["min_compute_capability"]:
            return f"{plan['precision']} needs compute capability >= {cc_text(plan['min_compute_capability'])}"
        if plan["builder"]["hardware_compatibility"] != "ampere_plus" and plan["compute_capability"] != cc_text(cc):
            return f"the plan targets {plan['gpu']} but this machine's GPU is sm{cc}"
        return ""

    # -- without TensorRT: the build job ------------------------------------------------------
    def _write_job(self, plan: dict[str, Any], out: Path, final: Path, reason: str) -> BuildResult:
        with staged_dir(final) as tmp:
            write_json_atomic(tmp / PLAN_FILE, plan)
            script = tmp / SCRIPT_FILE
            write_bytes_atomic(script, build_script(plan).encode())
            script.chmod(0o755)
        details = {name: {"engine": f"{plan['dir']}/{c['engine']}", "built": False, "profiles": len(c["profiles"]),
                          "gpu": plan["gpu"], "trt_version": plan["trt_version"], "trt_major": plan["trt_major"],
                          "onnx": c["onnx"]}
                   for name, c in plan["components"].items()}
        rel = final.relative_to(out).as_posix()
        note = (f"engines not built here ({reason}); wrote a build job: run 'bash {rel}/{SCRIPT_FILE}' on a GPU machine "
                f"with TensorRT and trtexec, then 'diffprism validate DIR --target tensorrt --precision {plan['precision']}' there")
        log.info("wrote TensorRT build job %s", final)
        return BuildResult(self.name, plan["precision"], final, [final / PLAN_FILE, final / SCRIPT_FILE], details, note)

    # -- with TensorRT: the Python API ---------------------------------------------------------
    def _build_engines(self, plan: dict[str, Any], out: Path, final: Path) -> BuildResult:
        from targets.tensorrt_build import build_engine

        cache_path = out / plan["builder"]["timing_cache"]
        in_engine_dir = cache_path.parent == final
        cache = cache_path.read_bytes() if cache_path.is_file() else b""
        details: dict[str, Any] = {}
        with staged_dir(final) as tmp:
            for name, component in plan["components"].items():
                engine, cache = build_engine(plan, out / component["onnx"], component["profiles"], cache)
                write_bytes_atomic(tmp / component["engine"], engine)
                details[name] = {"engine": f"{plan['dir']}/{component['engine']}", "built": True,
                                 "bytes": len(engine), "profiles": len(component["profiles"]),
                                 "gpu": plan["gpu"], "compute_capability": plan["compute_capability"],
                                 "trt_version": plan["trt_version"], "trt_major": plan["trt_major"],
                                 "onnx": component["onnx"]}
                log.info("built TensorRT engine %s (%d bytes)", name, len(engine))
            write_json_atomic(tmp / PLAN_FILE, plan)
            write_bytes_atomic(tmp / SCRIPT_FILE, build_script(plan).encode())
            (tmp / SCRIPT_FILE).chmod(0o755)
            if in_engine_dir:
                write_bytes_atomic(tmp / cache_path.name, cache)
        if not in_engine_dir:
            write_bytes_atomic(cache_path, cache)
        files = [final / c["engine"] for c in plan["components"].values()]
        return BuildResult(self.name, plan["precision"], final, files, details)

    # -- validation ---------------------------------------------------------------------------
    def tolerance_row(self, config: TargetConfig) -> str:
        """fp8 Q/DQ engines are judged like the other quantized variants."""
        return "int8" if config.precision == "fp8" else config.precision

    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        """Engine runner by default; `runtime=onnxruntime` runs the ONNX graph on ORT's TensorRT EP instead."""
        plan_path = artifact_dir / PLAN_FILE
        if not plan_path.is_file():
            raise SourceError(f"{artifact_dir} has no {PLAN_FILE}", "run 'diffprism compile DIR --target tensorrt' first")
        plan = json.loads(plan_path.read_text())
        if spec.name not in plan["components"]:
            raise SourceError(f"the TensorRT plan in {artifact_dir} has no '{spec.name}'", "compile that component")
        component = plan["components"][spec.name]
        runtime = options.pop("runtime", "engine")
        if runtime == "onnxruntime":
            from runtimes.onnxruntime_runner import OnnxRuntimeRunner
            from runtimes.tensorrt_runner import onnxruntime_tensorrt_providers

            providers = onnxruntime_tensorrt_providers(plan, spec.name, artifact_dir / "ort-cache", **options)
            return OnnxRuntimeRunner(spec, artifact_dir.parent / component["onnx"], providers=providers)
        self.availability().require("TensorRT engines")
        engine = artifact_dir / component["engine"]
        if not engine.is_file():
            raise SourceError(f"no engine at {engine} (the build job has not run on this machine's GPU/TensorRT)",
                              f"run 'bash {artifact_dir.name}/{SCRIPT_FILE}' from the artifact folder on this machine")
        from runtimes.tensorrt_runner import TensorRtRunner

        onnx = artifact_dir.parent / component["onnx"] if plan["builder"]["strip_weights"] else None
        return TensorRtRunner(spec, engine, version_compatible=plan["builder"]["version_compatible"],
                              refit_from=onnx, **options)

