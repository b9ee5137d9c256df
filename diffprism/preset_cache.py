"""Full-size random presets as folder sources: built on the meta device, written once, then streamed.

A full-size DiT pipeline (flux-random: ~34 GB of bf16 weights) cannot be held, so such a preset is
materialised into a content-addressed folder, `<cache>/<preset>-<digest>` (digest: sha256 of the
preset name, seed, dtype, every model's config and the writer's format version), written through
`.staging-*` and renamed when complete. Loading it is loading a diffusers folder on the meta device
(exporters.streaming.empty_pipeline), so every later step streams its weights from the shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from exporters import materialize, memory
from diffprism.lock import folder_lock
from exporters.files import clean_staging, staged_dir

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the writer's values or layout change
ENV_CACHE = "DIFFPRISM_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "diffprism") / "presets"


def empty_build(build: Callable[[int], Any], seed: int):
    """The pipeline `build` makes, with every model's parameters on the meta device."""
    from accelerate import init_empty_weights

    from exporters.streaming import _tie

    with init_empty_weights(include_buffers=False):
        pipe = build(seed)
    for module in _models(pipe).values():
        _tie(module)
    return pipe


def _models(pipe) -> dict[str, nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}


def _config_of(module: nn.Module) -> dict:
    """The model's architecture settings. Library bookkeeping (keys starting with '_') is left out:
    diffusers' `_use_default_values` is a set saved as a list, in an order that changes with the
    process's hash seed, and would give the same weights a new folder in every process."""
    config = module.config
    items = dict(config) if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in items.items() if not k.startswith("_")}


def digest(name: str, seed: int, dtype: torch.dtype, pipe) -> str:
    configs = {part: _config_of(m) for part, m in sorted(_models(pipe).items())}
    blob = json.dumps({"preset": name, "seed": seed, "dtype": str(dtype), "format": FORMAT, "configs": configs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_random_pipeline(pipe, folder: Path, *, seed: int, dtype: torch.dtype = torch.bfloat16,
                         shard_bytes: int = materialize.DEFAULT_SHARD_BYTES,
                         memory_budget: str | int | None = None) -> dict[str, materialize.WriteStats]:
    """Write a meta-device pipeline as a diffusers folder with seeded random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    models = _models(pipe)
    largest = max((p.numel() * torch.empty((), dtype=dtype).element_size()
                   for m in models.values() for p in m.parameters()), default=0)
    memory.check("materialise", largest, override=memory_budget,
                 fix="raise --memory-budget, or materialise on a machine with more memory")
    stats = {}
    for part, component in pipe.components.items():
        if component is None:
            continue
        target = folder / part
        if part in models:
            module = models[part]
            if hasattr(module, "save_config"):  # diffusers ModelMixin
                module.save_config(target)
                layout = materialize.DIFFUSERS
            else:  # transformers PreTrainedModel
                module.config.save_pretrained(target)
                layout = materialize.TRANSFORMERS
            stats[part] = materialize.write_module(module, target, layout, seed=seed, component=part, dtype=dtype,
                                                   shard_bytes=shard_bytes)
        elif hasattr(component, "save_pretrained"):  # scheduler, tokenizers
            component.save_pretrained(target)
    pipe.save_config(folder)  # model_index.json
    return stats


def materialised(name: str, build: Callable[[int], Any], seed: int, *, dtype: torch.dtype = torch.bfloat16,
                 root: Path | None = None, memory_budget: str | int | None = None) -> Path:
    """The cache folder of preset `name` at `seed`, written first if it does not exist yet."""
    pipe = empty_build(build, seed)
    root = root or cache_root()
    folder = root / f"{name}-{digest(name, seed, dtype, pipe)}"
    if (folder / "model_index.json").is_file():
        return folder
    total = sum(p.numel() for m in _models(pipe).values() for p in m.parameters())
    need = total * torch.empty((), dtype=dtype).element_size()
    free = shutil.disk_usage(root if root.exists() else root.parent if root.parent.exists() else Path.home()).free
    if need > free:
        from exporters.errors import OutputError

        raise OutputError(f"materialising {name} needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB are free "
                          f"under {root}", f"free space there or point {ENV_CACHE} at a larger disk")
    log.info("materialising %s (seed %d, %.1f GB of %s weights) into %s", name, seed, need / 1e9, dtype, folder)
    with folder_lock(root):  # one writer per cache; a killed one leaves only .staging, removed here
        if (folder / "model_index.json").is_file():
            return folder
        clean_staging(root)
        with staged_dir(folder) as staging:
            save_random_pipeline(pipe, staging, seed=seed, dtype=dtype, memory_budget=memory_budget)
    return folder
