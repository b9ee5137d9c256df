"""Prompt match by direct measurement: background and shape colour, shape and position of an image.

Background: median of the border pixels. Shape: the largest region closer to its own
colour than to the background's. Its kind follows from how much of its bounding box it
fills (square ~1, circle ~pi/4) and, for the upward triangle, how much less of it lies in the
top half of that box than in the bottom half; its position is the nearest anchor to
its centroid. Colours snap to the nearest palette colour.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprism.shapes.scenes import COLOURS, POSITIONS, Scene

ATTRIBUTES = ("shape", "colour", "background", "position")
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_NAMES = list(COLOURS)
_MIN_AREA = 0.01  # of the image: less than this is no shape at all


@dataclass(frozen=True)
class Match:
    prompt: Scene
    seen: Scene | None  # None: no shape found
    fill: float = 0.0  # area / bounding-box area of the shape found

    @property
    def attributes(self) -> dict[str, bool]:
        return {a: self.seen is not None and getattr(self.seen, a) == getattr(self.prompt, a) for a in ATTRIBUTES}

    @property
    def ok(self) -> bool:
        return all(self.attributes.values())


def _nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(1)))]


def measure(image: np.ndarray) -> tuple[Scene | None, float]:
    """image: HxWx3, uint8 or float in [0, 1]. Returns (what it shows, fill ratio)."""
    from skimage.measure import label, regionprops

    img = np.asarray(image, dtype=np.float64)
    if img.max() <= 1.0:
        img = img * 255.0
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    far = np.sqrt(((img - bg) ** 2).sum(-1)) > 80
    if far.sum() < _MIN_AREA * h * w:
        return None, 0.0
    fg = np.median(img[far], axis=0)
    # Soft edges: a pixel belongs to the shape when it is past halfway from background to shape colour.
    d = fg - bg
    t = ((img - bg) @ d) / max(float(d @ d), 1e-6)
    regions = regionprops(label(t > 0.5))
    if not regions:
        return None, 0.0
    r = max(regions, key=lambda r: r.area)
    if r.area < _MIN_AREA * h * w:
        return None, 0.0
    fill = float(r.extent)
    rows = r.image.sum(1)
    half = len(rows) // 2
    top_vs_bottom = rows[:half].sum() / max(rows[len(rows) - half:].sum(), 1)  # triangle ~1/3, others ~1
    shape = "triangle" if top_vs_bottom < 0.6 else "square" if fill > 0.93 else "circle"
    cy, cx = r.centroid
    pos = min(POSITIONS, key=lambda p: (POSITIONS[p][0] * w - cx) ** 2 + (POSITIONS[p][1] * h - cy) ** 2)
    return Scene(shape, _nearest_colour(fg), _nearest_colour(bg), pos), fill


def match(prompt: str, image: np.ndarray) -> Match:
    seen, fill = measure(image)
    return Match(Scene.parse(prompt), seen, fill)


def rates(matches: list[Match]) -> dict[str, float]:
    """Fraction of images that match on each attribute and on all of them ("all")."""
    n = max(len(matches), 1)
    out = {a: sum(m.attributes[a] for m in matches) / n for a in ATTRIBUTES}
    out["all"] = sum(m.ok for m in matches) / n
    return out


def generate_matches(pipe, prompts: list[str], *, steps: int = 20, seed: int = 0, guidance_scale: float = 7.5,
                     size: int = 32, geometry=None) -> tuple[list[Match], list]:
    """One image per prompt (seed + i for prompt i) with any pipeline runtimes.pipeline drives, PyTorch
    or runner-backed; returns (matches, generations). `geometry` (exporters.geometry) sizes the initial
    latents: pass the tree's for a runner-backed pipeline; a PyTorch pipeline's is computed from it."""
    from exporters.families import family_of
    from exporters.geometry import compute
    from runtimes.pipeline import Request, generate, initial_latents

    geometry = geometry or compute(pipe, family_of(type(pipe).__name__))
    gens = []
    for i, p in enumerate(prompts):
        request = Request(p, None, seed + i, steps, size, size, guidance_scale)
        gens.append(generate(pipe, request, initial_latents(geometry, request)))
    return [match(p, g.image) for p, g in zip(prompts, gens)], gens
