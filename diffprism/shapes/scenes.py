"""Seeded scenes of one coloured shape on a plain background, with their captions.

The vocabulary is small and fixed so that a tiny model trained for minutes can learn it,
and so that check.py can measure every attribute of a picture directly.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

SIZE = 32  # pixels, square: what tiny-shapes draws

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (245, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Shape centres as fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
_SUPERSAMPLE = 4  # drawn larger, then box-filtered down: smooth edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background, {self.position}"

    @classmethod
    def parse(cls, caption: str) -> "Scene":
        """The inverse of caption; raises ValueError for text outside the vocabulary."""
        words = caption.strip().split(" ", 5)
        if len(words) != 6 or words[0] != "a" or words[3] != "on" or words[4] != "a":
            raise ValueError(f"not a tiny-shapes caption: {caption!r}")
        background, _, position = words[5].partition(" background, ")
        scene = cls(shape=words[2], colour=words[1], background=background, position=position)
        if scene not in set(all_scenes()):
            raise ValueError(f"not a tiny-shapes caption: {caption!r}")
        return scene


def all_scenes() -> list[Scene]:
    return [Scene(s, c, b, p) for s, c, b, p in itertools.product(SHAPES, COLOURS, COLOURS, POSITIONS) if c != b]


def split(seed: int = 0, held_out: float = 0.1) -> tuple[list[Scene], list[Scene]]:
    """(train, held-out) scenes: held-out combinations are never seen in training."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    n = max(1, round(len(scenes) * held_out))
    return sorted(scenes[n:], key=_key), sorted(scenes[:n], key=_key)


def _key(s: Scene):
    return (s.shape, s.colour, s.background, s.position)


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """HxWx3 uint8. Size and exact centre vary a little per draw (seeded by rng)."""
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    half = rng.uniform(0.15, 0.21) * big  # half the side of the shape's bounding box
    cx = fx * big + rng.uniform(-0.04, 0.04) * big
    cy = fy * big + rng.uniform(-0.04, 0.04) * big
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


def dataset(scenes: list[Scene], n: int, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, list[Scene]]:
    """n images (N x H x W x 3 uint8) drawn from scenes uniformly, seeded."""
    rng = np.random.default_rng(seed)
    picks = [scenes[i] for i in rng.integers(0, len(scenes), n)]
    return np.stack([render(s, rng, size) for s in picks]), picks
