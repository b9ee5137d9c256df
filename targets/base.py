"""The Target plug-in contract: a pure plan, a build, an availability check, a runner for validation.

Backends (openvino, tensorrt, coremltools) are imported lazily inside the adapter, so
`import targets` works without them and a missing backend is an error naming the extra.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from exporters.errors import BackendUnavailable, UsageError
from exporters.spec import ComponentSpec


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    fix: str = ""

    def require(self, what: str) -> None:
        if not self.ok:
            raise BackendUnavailable(f"{what}: {self.reason}", self.fix or None)


class TargetConfig(BaseModel):
    """Options shared by every target; each target extends it."""

    model_config = ConfigDict(extra="forbid")
    precision: str = "fp32"
    components: list[str] | None = None


@dataclass
class BuildResult:
    target: str
    precision: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # per-component facts for the manifest/report
    note: str = ""  # e.g. "build job written; engines must be built on a GPU machine"


class Target(ABC):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    Config: ClassVar[type[TargetConfig]] = TargetConfig

    def config(self, **options: Any) -> TargetConfig:
        try:
            cfg = self.Config(**{k: v for k, v in options.items() if v is not None})
        except ValidationError as exc:  # one line naming the bad option, not a pydantic dump
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "options"
            raise UsageError(f"target '{self.name}' option {where}: {err['msg']}",
                             f"valid options: {', '.join(self.Config.model_fields)}") from None
        if cfg.precision not in self.precisions:
            raise UsageError(
                f"target '{self.name}' has no precision '{cfg.precision}'", f"choose from {', '.join(self.precisions)}"
            )
        return cfg

    def output_dir(self, out: Path, config: TargetConfig) -> Path:
        return out / f"{self.name}-{config.precision}"

    @abstractmethod
    def availability(self) -> Availability: ...

    @abstractmethod
    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        """What would be built, as JSON-able data; pure, so it is testable on any machine."""

    @abstractmethod
    def build(self, plan: dict[str, Any], out: Path) -> BuildResult: ...

    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        """A Runner for one built component (for validation); targets that cannot run here raise."""
        raise BackendUnavailable(f"target '{self.name}' has no runner on this machine")


# name -> "module:Class"; imported on first use so missing backends cost nothing.
REGISTRY = {
    "onnxruntime": "targets.onnxruntime:OnnxRuntimeTarget",
    "openvino": "targets.openvino:OpenVinoTarget",
    "tensorrt": "targets.tensorrt:TensorRtTarget",
    "coreml": "targets.coreml:CoreMlTarget",
    "web": "targets.web:WebTarget",
}


def get_target(name: str) -> Target:
    if name not in REGISTRY:
        raise UsageError(f"unknown target '{name}'", f"choose from {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"target '{name}' is not available in this build of diffprism: {exc}") from exc
