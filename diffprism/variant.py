"""One identity for a built variant: Variant(target, precision, options).

`options` are the target options that differ from the target's defaults (normalized through
its Config, so an option set to its default is the default variant). From the value follow,
with no other naming anywhere: the folder (`folder(out)`), the tag (fp16, fp16-palettize4,
int8-3a3b5af9), the key (= label) "target-label" that names the manifest entry, the report rows, the
build stages and the placement, and the options digest that goes into stage keys.
Option-less variants keep the plain names (openvino-int8, onnx-int8, coreml-fp16).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from exporters.errors import SourceError, UsageError

log = logging.getLogger(__name__)

TORCH = "torch"  # the PyTorch source itself (a placement, never built)


@dataclass(frozen=True)
class Variant:
    target: str
    precision: str = "fp32"
    options_json: str = "{}"  # canonical JSON of the non-default options (hashable, comparable)

    @classmethod
    def of(cls, target: str, precision: str | None = None, options: Mapping[str, Any] | None = None) -> "Variant":
        """The variant a target, precision and options ask for (None precision: the target's default)."""
        if target == TORCH:
            if precision not in (None, "", "fp32") or options:
                raise UsageError("the PyTorch reference runs in fp32 with no options", "write 'torch'")
            return cls(TORCH)
        tgt = _target(target)
        options = {k: v for k, v in (options or {}).items() if k not in ("precision", "components")}
        config = tgt.config(precision=precision, **options)
        return cls(target, config.precision, json.dumps(tgt.options_of(config), sort_keys=True))

    @classmethod
    def parse(cls, text: str, out: Path | None = None) -> "Variant":
        return parse(text, out)

    @classmethod
    def from_config(cls, target: str, config: Any) -> "Variant":
        return cls.of(target, config.precision, config.model_dump(mode="json"))

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    @property
    def is_torch(self) -> bool:
        return self.target == TORCH

    def config(self, components: list[str] | None = None) -> Any:
        return _target(self.target).config(precision=self.precision, components=components, **self.options)

    @cached_property
    def tag(self) -> str:
        """The target's own part of the label: fp16, fp16-palettize4, int8-3a3b5af9."""
        return TORCH if self.is_torch else _target(self.target).variant_label(self.config())

    @cached_property
    def digest(self) -> str:
        """sha256 of the options ("" for the default variant): part of every stage key of the variant."""
        return "" if self.is_torch else _target(self.target).options_digest(self.config())

    @property
    def key(self) -> str:
        """'openvino-int8-3a3b5af9': manifest entry, report row, stage name suffix, placement label."""
        return TORCH if self.is_torch else f"{self.target}-{self.tag}"

    label = key

    @property
    def id(self) -> str:
        """'openvino:int8-3a3b5af9': how --only and the job matrix name a build."""
        return TORCH if self.is_torch else f"{self.target}:{self.tag}"

    @property
    def tolerance_row(self) -> str:
        """The row of validation.policy's table that judges this variant (the reference itself: fp32)."""
        return "fp32" if self.is_torch else _target(self.target).tolerance_row(self.config())

    def runtime_options(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The runner options the variant runs with: its runtime configuration (from the target), then
        the options given explicitly (e.g. --option hint=bf16)."""
        own = {} if self.is_torch else _target(self.target).runtime_options(self.config())
        return {**own, **(overrides or {})}

    def folder(self, out: Path) -> Path:
        return _target(self.target).output_dir(out, self.config())

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "precision": self.precision, "options": self.options, "key": self.key}

    def __str__(self) -> str:
        return self.key


def _target(name: str):
    from targets.base import get_target

    return get_target(name)


def parse(text: str, out: Path | None = None) -> Variant:
    """'torch', 'openvino', 'openvino:int8', 'openvino-int8', or (with `out`) the key or id of a variant
    built there, such as 'openvino-int8-3a3b5af9' or 'coreml:fp16-palettize4'."""
    from targets.base import REGISTRY

    text = text.strip()
    if out is not None:
        for v in built(out):
            if text in (v.key, v.id):
                return v
    target, _, precision = text.partition(":") if ":" in text else text.partition("-")
    if target != TORCH and target not in REGISTRY:
        raise UsageError(f"unknown target '{target}' in '{text}'", f"choose from {TORCH}, {', '.join(REGISTRY)}")
    if target == TORCH and precision not in ("", "fp32"):
        raise UsageError(f"'{text}': the PyTorch reference runs in fp32 only", "write 'torch'")
    return Variant.of(target, precision or None)


def built(out: Path) -> list[Variant]:
    """Variants built in the folder (per its manifest) whose folders exist, the exported ONNX tree first."""
    from diffprism import manifest
    from exporters.export import ONNX_DIR

    found = [Variant.of("onnxruntime", "fp32")] if (out / ONNX_DIR).is_dir() else []
    data = manifest.load(out) or {}
    for key, entry in sorted((data.get("targets") or {}).items()):
        variant = from_entry(key, entry)
        if variant is not None and variant not in found and variant.folder(out).is_dir():
            found.append(variant)
    return found


def from_entry(key: str, entry: Mapping[str, Any]) -> Variant | None:
    """The variant a manifest "targets" entry records (entries name target and config)."""
    target = entry.get("target") or key.split("-", 1)[0]
    config = dict(entry.get("config") or {})
    try:
        return Variant.of(target, config.pop("precision", None), config)
    except UsageError:
        log.warning("manifest entry %s names no variant this build of diffprism knows", key)
        return None


def resolve(out: Path, wanted: Variant) -> Variant:
    """The built variant `wanted` means in this folder.

    `wanted` itself if it is built; else the one built variant of the same target and precision
    whose options include all of `wanted`'s (so `--precision int8` finds the int8 built with
    options); several such are ambiguous and the error lists their keys.
    """
    if wanted.is_torch or wanted.folder(out).is_dir():
        return wanted
    asked = wanted.options.items()
    same = [v for v in built(out) if v.target == wanted.target and v.precision == wanted.precision
            and asked <= v.options.items()]
    if len(same) == 1:
        log.info("%s is not built here; using %s", wanted.key, same[0].key)
        return same[0]
    if same:
        raise UsageError(f"{out} holds several {wanted.target} {wanted.precision} variants: "
                         f"{', '.join(v.key for v in same)}", "name one with its options (--option KEY=VALUE)")
    return wanted


def require_built(out: Path, variant: Variant) -> Path:
    folder = variant.folder(out)
    if not folder.is_dir():
        raise SourceError(f"no {variant.key} artifacts at {folder}",
                          f"run 'diffprism compile {out} --target {variant.target} --precision {variant.precision}"
                          + "".join(f" --option {k}={json.dumps(v)}" for k, v in variant.options.items()) + "' first")
    return folder


def unique(variants: Iterable[Variant]) -> list[Variant]:
    seen: list[Variant] = []
    for v in variants:
        if v not in seen:
            seen.append(v)
    return seen
