"""Feeds for distillation: captured denoising inputs when they exist, else reference and generated ones."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from exporters import calibration, reference
from exporters.inputs import make_feed
from exporters.spec import ComponentSpec

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


def split_feeds(out: Path, spec: ComponentSpec, generated: int = 8) -> tuple[list[Feed], list[Feed], str]:
    """(train, held_out, source). Held-out feeds are never trained on.

    With a capture, every 4th captured feed is held out. Without one, the stored reference
    inputs (the validation points) are held out and training uses `generated` seeded feeds
    at the spec's opt shape: random, but disjoint from what the error is measured on.
    """
    folder = out / calibration.CALIBRATION_DIR
    if (folder / f"{spec.name}.npz").is_file():
        feeds = calibration.load_feeds(folder, spec.name)
        if len(feeds) >= 2:
            held_idx = set(range(3, len(feeds), 4)) or {len(feeds) - 1}
            held = [f for i, f in enumerate(feeds) if i in held_idx]
            train = [f for i, f in enumerate(feeds) if i not in held_idx]
            return train, held, "capture"
    ref = out / "reference" / f"{spec.name}.npz"
    held = [case["inputs"] for case in reference.load(ref).values()] if ref.is_file() else []
    train = [make_feed(spec, "opt", seed=10_000 + i) for i in range(generated)]
    if not held:  # no stored references either: hold out generated feeds of other seeds
        held = [make_feed(spec, "opt", seed=20_000 + i) for i in range(2)]
    return train, held, "reference"


def batches(feeds: Sequence[Feed], spec: ComponentSpec, size: int) -> list[tuple[torch.Tensor, ...]]:
    """Stack feeds of equal shapes into batches of at most `size` feeds, as positional torch inputs."""
    groups: dict[tuple, list[Feed]] = {}
    for feed in feeds:
        key = tuple(feed[n].shape for n in spec.input_names)
        groups.setdefault(key, []).append(feed)
    out = []
    for group in groups.values():
        for i in range(0, len(group), max(1, size)):
            chunk = group[i:i + max(1, size)]
            out.append(tuple(torch.from_numpy(np.concatenate([f[n] for f in chunk])) for n in spec.input_names))
    return out
