"""The control image a ControlNet pipeline is conditioned on: a PNG the user names, or a drawn default.

The default is deterministic (white shape outlines on black, like an edge map, scaled to the
request's size), so end-to-end checks and references of a ControlNet pipeline need no file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from exporters.errors import UsageError


def default_control_image(height: int, width: int) -> np.ndarray:
    """HWC uint8: a rectangle outline and a ring, edge-map style, at the given size."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / max(1, height - 1), x / max(1, width - 1)
    line = 0.06  # stroke width as a fraction of the side: at least a pixel at 16 px
    box = (np.abs(x - 0.3) < 0.2 + line / 2) & (np.abs(y - 0.35) < 0.25 + line / 2)
    inner = (np.abs(x - 0.3) < 0.2 - line / 2) & (np.abs(y - 0.35) < 0.25 - line / 2)
    radius = np.hypot(x - 0.68, y - 0.68)
    ring = np.abs(radius - 0.2) < line / 2
    mask = (box & ~inner) | ring
    return np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)


def load_control_image(path: str | None, height: int, width: int):
    """The PIL RGB image the pipeline takes: the PNG at `path` (resized by the pipeline), or the default."""
    from PIL import Image

    if path is None:
        return Image.fromarray(default_control_image(height, width))
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"control image {file} does not exist", "pass the path of a PNG with --control-image")
    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise UsageError(f"control image {file} is not an image ({exc})", "pass a PNG with --control-image") from None


def control_digest(path: str | None) -> str | None:
    """sha256 of a control image file (references are keyed by its content, not its name)."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def control_options(pipe, path: str | None, height: int, width: int) -> dict:
    """The pipeline call's control image argument: {"image": ...} for a ControlNet pipeline (one whose
    call takes controlnet_conditioning_scale), {} otherwise (an error if a control image was asked for)."""
    import inspect

    if "controlnet_conditioning_scale" in inspect.signature(type(pipe).__call__).parameters:
        return {"image": load_control_image(path, height, width)}
    if path is not None:
        raise UsageError("a control image is given but the pipeline has no ControlNet", "leave --control-image off")
    return {}
