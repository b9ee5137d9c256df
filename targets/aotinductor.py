"""AOTInductor target: each component's torch.export program compiled ahead of time into a .pt2 package.

<out>/aotinductor-<precision>-<device>-torch<version>/<component>/{model.pt2, package.json}, plus
diffprism.json (the specs). The program is the same trace the ONNX export starts from
(exporters.export), with the spec's dynamic dims as torch.export.Dim min/max, compiled by
torch._inductor.aoti_compile_and_package. A package holds native code for one device kind and
one torch build, like a TensorRT engine for one GPU and TensorRT: both are in the folder name,
the plan, the manifest entry and package.json, which the runner (runtimes/aoti_runner.py)
checks before it loads anything.

Precisions (inputs and outputs stay float32, so runners and pipelines need no change):
  fp32  the program as traced
  bf16  the module in bf16 between casts of the float inputs and outputs. The shared fp32-island
        search (exporters.precision.islands) works on ONNX nodes and does not map onto a torch
        program, so there are no automatic islands here: the build measures the compiled
        package against the stored PyTorch reference and records its error instead.
  int8  torchao's dynamic int8-activation / int8-weight quantization (Int8DynamicActivationInt8WeightConfig)
        of every nn.Linear, applied to a copy of the module before the trace; convolutions stay fp32.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters import reference
from exporters.errors import ExportError, SourceError, UsageError
from exporters.export import REFERENCE_DIR
from exporters.files import staged_dir, write_json_atomic
from exporters.spec import ComponentSpec
from exporters.tree import TREE_INFO, read_tree_info, write_tree_info
from runtimes.aoti_runner import PACKAGE_INFO
from targets.base import Availability, BuildResult, Target, TargetConfig

log = logging.getLogger(__name__)

PACKAGE = "model.pt2"
DEVICES = ("cpu", "cuda")
INT8_EXTRA = "pip install 'diffprism[aotinductor]' (torchao)"


class AotInductorConfig(TargetConfig):
    device: str | None = None  # cpu or cuda; None: cuda when a CUDA GPU is visible, else cpu
    torch_version: str | None = None  # the torch build the packages are for; None: this machine's


def torch_version() -> str:
    return torch.__version__


def detect_device() -> str:
    try:
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # a broken CUDA install is "no GPU" for naming purposes
        log.debug("no CUDA device detected", exc_info=True)
        return "cpu"


def _public(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: the folder names the release, package.json the exact build."""
    return version.split("+", 1)[0]


class AotInductorTarget(Target):
    name = "aotinductor"
    precisions = ("fp32", "bf16", "int8")
    Config = AotInductorConfig
    tools = ("torch", "torchao")
    named_options = ("device", "torch_version")  # both are in the folder name

    def needs_source(self, config: TargetConfig) -> bool:
        return True  # compiles the torch.export program, so it needs the pipeline

    def _device(self, config: AotInductorConfig) -> str:
        device = config.device or detect_device()
        if device not in DEVICES:
            raise UsageError(f"unknown AOTInductor device '{device}'", f"choose from {', '.join(DEVICES)}")
        return device

    def base_label(self, config: TargetConfig) -> str:
        """fp32-cpu-torch2.13.0: a package runs only on its device kind and torch build."""
        assert isinstance(config, AotInductorConfig)
        return f"{config.precision}-{self._device(config)}-torch{_public(config.torch_version or torch_version())}"

    def availability(self) -> Availability:
        try:
            import torch._inductor  # noqa: F401
        except ImportError as exc:  # torch without inductor (a minimal build)
            return Availability(False, f"torch._inductor cannot be imported ({exc})", "pip install torch==2.13.0")
        return Availability(True)

    def build_availability(self) -> Availability:
        """Compiling also needs a C++ compiler (inductor's: $CXX, else g++ or clang++); loading does not."""
        here = self.availability()
        if not here.ok:
            return here
        if not any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "clang++", "c++"))):
            return Availability(False, "AOTInductor needs a C++ compiler and none is on PATH",
                                "install g++ (apt-get install g++) or set CXX")
        return Availability(True)

    def precision_availability(self, precision: str) -> Availability:
        if precision != "int8":
            return Availability(True)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"int8 needs torchao's Int8DynamicActivationInt8WeightConfig ({exc})",
                                INT8_EXTRA)
        return Availability(True)

    # -- plan (pure) -------------------------------------------------------------------------
    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        assert isinstance(config, AotInductorConfig)
        device = self._device(config)
        components = {}
        for name, spec in specs.items():
            components[name] = {
                "spec": spec.to_json(),
                "package": f"{name}/{PACKAGE}",
                # torch.export.Dim(min, max) per dynamic dim (x multiple_of): what the package accepts
                "dynamic": {d.name: {"min": d.min, "max": d.max, "multiple_of": d.multiple_of}
                            for d in spec.dims if not d.is_static},
                "static": {d.name: d.min for d in spec.dims if d.is_static},
            }
        info, _ = read_tree_info(tree) if (tree / TREE_INFO).is_file() else ({}, {})
        return {
            "target": self.name,
            "precision": config.precision,
            "device": device,
            "torch_version": config.torch_version or torch_version(),
            "quantization": "torchao Int8DynamicActivationInt8WeightConfig (nn.Linear)"
                            if config.precision == "int8" else None,
            "tree": str(tree),
            "family": info.get("family"),
            "dir": self.output_dir(Path("."), config).name,
            "components": components,
        }

    # -- build -------------------------------------------------------------------------------
    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        self.build_availability().require("AOTInductor")
        self.precision_availability(plan["precision"]).require(f"AOTInductor {plan['precision']}")
        here = torch_version()
        if plan["torch_version"] != here:
            raise UsageError(f"the plan is for torch {plan['torch_version']} but this machine has torch {here}",
                             "build on a machine with that torch, or drop the torch_version option")
        if plan["device"] == "cuda" and detect_device() != "cuda":
            raise UsageError("the plan compiles for CUDA but no CUDA GPU is visible here",
                             "build on a machine with an NVIDIA GPU and a CUDA build of torch, or use --option device=cpu")
        if source is None:
            raise UsageError("the AOTInductor build needs the source pipeline (it compiles the torch.export program)",
                             "run it through 'diffprism compile', which reloads the source named in the manifest")
        tree = Path(plan["tree"])
        info, _ = read_tree_info(tree)
        final = out / plan["dir"]
        result = BuildResult(self.name, plan["precision"], final)
        specs = {}
        with staged_dir(final) as stage:
            for name, entry in plan["components"].items():
                spec = ComponentSpec.from_json(entry["spec"])
                specs[name] = spec
                result.details[name] = _build_component(source, spec, plan, stage / entry["package"], out)
            write_tree_info(stage, {**info, "precision": plan["precision"], "target": self.name,
                                    "device": plan["device"], "torch_version": plan["torch_version"]}, specs)
        result.files = sorted(p for p in final.rglob("*") if p.is_file())
        result.note = f"packages for {plan['device']} with torch {plan['torch_version']} (they load on no other)"
        return result

    # -- validation ---------------------------------------------------------------------------
    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        from runtimes.aoti_runner import AotiRunner

        package = artifact_dir / spec.name / PACKAGE
        if not package.is_file():
            raise SourceError(f"no AOTInductor package for '{spec.name}' at {package}",
                              f"run 'diffprism compile DIR --target {self.name}' for that component")
        return AotiRunner(spec, package, **options)

    def inspect(self, artifact_dir: Path, spec: ComponentSpec, config: TargetConfig) -> dict[str, Any]:
        """What can be checked without loading: the package and its facts exist and name this component."""
        package = artifact_dir / spec.name / PACKAGE
        problems = []
        if not package.is_file():
            problems.append(f"{package.name} is missing")
        facts_path = package.parent / PACKAGE_INFO
        facts = json.loads(facts_path.read_text()) if facts_path.is_file() else None
        if facts is None:
            problems.append(f"{PACKAGE_INFO} is missing")
        elif facts.get("component") != spec.name:
            problems.append(f"{PACKAGE_INFO} names '{facts.get('component')}'")
        return {"ok": not problems, "problems": problems, "bytes": package.stat().st_size if package.is_file() else 0}


def _program(source: Any, spec: ComponentSpec, precision: str, device: str) -> torch.export.ExportedProgram:
    """The component's torch.export program in the variant's precision, on its device."""
    from targets.torch_program import traced_program

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    program = traced_program(source, spec, dtype, int8=precision == "int8")
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program


def _build_component(source: Any, spec: ComponentSpec, plan: dict[str, Any], path: Path, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        program = _program(source, spec, plan["precision"], plan["device"])
    except ExportError:
        raise
    except Exception as exc:  # torchao and torch.export raise many types
        raise ExportError(f"preparing '{spec.name}' for AOTInductor {plan['precision']} failed: "
                          f"{type(exc).__name__}: {_first_line(exc)}", "run with -v for the full trace") from exc
    traced = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = {"component": spec.name, "precision": plan["precision"], "device": plan["device"],
             "torch_version": plan["torch_version"]}
    configs = {"aot_inductor.metadata": {f"diffprism.{k}": v for k, v in facts.items()}}
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    except Exception as exc:
        raise ExportError(f"AOTInductor could not compile '{spec.name}': {type(exc).__name__}: {_first_line(exc)}",
                          "check that gcc/g++ are installed; run with -v for inductor's log") from exc
    del program
    compiled = time.perf_counter()
    write_json_atomic(path.parent / PACKAGE_INFO, facts)
    details = {
        "package": f"{spec.name}/{PACKAGE}",
        "bytes": path.stat().st_size,
        "device": plan["device"],
        "torch_version": plan["torch_version"],
        "trace_seconds": round(traced - start, 2),
        "compile_seconds": round(compiled - traced, 2),
        "package_rel_l2": _check_package(path, spec, out),
    }
    log.info("compiled %s to AOTInductor %s in %.1fs (%d bytes)", spec.name, plan["precision"],
             compiled - start, details["bytes"])
    return details


def _check_package(path: Path, spec: ComponentSpec, out: Path) -> float | None:
    """The compiled package at the reference's opt point: the error a build ships (bf16, int8) on record."""
    ref = out / REFERENCE_DIR / f"{spec.name}.npz"
    if not ref.is_file():
        log.warning("no reference for %s at %s; the package is not measured", spec.name, ref)
        return None
    from runtimes.aoti_runner import AotiRunner

    cases = reference.load(ref)
    case = cases.get("opt") or next(iter(cases.values()))
    with AotiRunner(spec, path) as runner:
        got = runner.infer(case["inputs"])
    return float(f"{max(_rel_l2(got[n], case['outputs'][n]) for n in spec.output_names):.3e}")


def _rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - ref64) / max(np.linalg.norm(ref64), 1e-12))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
