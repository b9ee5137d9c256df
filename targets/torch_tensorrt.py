"""Torch-TensorRT target: the components' torch.export programs compiled by Torch-TensorRT's dynamo frontend.

<out>/torch_tensorrt-<precision>-sm<cc>-torch<version>/: plan.json, build_trt.py (the build job,
targets/torch_tensorrt_job.py) and <component>/program.pt2, the same trace the ONNX export starts
from in the variant's precision (fp16/bf16: the module cast, with float32 inputs and outputs),
saved with torch.export.save. The job compiles each program with torch_tensorrt.dynamo.compile,
the spec's min/opt/max as its torch_tensorrt.Input shapes, and saves <component>/model.ep (an
ExportedProgram holding the TensorRT engines). A compiled program runs only on the GPU kind and
torch/TensorRT builds that made it, so GPU and torch version are in the folder name and the plan.

torch_tensorrt needs CUDA and cannot be installed here: `build` always writes the plan, the
programs and the job, and runs the job itself only where torch_tensorrt and a CUDA GPU are
present; elsewhere BuildResult.note says where to run it. Unverified on a GPU by this project's CI.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from exporters.errors import ExportError, SourceError, UsageError
from exporters.files import staged_dir, write_bytes_atomic, write_json_atomic
from exporters.spec import ComponentSpec
from targets.base import Availability, BuildResult, Target, TargetConfig
from targets.tensorrt_plan import gpu_tag, parse_gpu
from targets.torch_tensorrt_job import ENGINES_FILE, OUTPUT, PLAN_FILE, PROGRAM, SCRIPT_FILE, build_script

log = logging.getLogger(__name__)

EXTRA = ("pip install torch-tensorrt (the wheel matching the machine's torch and CUDA) on a machine with an NVIDIA GPU")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MIN_CC = {"bf16": 80}


class TorchTensorRtConfig(TargetConfig):
    gpu: str | None = None  # target GPU: "sm89" or "8.9"; None: this machine's GPU, else "unknown"
    torch_version: str | None = None  # None: this machine's torch (the programs are saved with it)
    optimization_level: int = Field(3, ge=0, le=5)  # TensorRT builder optimization level
    workspace_mb: int | None = Field(None, gt=0)
    min_block_size: int = Field(5, ge=1)  # smallest subgraph Torch-TensorRT hands to TensorRT

    @field_validator("gpu", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value


def _torch_version() -> str:
    import torch

    return torch.__version__


def _detect_cc() -> int | None:
    from targets.tensorrt import detect_cc

    return detect_cc()


def dir_name(precision: str, gpu: str, torch_version: str) -> str:
    return f"torch_tensorrt-{precision}-{gpu}-torch{torch_version.split('+')[0]}"


class TorchTensorRtTarget(Target):
    name = "torch_tensorrt"
    precisions = tuple(DTYPES)
    Config = TorchTensorRtConfig
    tools = ("torch", "torch_tensorrt")
    named_options = ("gpu", "torch_version")  # both are in the folder name
    gpu = True
    runs_on = ("self-hosted", "linux", "x64", "gpu")  # the job compiles there; saving the programs runs anywhere
    gitlab_tag = "gpu"

    def needs_source(self, config: TargetConfig) -> bool:
        return True  # saves the torch.export program, so it needs the pipeline

    def _gpu(self, config: TorchTensorRtConfig) -> str:
        return gpu_tag(parse_gpu(config.gpu) if config.gpu else _detect_cc(), "none")

    def base_label(self, config: TargetConfig) -> str:
        assert isinstance(config, TorchTensorRtConfig)
        return dir_name(config.precision, self._gpu(config), config.torch_version or _torch_version()).split("-", 1)[1]

    def availability(self) -> Availability:
        from targets.tensorrt import gpu_package_availability

        return gpu_package_availability("torch_tensorrt", EXTRA)

    def build_availability(self) -> Availability:
        return Availability(True)  # without torch_tensorrt and a GPU, build writes the job for a GPU machine

    def runner_availability(self) -> Availability:
        here = self.availability()
        return here if here.ok else Availability(False, f"Torch-TensorRT programs need a CUDA GPU with torch_tensorrt "
                                                        f"({here.reason})", here.fix)

    # -- plan (pure) -------------------------------------------------------------------------
    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        assert isinstance(config, TorchTensorRtConfig)
        gpu = self._gpu(config)
        version = config.torch_version or _torch_version()
        need = MIN_CC.get(config.precision)
        if need and gpu != "smunknown" and int(gpu[2:]) < need:
            raise UsageError(f"{config.precision} needs compute capability >= {need // 10}.{need % 10}, not {gpu}",
                             "use fp16 on this GPU")
        components = {}
        for name, spec in specs.items():
            components[name] = {
                "program": f"{name}/{PROGRAM}",
                "output": f"{name}/{OUTPUT}",
                "inputs": [{"name": t.name, "dtype": t.dtype, **{p: list(s) for p, s in spec.profile()[t.name].items()}}
                           for t in spec.inputs],
                "spec": spec.to_json(),
            }
        settings: dict[str, Any] = {"optimization_level": config.optimization_level,
                                    "min_block_size": config.min_block_size}
        if config.workspace_mb:
            settings["workspace_size"] = config.workspace_mb * 2**20
        return {
            "target": self.name,
            "precision": config.precision,
            "gpu": gpu,
            "torch_version": version,
            "dir": dir_name(config.precision, gpu, version),
            "dir_pattern": dir_name(config.precision, "{gpu}", version),
            "enabled_precisions": sorted({"float32", DTYPES[config.precision]}),
            "settings": settings,
            "components": components,
        }

    # -- build -------------------------------------------------------------------------------
    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        if source is None:
            raise UsageError("the Torch-TensorRT build needs the source pipeline (it saves the torch.export program)",
                             "run it through 'diffprism compile', which reloads the source named in the manifest")
        here = _torch_version()
        if plan["torch_version"] != here:
            raise UsageError(f"the plan is for torch {plan['torch_version']} but this machine has torch {here} "
                             "(the programs are saved with this machine's torch.export)",
                             "plan and save on a machine with that torch, or drop the torch_version option")
        final = out / plan["dir"]
        details: dict[str, Any] = {}
        with staged_dir(final) as stage:
            for name, component in plan["components"].items():
                path = stage / component["program"]
                path.parent.mkdir(parents=True, exist_ok=True)
                details[name] = _save_program(source, ComponentSpec.from_json(component["spec"]), plan["precision"], path)
                details[name].update(gpu=plan["gpu"], torch_version=plan["torch_version"], built=False,
                                     output=f"{plan['dir']}/{component['output']}")
            write_json_atomic(stage / PLAN_FILE, plan)
            write_bytes_atomic(stage / SCRIPT_FILE, build_script(plan).encode())
            (stage / SCRIPT_FILE).chmod(0o755)
        reason = "" if self.availability().ok else self.availability().reason
        if not reason:
            self._run_job(final)
            for name in details:
                details[name]["built"] = (final / plan["components"][name]["output"]).is_file()
            files = sorted(p for p in final.rglob("*") if p.is_file())
            return BuildResult(self.name, plan["precision"], final, files, details, "built with torch_tensorrt here")
        files = sorted(p for p in final.rglob("*") if p.is_file())
        rel = final.relative_to(out).as_posix() if final.is_relative_to(out) else str(final)
        note = (f"programs saved, not compiled here ({reason}); run 'python {rel}/{SCRIPT_FILE}' on a GPU machine "
                f"with torch {plan['torch_version']} and torch_tensorrt, then 'diffprism validate DIR --target "
                f"{self.name} --precision {plan['precision']}' there")
        return BuildResult(self.name, plan["precision"], final, files, details, note)

    def _run_job(self, folder: Path) -> None:
        done = subprocess.run([sys.executable, str(folder / SCRIPT_FILE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise ExportError(f"the Torch-TensorRT build job failed: {done.stderr.strip().splitlines()[-1:]}",
                              f"run 'python {folder / SCRIPT_FILE}' for its full output")

    # -- validation ---------------------------------------------------------------------------
    def inspect(self, artifact_dir: Path, spec: ComponentSpec, config: TargetConfig) -> dict[str, Any]:
        """Without a GPU: the plan names the component with its shapes, its saved program and the job exist."""
        plan_path = artifact_dir / PLAN_FILE
        if not plan_path.is_file():
            raise SourceError(f"{artifact_dir} has no {PLAN_FILE}",
                              f"run 'diffprism compile DIR --target {self.name}' first")
        plan = json.loads(plan_path.read_text())
        component = plan["components"].get(spec.name)
        problems = []
        if component is None:
            problems.append(f"the plan has no '{spec.name}'")
        else:
            if not (artifact_dir / component["program"]).is_file():
                problems.append(f"the saved program {component['program']} is missing")
            if [i["name"] for i in component["inputs"]] != spec.input_names:
                problems.append("the plan's inputs are not the spec's")
        if not (artifact_dir / SCRIPT_FILE).is_file():
            problems.append(f"{SCRIPT_FILE} is missing")
        built = bool(component) and (artifact_dir / component["output"]).is_file()
        return {"ok": not problems, "problems": problems, "built": built,
                "engines_recorded": (artifact_dir / ENGINES_FILE).is_file()}

    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        from runtimes.torch_tensorrt_runner import TorchTensorRtRunner

        self.availability().require("Torch-TensorRT programs")
        program = artifact_dir / spec.name / OUTPUT
        if not program.is_file():
            raise SourceError(f"no compiled program at {program} (the build job has not run on this machine's GPU)",
                              f"run 'python {artifact_dir.name}/{SCRIPT_FILE}' from the artifact folder")
        return TorchTensorRtRunner(spec, program, **options)


def _save_program(source: Any, spec: ComponentSpec, precision: str, path: Path) -> dict[str, Any]:
    """torch.export.save of the component's program in the variant's precision (float32 inputs and outputs)."""
    import torch

    from targets.torch_program import traced_program

    dtype = getattr(torch, DTYPES[precision])
    try:
        program = traced_program(source, spec, dtype)
        torch.export.save(program, str(path))
    except ExportError:
        raise
    except Exception as exc:  # torch.export raises many types
        raise ExportError(f"saving the program of '{spec.name}' failed: {type(exc).__name__}: {exc}",
                          "run with -v for the full trace") from exc
    return {"program": path.name, "bytes": path.stat().st_size}
