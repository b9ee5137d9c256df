"""Where each component runs: 'torch' or a built target variant ('openvino:int8'), per component.

`Runners` turns placements over one output folder into Runners and runner pipelines:
target artifacts through `targets.base.get_target(...).runner`, PyTorch through the
source the export recorded in its manifest (loaded once, on first need).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from diffprism import manifest, sources
from diffprism import variant as variants
from diffprism.variant import TORCH, Variant
from exporters.families import exporter_for
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR
from exporters.spec import ComponentSpec
from runtimes.base import Runner

log = logging.getLogger(__name__)

# A placement is a variant (diffprism.variant) or the PyTorch source: one identity, one label.
Placement = Variant


def parse_component_targets(items: list[str] | None) -> dict[str, Placement]:
    """['unet=openvino:int8', ...] -> {'unet': Placement('openvino', 'int8')}."""
    found: dict[str, Placement] = {}
    for item in items or []:
        name, sep, where = item.partition("=")
        if not sep or not name.strip() or not where.strip():
            raise UsageError(f"--component-target '{item}' is not COMPONENT=TARGET[:PRECISION]",
                             "write e.g. --component-target unet=openvino:int8")
        found[name.strip()] = variants.parse(where)
    return found


def mix_label(placements: Mapping[str, Placement]) -> str:
    """'openvino-int8' when every component runs there, else 'text_encoder=torch+unet=openvino-int8+...'."""
    labels = {p.label for p in placements.values()}
    if len(labels) == 1:
        return labels.pop()
    return "+".join(f"{n}={p.label}" for n, p in placements.items())


class Runners:
    """`source`/`source_info`: the PyTorch pipeline's loader and its record, for callers that have them
    before a manifest exists (a recipe build); otherwise the source the manifest records."""

    def __init__(self, out: Path, runner_options: Mapping[str, Any] | None = None, *,
                 source: Callable[[], Any] | None = None, source_info: Mapping[str, Any] | None = None):
        self.out = out
        self.options = dict(runner_options or {})
        self._source: Any = None
        self._load, self._info = source, source_info

    @property
    def source_info(self) -> Any:
        return self._info if self._info is not None else (manifest.load(self.out) or {}).get("source")

    def source_pipeline(self) -> Any:
        """The PyTorch pipeline the export was made from (the reference)."""
        if self._source is None and self._load is not None:
            self._source = self._load()
        if self._source is None:
            data = manifest.load(self.out)
            if not data or not data.get("source"):
                raise SourceError(f"{self.out} has no manifest recording its source",
                                  "re-run 'diffprism export SOURCE --out DIR'")
            self._source = sources.load_recorded(data["source"]).pipeline
        return self._source

    def artifact_dir(self, placement: Placement) -> Path:
        return variants.require_built(self.out, placement)

    def runner(self, name: str, spec: ComponentSpec, placement: Placement) -> Runner:
        if placement.target == TORCH:
            from runtimes.torch_runner import TorchRunner

            source = self.source_pipeline()
            exporter = exporter_for(source, name)
            return TorchRunner(spec, exporter.wrap(exporter.module(source), spec))
        from targets.base import get_target

        return get_target(placement.target).runner(self.artifact_dir(placement), spec,
                                                   **placement.runtime_options(self.options))

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
    chosen = {n: overrides.get(n, default) for n in needed}
    return {n: variants.resolve(out, p) for n, p in chosen.items()}


def built_variants(out: Path) -> list[Placement]:
    """Target variants built in the folder: the exported ONNX tree plus every compiled variant whose folder exists."""
    return variants.built(out)
