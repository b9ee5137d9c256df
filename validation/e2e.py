"""Image-level validation: the same prompt, seed and initial latents through PyTorch and a runner pipeline.

A component can pass its own tolerance and still drift over a denoising loop; this
check compares what users see: the final latents (relative L2) and the decoded image
(PSNR and SSIM from scikit-image). Bounds are per precision and documented in
README.md ("Validation tolerances").
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from exporters.errors import DiffprismError, UsageError
from exporters.geometry import Geometry
from runtimes.pipeline import Generation, Request, generate, initial_latents
from validation.metrics import rel_l2
from validation.policy import IMAGE, ImageTolerance, loosest  # noqa: F401  (loosest: re-exported)

log = logging.getLogger(__name__)

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red cube on a blue table, studio light",
    "a watercolor painting of a harbour at sunset",
)

STEPS = 10  # denoising steps per image unless asked otherwise ('validate --e2e-steps', a recipe's [validation] steps)

# Image bounds are rows of the one tolerance table (validation.policy).
TOLERANCES = IMAGE


def image_metrics(reference: Generation, candidate: Generation) -> dict[str, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, out = reference.image.astype(np.float64), candidate.image.astype(np.float64)
    if ref.shape != out.shape:
        raise UsageError(f"image shapes differ: {out.shape} vs reference {ref.shape}", "generate at the same size")
    finite = bool(np.all(np.isfinite(out)))
    if finite and np.array_equal(ref, out):
        psnr = math.inf
    else:
        psnr = float(peak_signal_noise_ratio(ref, np.nan_to_num(out), data_range=1.0)) if finite else -math.inf
    ssim = float(structural_similarity(ref, np.nan_to_num(out), channel_axis=-1, data_range=1.0)) if finite else -1.0
    return {"latent_rel_l2": rel_l2(reference.latents, candidate.latents), "psnr": psnr, "ssim": ssim}


@dataclass
class ImageCheck:
    request: Request
    metrics: dict[str, float]
    violations: list[str]
    seconds: float
    image: str = ""  # path of the candidate PNG, relative to the output folder (set by the caller)
    screenshot: str = ""  # a screenshot of the page that drew it (pipeline targets such as web)
    timings: dict[str, Any] = field(default_factory=dict)  # what the runtime reported (ms per stage)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        data = {"request": self.request.to_json(), "metrics": self.metrics, "violations": self.violations,
                "passed": self.passed, "seconds": round(self.seconds, 3), "image": self.image}
        if self.screenshot:
            data["screenshot"] = self.screenshot
        if self.timings:
            data["timings"] = self.timings
        return data


@dataclass
class E2EResult:
    label: str  # e.g. "openvino-int8" or "unet=openvino-int8,text_encoder=torch,..."
    precision: str  # the precision whose bounds applied
    placements: dict[str, str]  # component -> "target-precision"
    tolerance: ImageTolerance
    checks: list[ImageCheck] = field(default_factory=list)
    error: str | None = None
    runner: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "precision": self.precision, "placements": self.placements,
                "tolerance": self.tolerance.to_json(), "passed": self.passed, "error": self.error,
                "runner": self.runner, "checks": [c.to_json() for c in self.checks]}


def requests_for(prompts: Sequence[str], *, size: tuple[int, int], steps: int, seed: int = 0,
                 guidance_scale: float = 7.5, negative_prompt: str | None = None,
                 control_image: str | None = None) -> list[Request]:
    """One request per prompt, each with its own seed (seed, seed + 1, ...)."""
    return [Request(p, negative_prompt, seed + i, steps, size[0], size[1], guidance_scale, control_image=control_image)
            for i, p in enumerate(prompts)]


def check_pipeline(reference: Sequence[Generation], pipe: Any, requests: Sequence[Request], *, geometry: Geometry,
                   label: str, precision: str, placements: dict[str, str],
                   on_image: Callable[[int, Generation], str] | None = None) -> tuple[E2EResult, list[Generation]]:
    """Generate each request with `pipe` from the reference's initial latents and judge it against the reference.

    A runtime crash is a failed result with its error recorded, not a traceback.
    """
    result = E2EResult(label, precision, placements, TOLERANCES[precision])
    generations: list[Generation] = []
    for i, (request, ref) in enumerate(zip(requests, reference)):
        try:
            gen = generate(pipe, request, initial_latents(geometry, request))
        except DiffprismError:
            raise
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            log.warning("end-to-end run of %s failed: %s", label, result.error)
            break
        metrics = image_metrics(ref, gen)
        check = ImageCheck(request, metrics, result.tolerance.violations(metrics), gen.seconds)
        if on_image:
            check.image = on_image(i, gen)
        result.checks.append(check)
        generations.append(gen)
        log.info("%s prompt %d: %s", label, i, metrics)
    return result, generations
