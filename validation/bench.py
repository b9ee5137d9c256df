"""Latency, memory and size per component and per image, PyTorch eager as the baseline row of the same run.

Memory is the peak resident set size (RSS) of this process above its level just
before the runner loaded, sampled every 5 ms by a psutil thread: it includes loading
the model, and it is a process-level figure (not tracemalloc, which misses native
allocations of the runtimes).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from exporters.inputs import make_feed
from exporters.spec import ComponentSpec
from exporters.geometry import Geometry
from runtimes.pipeline import Request, activate, close, generate, initial_latents, runners

log = logging.getLogger(__name__)

MEMORY_METHOD = "peak RSS above the pre-load level, psutil sampled every 5 ms (includes model load)"
BASELINE = "torch"


class PeakRss:
    """Context manager: peak RSS delta of this process while the block runs."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        gc.collect()
        self.base = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    values = np.asarray(seconds, dtype=np.float64)
    return {"median_ms": float(np.median(values) * 1e3), "p90_ms": float(np.percentile(values, 90) * 1e3),
            "runs": int(values.size)}


def time_calls(call: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def bench_component(name: str, spec: ComponentSpec, runner_factory: Callable[[], Any], dims: Mapping[str, int], *,
                    warmup: int, repeat: int) -> dict[str, Any]:
    feed = make_feed(spec, spec.dim_values(dims), seed=0)
    with PeakRss() as memory:
        runner = runner_factory()
        try:
            runner.activate()
            times = time_calls(lambda: runner.infer(feed), warmup, repeat)
            describe = runner.describe()
        finally:
            runner.deactivate()
    del runner
    gc.collect()
    return {**summarize(times), "peak_rss_delta_bytes": memory.delta, "runner": describe}


def bench_image(pipeline_factory: Callable[[], Any], request: Request, geometry: Geometry, *,
                runs: int) -> dict[str, Any]:
    with PeakRss() as memory:
        pipe = pipeline_factory()
        try:
            load = activate(pipe)
            latents = initial_latents(geometry, request)
            times = time_calls(lambda: generate(pipe, request, latents), 1, runs)
            describe = {name: r.describe() for name, r in runners(pipe).items()}  # the configuration that ran
        finally:
            close(pipe)
    gc.collect()
    return {**summarize(times), "peak_rss_delta_bytes": memory.delta, "load_seconds": round(load, 3),
            "runner": describe}


def _latent_dims(geometry: Geometry, name: str, size: tuple[int, int], batch: int) -> dict[str, int]:
    """A component's dims for `batch` images of `size` pixels (the denoiser's batch doubles under guidance)."""
    scale = geometry.vae_scale_factor
    return {"batch": batch * geometry.batch_factor(name), "height": size[0] // scale, "width": size[1] // scale}


def run(specs: Mapping[str, ComponentSpec], rows: Sequence[Any], *, geometry: Geometry,
        make_runner: Callable[[str, ComponentSpec, Any], Any],
        artifact_bytes: Callable[[str, Any], int | None], make_pipeline: Callable[[Any], Any] | None,
        size: tuple[int, int], steps: int, batch: int = 1, warmup: int = 1, repeat: int = 5, image_runs: int = 2,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Bench every component on every row (a placement with a .label; the first row is the baseline).

    `batch` counts images. A row that cannot run here (backend missing, component not built) is
    recorded with its error and the run goes on.
    """
    components: list[dict[str, Any]] = []
    for name, spec in specs.items():
        dims = _latent_dims(geometry, name, size, batch)
        for row in rows:
            if progress:
                progress(f"{name} on {row.label}")
            entry: dict[str, Any] = {"component": name, "target": row.label, "dims": spec.dim_values(dims)}
            try:
                entry["artifact_bytes"] = artifact_bytes(name, row)
                entry.update(bench_component(name, spec, lambda: make_runner(name, spec, row), dims,
                                             warmup=warmup, repeat=repeat))
            except Exception as exc:  # recorded in the table, the other rows still run
                entry["error"] = _error(exc)
                log.warning("bench %s on %s: %s", name, row.label, entry["error"])
            components.append(entry)
    images: list[dict[str, Any]] = []
    request = Request("a photograph of an astronaut riding a horse", seed=0, steps=steps, height=size[0], width=size[1])
    if make_pipeline is not None:
        for row in rows:
            if progress:
                progress(f"image on {row.label}")
            entry = {"target": row.label}
            try:
                entry.update(bench_image(lambda: make_pipeline(row), request, geometry, runs=image_runs))
            except Exception as exc:
                entry["error"] = _error(exc)
                log.warning("bench image on %s: %s", row.label, entry["error"])
            images.append(entry)
    add_ratios(components, images, baseline=rows[0].label)
    return {
        "settings": {"size": list(size), "steps": steps, "batch": batch, "warmup": warmup, "repeat": repeat,
                     "image_runs": image_runs, "guidance_scale": request.guidance_scale},
        "baseline": rows[0].label,
        "memory_method": MEMORY_METHOD,
        "components": components,
        "images": images,
    }


def add_ratios(components: list[dict[str, Any]], images: list[dict[str, Any]], baseline: str) -> None:
    """speedup = baseline median / row median (>1: faster than PyTorch eager), same component."""
    base = {e["component"]: e["median_ms"] for e in components if e["target"] == baseline and "median_ms" in e}
    for e in components:
        if "median_ms" in e and e["component"] in base and e["median_ms"] > 0:
            e["speedup"] = base[e["component"]] / e["median_ms"]
    base_image = next((e["median_ms"] for e in images if e["target"] == baseline and "median_ms" in e), None)
    for e in images:
        if base_image and "median_ms" in e and e["median_ms"] > 0:
            e["speedup"] = base_image / e["median_ms"]
