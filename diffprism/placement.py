"""Where each component runs: 'torch' or a built target variant ('openvino:int8'), per component.

`Runners` turns placements over one output folder into Runners and runner pipelines:
target artifacts through `targets.base.get_target(...).runner`, PyTorch through the
source the export recorded in its manifest (loaded once, on first need).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from diffprism import manifest, sources
from exporters.families import exporter_for
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR
from exporters.spec import ComponentSpec
from runtimes.base import Runner

log = logging.getLogger(__name__)

TORCH = "torch"


@dataclass(frozen=True)
class Placement:
    target: str  # "torch" or a target name from targets.base.REGISTRY
    precision: str = "fp32"

    @property
    def label(self) -> str:
        return TORCH if self.target == TORCH else f"{self.target}-{self.precision}"

    @classmethod
    def parse(cls, text: str) -> "Placement":
        """'torch', 'openvino', 'openvino:int8' (or 'openvino-int8')."""
        from targets.base import REGISTRY

        text = text.strip()
        target, sep, precision = text.partition(":") if ":" in text else text.partition("-")
        if target != TORCH and target not in REGISTRY:
            raise UsageError(f"unknown target '{target}' in '{text}'", f"choose from torch, {', '.join(REGISTRY)}")
        if target == TORCH and precision not in ("", "fp32"):
            raise UsageError(f"'{text}': the PyTorch reference runs in fp32 only", "write 'torch'")
        return cls(target, precision or "fp32")


def parse_component_targets(items: list[str] | None) -> dict[str, Placement]:
    """['unet=openvino:int8', ...] -> {'unet': Placement('openvino', 'int8')}."""
    found: dict[str, Placement] = {}
    for item in items or []:
        name, sep, where = item.partition("=")
        if not sep or not name.strip() or not where.strip():
            raise UsageError(f"--component-target '{item}' is not COMPONENT=TARGET[:PRECISION]",
                             "write e.g. --component-target unet=openvino:int8")
        found[name.strip()] = Placement.parse(where)
    return found


def mix_label(placements: Mapping[str, Placement]) -> str:
    """'openvino-int8' when every component runs there, else 'text_encoder=torch+unet=openvino-int8+...'."""
    labels = {p.label for p in placements.values()}
    if len(labels) == 1:
        return labels.pop()
    return "+".join(f"{n}={p.label}" for n, p in placements.items())


class Runners:
    def __init__(self, out: Path, runner_options: Mapping[str, Any] | None = None):
        self.out = out
        self.options = dict(runner_options or {})
        self._source: Any = None

    def source_pipeline(self) -> Any:
        """The PyTorch pipeline the export was made from (the reference)."""
        if self._source is None:
            data = manifest.load(self.out)
            if not data or not data.get("source"):
                raise SourceError(f"{self.out} has no manifest recording its source",
                                  "re-run 'diffprism export SOURCE --out DIR'")
            self._source = sources.load_recorded(data["source"]).pipeline
        return self._source

    def artifact_dir(self, placement: Placement) -> Path:
        from targets.base import get_target

        target = get_target(placement.target)
        path = target.output_dir(self.out, target.config(precision=placement.precision))
        if not path.is_dir():
            raise SourceError(f"no {placement.target} {placement.precision} artifacts at {path}",
                              f"run 'diffprism compile {self.out} --target {placement.target} "
                              f"--precision {placement.precision}' first")
        return path

    def runner(self, name: str, spec: ComponentSpec, placement: Placement) -> Runner:
        if placement.target == TORCH:
            from runtimes.torch_runner import TorchRunner

            source = self.source_pipeline()
            exporter = exporter_for(source, name)
            return TorchRunner(spec, exporter.wrap(exporter.module(source), spec))
        from targets.base import get_target

        target = get_target(placement.target)
        return target.runner(self.artifact_dir(placement), spec, **self.options)

    def pipeline(self, placements: Mapping[str, Placement], default: Placement) -> Any:
        """A diffusers pipeline: the PyTorch source itself if everything is torch, else a runner pipeline."""
        from runtimes.pipeline import load_pipeline

        if default.target == TORCH and all(p.target == TORCH for p in placements.values()):
            return self.source_pipeline()
        return load_pipeline(self.out / ONNX_DIR, lambda name, spec: self.runner(name, spec, placements.get(name, default)))


def resolve(out: Path, default: Placement, overrides: Mapping[str, Placement]) -> dict[str, Placement]:
    """Placement of every text-to-image component of the export (overrides must name exported components)."""
    from exporters.tree import read_tree_info
    from runtimes.pipeline import needed as needed_components

    info, specs = read_tree_info(out / ONNX_DIR)
    needed = needed_components(info, specs)
    unknown = [n for n in overrides if n not in needed]
    if unknown:
        raise UsageError(f"--component-target names {unknown}, which generation does not use",
                         f"choose from {', '.join(needed)}")
    return {n: overrides.get(n, default) for n in needed}


def built_variants(out: Path) -> list[Placement]:
    """Target variants built in the folder: the exported ONNX tree plus every compiled target whose folder exists."""
    from exporters.paths import resolve_inside

    found = [Placement("onnxruntime", "fp32")] if (out / ONNX_DIR).is_dir() else []
    data = manifest.load(out) or {}
    for key, entry in sorted((data.get("targets") or {}).items()):
        target = key.split("-", 1)[0]
        precision = (entry.get("config") or {}).get("precision") or key.split("-", 1)[-1]
        placement = Placement(target, precision)
        folder = entry.get("dir")
        if placement not in found and folder and resolve_inside(out, folder, "target folder").is_dir():
            found.append(placement)
    return found
