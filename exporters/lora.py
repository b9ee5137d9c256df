"""LoRA adapters as inputs of an export: parse, digest, load (safetensors only) and fuse.

An adapter is a safetensors file in a format diffusers' LoRA loaders read (diffusers/PEFT keys,
kohya's `lora_unet_*`/`lora_te_*` keys, ...) and a scale. Fusing adds scale·B·A (times the
adapter's alpha/rank) to each adapted weight, through diffusers (`load_lora_weights`, `fuse_lora`,
`unload_lora_weights`), one adapter after the other in the order given, so the pipeline that is
traced is a plain pipeline again and its PyTorch references come from the same fused weights.

The manifest records each adapter as {"path", "sha256", "scale"}; the sha256 is part of the
export's source record, so content keys change with the adapters.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from exporters.errors import SourceError, UsageError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Adapter:
    path: Path
    scale: float
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "scale": self.scale}


def parse(text: str) -> tuple[Path, float]:
    """'FILE[:SCALE]' -> (path, scale); the scale defaults to 1.0."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a ':' that is part of the path
    return Path(path).expanduser(), scale


def adapter(path: Path, scale: float = 1.0) -> Adapter:
    """Check the file (safetensors only: pickles can run code) and digest it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceError(f"LoRA file {path} does not exist", "pass --lora FILE[:SCALE] with a .safetensors file")
    if path.suffix != SUFFIX:
        raise SourceError(f"LoRA file {path} is not safetensors; other formats can run code when loaded",
                          "convert the adapter to .safetensors")
    if not (scale == scale and abs(scale) != float("inf")):
        raise UsageError(f"LoRA scale {scale} of {path} is not a finite number",
                         "pass FILE:SCALE, e.g. lora.safetensors:0.8")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return Adapter(path.resolve(), float(scale), h.hexdigest())


def from_specs(specs: Iterable[str] | None) -> list[Adapter]:
    """The --lora arguments as checked adapters."""
    return [adapter(*parse(s)) for s in specs or ()]


def from_record(records: Iterable[Mapping[str, Any]] | None) -> list[Adapter]:
    """Adapters a manifest recorded; each file must still have the recorded sha256."""
    out = []
    for r in records or ():
        a = adapter(Path(r["path"]), float(r["scale"]))
        if a.sha256 != r["sha256"]:
            raise SourceError(f"LoRA file {a.path} changed since the export (sha256 {a.sha256[:12]}, "
                              f"recorded {str(r['sha256'])[:12]})", "restore the adapter file, or export again with it")
        out.append(a)
    return out


def _state_dict(a: Adapter) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(a.path))
    except Exception as exc:
        raise SourceError(f"cannot read LoRA file {a.path}: {exc}", "re-save the adapter as safetensors") from None


Touched = dict[str, set[str]]  # pipeline attribute -> names of the parameters an adapter adapts


def fuse(pipe: Any, adapters: Iterable[Adapter]) -> Touched:
    """Fuse the adapters into the pipeline's weights in place (in order); returns what they touched."""
    touched: Touched = {}
    for i, a in enumerate(adapters):
        name = f"diffprism_{i}"
        _load(pipe, a, name, touched)
        pipe.fuse_lora(lora_scale=a.scale, adapter_names=[name])
        pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay
        log.info("fused LoRA %s (scale %g, sha256 %s)", a.path.name, a.scale, a.sha256[:12])
    return touched


def touched(pipe: Any, adapters: Iterable[Adapter]) -> Touched:
    """The parameters the adapters would adapt, without changing the pipeline's weights."""
    found: Touched = {}
    for i, a in enumerate(adapters):
        _load(pipe, a, f"diffprism_probe_{i}", found)
        pipe.unload_lora_weights()
    return found


def _load(pipe: Any, a: Adapter, name: str, touched: Touched) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    _check_storage(pipe)
    try:
        pipe.load_lora_weights(_state_dict(a), adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise SourceError(f"LoRA file {a.path} does not fit this pipeline ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})",
                          "use an adapter trained for this model (same architecture and layer names)") from None
    for part, module in pipe.components.items():
        if not hasattr(module, "named_modules"):
            continue
        for path, sub in module.named_modules():
            if isinstance(sub, BaseTunerLayer) and name in getattr(sub, "active_adapters", [name]):
                names = touched.setdefault(part, set())
                names.update(f"{path}.{p}" for p in ("weight", "bias"))


def _check_storage(pipe: Any) -> None:
    from exporters.streaming import has_no_storage

    for module in pipe.components.values():
        if hasattr(module, "parameters") and next(module.parameters(), None) is not None and has_no_storage(module):
            raise UsageError("LoRA needs the weights in memory; this pipeline was loaded without them",
                             "load the source with its weights (export --no-streaming)")


def record(adapters: Iterable[Adapter]) -> list[dict[str, Any]]:
    return [a.to_json() for a in adapters]


def kohya_keys(state_dict: Mapping[str, Any], alpha: float | None = None) -> dict[str, Any]:
    """A diffusers/PEFT UNet LoRA state dict in kohya's layout (lora_unet_<path>.lora_down/lora_up/alpha).

    Used to write kohya-format files (tests, conversions); diffusers reads them back through its
    non-diffusers converters.
    """
    import torch

    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix != "unet" or ".lora_A." not in rest and ".lora_B." not in rest:
            raise UsageError(f"key '{key}' is not a diffusers UNet LoRA key", "pass unet.*.lora_A/B.weight keys")
        module, kind = (rest.split(".lora_A.") + [""])[0], "lora_down"
        if ".lora_B." in rest:
            module, kind = rest.split(".lora_B.")[0], "lora_up"
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.{kind}.weight"] = value
        if kind == "lora_down":
            out[f"{base}.alpha"] = torch.tensor(float(alpha if alpha is not None else value.shape[0]))
    return out
