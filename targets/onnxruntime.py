"""ONNX Runtime target: the fp32 tree runs as exported; other precisions are variant trees onnx-<precision>/."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from exporters.export import ONNX_DIR
from exporters.spec import ComponentSpec
from targets.base import Availability, BuildResult, Target, TargetConfig


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    precisions = ("fp32",)

    def output_dir(self, out: Path, config: TargetConfig) -> Path:
        return out / (ONNX_DIR if config.precision == "fp32" else f"{ONNX_DIR}-{config.precision}")

    def availability(self) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return Availability(False, "onnxruntime is not installed", "pip install onnxruntime")
        return Availability(True)

    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        return {"target": self.name, "precision": config.precision, "tree": str(tree), "components": list(specs)}

    def build(self, plan: dict[str, Any], out: Path) -> BuildResult:
        # fp32 is the exported tree itself: nothing to build.
        return BuildResult(self.name, plan["precision"], out / ONNX_DIR, note="the exported fp32 tree")

    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        from runtimes.onnxruntime_runner import OnnxRuntimeRunner

        self.availability().require("ONNX Runtime")
        return OnnxRuntimeRunner(spec, artifact_dir / spec.name / "model.onnx", **options)
