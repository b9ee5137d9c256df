"""Image-level validation of targets whose artifact is a whole pipeline (the web bundle): judged by what they draw.

The same requests and initial latents as the PyTorch reference (diffprism.e2e_jobs) go to the
target's pipeline runner (the page in headless Chromium); the image it returns is judged with
the image tolerances (validation.e2e) and recorded beside the other targets' images, with a
screenshot of the page and its timings.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from diffprism.e2e_jobs import IMAGES, _save_png, _slug, record_e2e, reference_generations
from diffprism.jobs import REPORT_DIR
from diffprism.placement import TORCH, Placement, Runners, resolve
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR
from exporters.files import write_bytes_atomic
from exporters.tree import read_geometry
from runtimes.browser import BrowserError
from runtimes.pipeline import Generation, Request, initial_latents
from targets.base import get_target
from validation.e2e import TOLERANCES, E2EResult, ImageCheck, image_metrics

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def is_pipeline_target(target: str) -> bool:
    """A target whose artifact runs as one pipeline, not component by component."""
    return get_target(target).runs_as_pipeline


def pipeline_e2e_job(out: Path, *, target: str, precision: str, requests: Sequence[Request],
                     runner_options: Mapping[str, Any] | None = None,
                     progress: Progress | None = None) -> E2EResult:
    if not requests:
        raise UsageError("no prompts for the end-to-end check", "pass at least one --e2e-prompt")
    tgt = get_target(target)
    config = tgt.config(precision=precision)
    artifacts = tgt.output_dir(out, config)
    if not artifacts.is_dir():
        raise SourceError(f"no {target} {precision} artifacts at {artifacts}",
                          f"run 'diffprism compile {out} --target {target} --precision {precision}' first")
    runners = Runners(out)
    reference = reference_generations(out, runners, requests, progress)
    ref_images = [_save_png(out, f"{REPORT_DIR}/{IMAGES}/{TORCH}/{i}.png", g) for i, g in enumerate(reference)]
    geometry = read_geometry(out / ONNX_DIR)
    placement = Placement(target, precision)
    label = placement.label
    result = E2EResult(label, precision, {n: label for n in resolve(out, placement, {})}, TOLERANCES[precision])
    if progress:
        progress(f"starting {label}")
    try:
        with tgt.pipeline_runner(artifacts, **dict(runner_options or {})) as pipe:
            result.runner = {"pipeline": pipe.describe()}
            result.label = label = f"{label}-{result.runner['pipeline']['provider']}"  # e.g. web-fp32-wasm
            for i, (request, ref) in enumerate(zip(requests, reference)):
                if progress:
                    progress(f"{label} prompt {i + 1}/{len(requests)}")
                result.checks.append(_check(out, label, i, pipe, request, ref, initial_latents(geometry, request), result))
    except BrowserError as exc:  # the page failed (e.g. weights that do not load): a failed result, recorded
        result.error = str(exc)
        log.warning("%s failed: %s", label, exc)
    record_e2e(out, requests, reference, ref_images, [result])
    return result


def _check(out: Path, label: str, i: int, pipe: Any, request: Request, ref: Generation, latents,
           result: E2EResult) -> ImageCheck:
    run = pipe.generate(request.prompt, latents.numpy(), steps=request.steps, guidance_scale=request.guidance_scale,
                        negative_prompt=request.negative_prompt, height=request.height, width=request.width)
    gen = Generation(run.image, run.latents, run.seconds)
    metrics = image_metrics(ref, gen)
    check = ImageCheck(request, metrics, result.tolerance.violations(metrics), run.seconds)
    folder = f"{REPORT_DIR}/{IMAGES}/{_slug(label)}"
    check.image = _save_png(out, f"{folder}/{i}.png", gen)
    if run.screenshot:
        check.screenshot = f"{folder}/{i}-screenshot.png"
        write_bytes_atomic(out / check.screenshot, run.screenshot)
    check.timings = {"backend": run.backend, **run.timings}
    log.info("%s prompt %d: %s", label, i, metrics)
    return check
