"""Magnitude pruning of Conv2d/Linear weights: unstructured (masks) and structured (fewer channels).

Unstructured pruning uses torch.nn.utils.prune (L1, global or per layer); the masks stay
during distillation, so fine-tuning cannot revive pruned weights, and `make_permanent`
folds them in before export. Structured pruning removes whole channels where the
dependency is local and exact (see `prune_structured`), so the model gets smaller.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from exporters.errors import UsageError

log = logging.getLogger(__name__)

PRUNABLE = (nn.Conv2d, nn.Linear)
SCOPES = ("global", "layer")


def weight_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, PRUNABLE)]


def prune_unstructured(module: nn.Module, sparsity: float, scope: str = "global") -> int:
    """Mask the smallest-|w| fraction `sparsity` of Conv/Linear weights; returns the layer count."""
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity {sparsity} is outside [0, 1)", "pass a fraction such as sparsity=0.5")
    if scope not in SCOPES:
        raise UsageError(f"unknown pruning scope '{scope}'", f"choose from {', '.join(SCOPES)}")
    params = [(m, "weight") for _, m in weight_layers(module)]
    if scope == "global":  # one threshold over all layers: small layers may lose more or less than `sparsity`
        threshold = _global_threshold([m.weight for m, _ in params], sparsity)
        for m, name in params:
            _BoolMask.apply(m, name, m.weight.detach().abs() > threshold)
    else:
        for m, name in params:
            prune.l1_unstructured(m, name, amount=sparsity)
    return len(params)


class _BoolMask(prune.CustomFromMask):
    """A given mask kept as bool: a quarter of the float mask torch stores (0.9 GB, not 3.4, for SD 1.5)."""

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return self.mask & default_mask.bool()


def _global_threshold(weights: list[torch.Tensor], sparsity: float) -> float:
    """The magnitude at or below which `sparsity` of all the weights lie (-1 for none).

    An in-place partition of one copy of the magnitudes: torch's global_unstructured (top-k)
    and kthvalue both add an int64 index per weight, which exhausted 24 GB on an SD 1.5 UNet.
    """
    total = sum(w.numel() for w in weights)
    k = int(round(sparsity * total))
    if k == 0:
        return -1.0
    flat = torch.cat([w.detach().abs().flatten() for w in weights]).numpy()
    flat.partition(k - 1)
    return float(flat[k - 1])


def make_permanent(module: nn.Module) -> None:
    """Fold masks into the weights (prune.remove) so export sees plain parameters with zeros."""
    for _, m in weight_layers(module):
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")


def sparsity_report(module: nn.Module) -> dict[str, Any]:
    """Measured on the weights themselves: overall fraction of zeros and the per-layer spread."""
    zeros = total = 0
    per_layer = []
    for _, m in weight_layers(module):
        w = m.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_layer.append(z / max(w.numel(), 1))
    return {
        "sparsity": round(zeros / max(total, 1), 6),
        "zero_weights": zeros,
        "prunable_weights": total,
        "layers": len(per_layer),
        "layer_sparsity_min": round(min(per_layer, default=0.0), 6),
        "layer_sparsity_max": round(max(per_layer, default=0.0), 6),
    }


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- structured ----------------------------------------------------------------------------


def _keep(scores: torch.Tensor, ratio: float, unit: int = 1) -> torch.Tensor:
    """Sorted indices of the units (blocks of `unit` channels) with the largest scores; at least one kept."""
    units = scores.numel() // unit
    per_unit = scores.reshape(units, unit).sum(1)
    n_keep = max(1, units - int(units * ratio))
    best = torch.topk(per_unit, n_keep).indices.sort().values
    return (best[:, None] * unit + torch.arange(unit)).reshape(-1)


def _slice_out(layer: nn.Module, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[idx].clone())
    if getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[idx].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(idx)
    else:
        layer.out_channels = len(idx)


def _slice_in(layer: nn.Module, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[:, idx].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = len(idx)
    else:
        layer.in_channels = len(idx)


def _prune_resnet(block: nn.Module, ratio: float) -> bool:
    """Inner channels of a ResnetBlock2D (conv1 -> norm2 -> conv2), removed a whole GroupNorm group at a time.

    Dropping whole groups keeps every remaining group's statistics exactly as before, so
    GroupNorm stays valid (channels divisible by groups) with fewer groups.
    """
    norm = block.norm2
    per_group = norm.num_channels // norm.num_groups
    scores = block.conv1.weight.detach().abs().flatten(1).sum(1) + block.conv2.weight.detach().abs().sum((0, 2, 3))
    idx = _keep(scores, ratio, per_group)
    temb = getattr(block, "time_emb_proj", None)
    if len(idx) == norm.num_channels or (temb is not None and temb.out_features != norm.num_channels):
        return False  # nothing to remove, or scale-shift time embedding (2x channels): left alone
    _keep_resnet(block, idx)
    return True


def _keep_resnet(block: nn.Module, idx: torch.Tensor) -> None:
    norm = block.norm2
    per_group = norm.num_channels // norm.num_groups
    _slice_out(block.conv1, idx)
    temb = getattr(block, "time_emb_proj", None)
    if temb is not None:
        _slice_out(temb, idx)
    norm.weight = nn.Parameter(norm.weight.detach()[idx].clone())
    norm.bias = nn.Parameter(norm.bias.detach()[idx].clone())
    norm.num_channels, norm.num_groups = len(idx), len(idx) // per_group
    _slice_in(block.conv2, idx)


def _prune_geglu_ff(ff: nn.Module, ratio: float) -> bool:
    """Hidden units of a GEGLU feed-forward: rows i and i+H of proj (value and gate) go together."""
    proj, out = ff.net[0].proj, ff.net[2]
    hidden = out.in_features
    w = proj.weight.detach()
    scores = w[:hidden].abs().sum(1) + w[hidden:].abs().sum(1) + out.weight.detach().abs().sum(0)
    idx = _keep(scores, ratio)
    if len(idx) == hidden:
        return False
    _keep_ff(ff, idx)
    return True


def _keep_ff(ff: nn.Module, idx: torch.Tensor) -> None:
    proj, out = ff.net[0].proj, ff.net[2]
    _slice_out(proj, torch.cat([idx, idx + out.in_features]))
    _slice_in(out, idx)


def _prune_heads(attn: nn.Module, ratio: float) -> bool:
    """Whole heads of an attention block: their rows of to_q/to_k/to_v and columns of to_out[0].

    Softmax runs per head, so the remaining heads compute exactly what they did; diffusers'
    processors derive the head size from `heads` and the projection width.
    """
    q, k, v, out = attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]
    heads = attn.heads
    width = q.out_features
    if (k.out_features != width or v.out_features != width or width % heads or heads < 2
            or getattr(attn, "norm_q", None) is not None or getattr(attn, "add_k_proj", None) is not None):
        return False  # grouped kv, per-head norms or extra projections: left alone
    head_dim = width // heads
    scores = sum(layer.weight.detach().abs().sum(1) for layer in (q, k, v)) + out.weight.detach().abs().sum(0)
    idx = _keep(scores, ratio, head_dim)
    if len(idx) == width:
        return False
    _keep_heads(attn, idx, head_dim)
    return True


def _keep_heads(attn: nn.Module, idx: torch.Tensor, head_dim: int) -> None:
    for layer in (attn.to_q, attn.to_k, attn.to_v):
        _slice_out(layer, idx)
    _slice_in(attn.to_out[0], idx)
    attn.heads = attn.sliceable_head_dim = len(idx) // head_dim
    attn.inner_dim = attn.inner_kv_dim = len(idx)


def _structured_blocks(module: nn.Module):
    """(name, kind, block) of every block structured pruning works on."""
    for name, m in list(module.named_modules()):
        kind = type(m).__name__
        if kind == "ResnetBlock2D" and isinstance(getattr(m, "norm2", None), nn.GroupNorm):
            yield name, "resnet", m
        elif kind == "FeedForward" and type(m.net[0]).__name__ == "GEGLU":
            yield name, "feed_forward", m
        elif kind == "Attention" and hasattr(m, "to_q") and isinstance(getattr(m, "to_out", None), nn.ModuleList):
            yield name, "attention", m


def shrink_to(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Give a freshly built module the widths of a structurally pruned copy, read from the copy's
    weight shapes (state-dict key -> shape), so the copy's weights load into it. Returns the
    number of blocks narrowed. Which channels are kept does not matter: the weights replace them."""
    narrowed = 0
    for name, kind, m in _structured_blocks(module):
        p = f"{name}." if name else ""
        if kind == "resnet" and shapes[p + "conv1.weight"][0] != m.conv1.out_channels:
            _keep_resnet(m, torch.arange(shapes[p + "conv1.weight"][0]))
        elif kind == "feed_forward" and shapes[p + "net.2.weight"][1] != m.net[2].in_features:
            _keep_ff(m, torch.arange(shapes[p + "net.2.weight"][1]))
        elif kind == "attention" and shapes[p + "to_q.weight"][0] != m.to_q.out_features:
            _keep_heads(m, torch.arange(shapes[p + "to_q.weight"][0]), m.to_q.out_features // m.heads)
        else:
            continue
        narrowed += 1
    return narrowed


def prune_structured(module: nn.Module, ratio: float) -> dict[str, int]:
    """Remove `ratio` of the inner channels of ResNet blocks and transformer feed-forwards, and
    `ratio` of the heads of every attention block.

    Only channels that no other layer reads are removed (inside a block), so block
    interfaces and skip connections are untouched and the model keeps its inputs and outputs.
    """
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"sparsity {ratio} is outside [0, 1)", "pass a fraction such as sparsity=0.5")
    counts = {"resnet_blocks": 0, "feed_forwards": 0, "attention_blocks": 0}
    prune_block = {"resnet": ("resnet_blocks", _prune_resnet), "feed_forward": ("feed_forwards", _prune_geglu_ff),
                   "attention": ("attention_blocks", _prune_heads)}
    for _, kind, m in _structured_blocks(module):
        key, fn = prune_block[kind]
        counts[key] += fn(m, ratio)
    if not any(counts.values()):
        raise UsageError(f"structured pruning found nothing to prune in {type(module).__name__}",
                         "use structured=false (unstructured pruning works on any Conv/Linear model)")
    return counts
