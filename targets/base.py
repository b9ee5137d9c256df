"""The Target plug-in contract: a pure plan, a build, an availability check, a runner for validation.

Backends (openvino, tensorrt, coremltools) are imported lazily inside the adapter, so
`import targets` works without them and a missing backend is an error naming the extra.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

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


@dataclass(frozen=True)
class Inputs:
    """What a variant's build reads besides the exported tree (so its stage key can name it)."""

    calibration: Literal["none", "optional", "required"] = "none"  # the capture under <out>/calibration
    # Another variant whose tree the build reads: (target, precision, options), e.g. TensorRT int8's onnx-int8.
    variant: tuple[str, str, dict[str, Any]] | None = None


class Target(ABC):
    """One deployment backend behind an explicit contract; every hook below has a default.

    Identity: a variant is (target, precision, options that differ from the Config defaults).
    Options the label spells out (`named_options`, e.g. Core ML's compress) need no digest; any
    other option adds the first 8 hex digits of the options digest to the label, so two variants
    that differ only in options get different folders, labels, stage keys and manifest entries.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    Config: ClassVar[type[TargetConfig]] = TargetConfig
    tools: ClassVar[tuple[str, ...]] = ()  # packages whose versions key a build of this target
    named_options: ClassVar[tuple[str, ...]] = ()  # options the folder/label already spell out
    folder_prefixes: ClassVar[tuple[str, ...]] = ()  # first dash-separated part of this target's folders
    runs_on: ClassVar[tuple[str, ...]] = ("ubuntu-latest",)  # GitHub runner labels of a build job
    gitlab_tag: ClassVar[str] = "saas-linux-small-amd64"
    gpu: ClassVar[bool] = False  # build jobs need a GPU runner
    # The artifact runs as one whole pipeline (e.g. a browser bundle), judged by its image through
    # `pipeline_runner` instead of component by component through `runner`.
    runs_as_pipeline: ClassVar[bool] = False

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

    # -- identity ------------------------------------------------------------------------
    def options_of(self, config: TargetConfig) -> dict[str, Any]:
        """The options that make this variant differ from the default one (JSON values, sorted)."""
        data = config.model_dump(mode="json")
        default = type(config)(precision=config.precision).model_dump(mode="json")
        return {k: data[k] for k in sorted(data) if k not in ("precision", "components") and data[k] != default.get(k)}

    def options_digest(self, config: TargetConfig) -> str:
        """sha256 of the variant's options ("" for the default variant)."""
        options = self.options_of(config)
        return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest() if options else ""

    def base_label(self, config: TargetConfig) -> str:
        """The readable part of the label: the precision plus what `named_options` spell out."""
        return config.precision

    def options_suffix(self, config: TargetConfig) -> str:
        """'-3fa2c1d0' (the options digest's first 8 hex digits) when an option the label does not spell out
        differs from its default, else ''. Targets that name folders their own way append it too."""
        unnamed = {k for k in self.options_of(config) if k not in self.named_options}
        return f"-{self.options_digest(config)[:8]}" if unnamed else ""

    def variant_label(self, config: TargetConfig) -> str:
        """e.g. fp16, fp16-palettize4, int8-3fa2c1d0 (int8 with non-default options)."""
        return self.base_label(config) + self.options_suffix(config)

    def output_dir(self, out: Path, config: TargetConfig) -> Path:
        return out / f"{self.name}-{self.variant_label(config)}"

    # -- what a build needs --------------------------------------------------------------
    def needs_source(self, config: TargetConfig) -> bool:
        """Whether the build converts from the torch pipeline (the caller passes it as `source`)."""
        return False

    def inputs(self, config: TargetConfig) -> Inputs:
        return Inputs()

    @abstractmethod
    def availability(self) -> Availability: ...

    def build_availability(self) -> Availability:
        """Whether `build` can run here (a target that writes a build job for elsewhere can always run)."""
        return self.availability()

    @abstractmethod
    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        """What would be built, as JSON-able data; pure, so it is testable on any machine."""

    @abstractmethod
    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        """Build the plan under `out`; `source` is the torch pipeline when needs_source(config)."""

    # -- validation ----------------------------------------------------------------------
    def tolerance_row(self, config: TargetConfig) -> str:
        """The precision row of validation.policy that judges this variant."""
        return config.precision

    # -- runtime configuration (part of the variant) -----------------------------------------
    def runtime_options(self, config: TargetConfig) -> dict[str, Any]:
        """Runner options this variant is deployed with (e.g. its compute precision); generate, bench
        and validation run it so, and runner options given explicitly override them."""
        return {}

    def weights_only_options(self, config: TargetConfig) -> dict[str, Any] | None:
        """Runner options that compute the variant's stored weights at full precision: validation runs this
        check beside the deploy one unless the deploy options already are these. None: the target has none."""
        return None

    def runner_availability(self) -> Availability:
        """Whether numerics can run here; when not, validation falls back to `inspect`."""
        return Availability(True)

    def inspect(self, artifact_dir: Path, spec: ComponentSpec, config: TargetConfig) -> dict[str, Any]:
        """Structural check of one built component: {"ok": bool, "problems": [...], ...}."""
        raise BackendUnavailable(f"target '{self.name}' has no structural check")

    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        """A Runner for one built component (for validation); targets that cannot run here raise."""
        raise BackendUnavailable(f"target '{self.name}' has no runner on this machine")

    def pipeline_runner(self, artifact_dir: Path, **options: Any):
        """The whole artifact as one pipeline runner, for targets with `runs_as_pipeline`."""
        raise BackendUnavailable(f"target '{self.name}' does not run as a whole pipeline")

    # -- CI matrix -----------------------------------------------------------------------
    def runner_labels(self, matrix: dict[str, Any]) -> list[str]:
        """GitHub runner labels of this target's build job (`matrix` is the recipe's [matrix] table)."""
        return list(self.runs_on)

    def gitlab_runner(self, matrix: dict[str, Any]) -> str:
        return self.gitlab_tag

    def matrix_facts(self, matrix: dict[str, Any]) -> dict[str, Any]:
        """Extra fields of this target's matrix job (e.g. the TensorRT version)."""
        return {}


# name -> "module:Class"; imported on first use so missing backends cost nothing.
REGISTRY = {
    "onnxruntime": "targets.onnxruntime:OnnxRuntimeTarget",
    "openvino": "targets.openvino:OpenVinoTarget",
    "tensorrt": "targets.tensorrt:TensorRtTarget",
    "coreml": "targets.coreml:CoreMlTarget",
    "web": "targets.web:WebTarget",
    "aotinductor": "targets.aotinductor:AotInductorTarget",
    "torch_tensorrt": "targets.torch_tensorrt:TorchTensorRtTarget",
}


def get_target(name: str) -> Target:
    if name not in REGISTRY:
        raise UsageError(f"unknown target '{name}'", f"choose from {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"target '{name}' is not available in this build of diffprism: {exc}") from exc


def folder_prefixes() -> set[str]:
    """First dash-separated part of every registered target's artifact folders (e.g. onnx, openvino)."""
    found = set()
    for name in REGISTRY:
        try:
            found.update(get_target(name).folder_prefixes or (name,))
        except UsageError:
            found.add(name)
    return found
