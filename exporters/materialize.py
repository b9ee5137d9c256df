"""Write a meta-device model as sharded safetensors, one seeded random tensor at a time.

Full-size DiT pipelines (Flux.1-dev: 12B transformer + 4.7B T5) cannot be held in memory, so a
random-weight preset is built on the meta device and saved tensor by tensor: each parameter is
drawn, written and freed before the next one exists. The layout is the libraries' own
(diffusers `diffusion_pytorch_model-0000k-of-0000n.safetensors` + `.index.json`, transformers
`model-...`), so the folder loads like any saved pipeline.

Values: a parameter is drawn from a torch.Generator seeded with sha256(seed, component, name),
so a tensor's values depend on nothing else (not on sharding, order or the other tensors).
Distribution (the modules' own inits would need the tensors in memory, so a documented simple one):
weights with >= 2 dims ~ normal * 1/sqrt(fan_in) (fan_in = product of all dims but the first);
1-d `weight` (norm scales) = 1; 1-d `bias` = 0; any other parameter ~ normal * 0.02.
Persistent buffers (SD3's sin-cos position table) keep the values the module computed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' and diffusers' customary 5 GB shards

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8"}


@dataclass(frozen=True)
class Layout:
    """File names a library uses: `<stem>.safetensors`, or shards `<stem>-0000k-of-0000n` + index."""

    stem: str  # diffusion_pytorch_model (diffusers) | model (transformers)

    def file(self, k: int, n: int) -> str:
        return f"{self.stem}.safetensors" if n == 1 else f"{self.stem}-{k:05d}-of-{n:05d}.safetensors"

    @property
    def index(self) -> str:
        return f"{self.stem}.safetensors.index.json"


DIFFUSERS = Layout("diffusion_pytorch_model")
TRANSFORMERS = Layout("model")


@dataclass
class WriteStats:
    """What the writer held: `peak_live_bytes` is the most tensor bytes alive at once."""

    tensors: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    peak_live_bytes: int = 0
    largest_tensor_bytes: int = 0
    live_bytes: int = 0

    def track(self, tensor: torch.Tensor, nbytes: int) -> None:
        """Count `tensor` as alive until it is garbage: a tensor kept by mistake raises the peak."""
        self.live_bytes += nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        self.largest_tensor_bytes = max(self.largest_tensor_bytes, nbytes)
        weakref.finalize(tensor, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def tensor_seed(seed: int, component: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{component}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, name: str, seed: int, component: str) -> torch.Tensor:
    """The seeded value of one parameter (see the module docstring for the distribution)."""
    if len(shape) == 1 and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    if len(shape) == 1 and name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(tensor_seed(seed, component, name))
    std = 1.0 / math.sqrt(max(1, math.prod(shape[1:]))) if len(shape) >= 2 else 0.02
    # Drawn in the stored dtype, so the writer never holds a wider copy of the tensor.
    return torch.randn(shape, generator=g, dtype=dtype).mul_(std)


def _entries(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """State-dict entries, a tied tensor once under its first name (as save_pretrained keeps it)."""
    seen: set[int] = set()
    out = []
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def write_module(module: nn.Module, directory: Path, layout: Layout, *, seed: int, component: str,
                 dtype: torch.dtype = torch.bfloat16, shard_bytes: int = DEFAULT_SHARD_BYTES) -> WriteStats:
    """Write module's weights into directory in `layout`, drawing each meta tensor as it is written.

    Floating tensors are stored in `dtype`; real (non-meta) tensors keep their values. Shards are
    planned from shapes alone, so each file's header is written before its first tensor.
    """
    directory.mkdir(parents=True, exist_ok=True)
    plan = []  # (name, tensor, stored dtype, nbytes)
    for name, t in _entries(module):
        stored = dtype if t.is_floating_point() else t.dtype
        plan.append((name, t, stored, t.numel() * torch.empty((), dtype=stored).element_size()))
    shards: list[list[tuple]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[3] > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[3]
    stats = WriteStats()
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = layout.file(k, len(shards))
        _write_shard(directory / fname, shard, seed, component, stats)
        weight_map.update({name: fname for name, *_ in shard})
        stats.files.append(fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": stats.bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / layout.index).write_text(json.dumps(index, indent=2) + "\n")
    log.info("%s: %d tensors, %.2f GB in %d file(s)", component, stats.tensors, stats.bytes / 1e9, len(shards))
    return stats


def _write_shard(path: Path, shard: list[tuple], seed: int, component: str, stats: WriteStats) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t, stored, nbytes in shard:
        header[name] = {"dtype": _ST_DTYPE[stored], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t, stored, nbytes in shard:
            if t.is_meta:
                value = random_tensor(tuple(t.shape), stored, name, seed, component)
            else:
                value = t.detach().to(stored, copy=True).contiguous()
            stats.track(value, nbytes)
            f.write(value.reshape(-1).view(torch.uint8).numpy().data)  # a view: no second copy
            stats.tensors += 1
            stats.bytes += nbytes
            del value
    partial.rename(path)
