"""Jobs on whole pipelines: generate an image, image-level validation, benchmarks, the HTML report.

Each job records what it found under <out>/report/ and rewrites report.html; the
manifest is always the last write.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffprism import manifest
from diffprism.jobs import REPORT_DIR, _read_json, tree_specs
from diffprism.placement import Placement, Runners, mix_label, resolve
from diffprism.variant import TORCH
from exporters.errors import UsageError
from exporters.files import write_bytes_atomic, write_json_atomic
from exporters.reference import save_npz
from exporters.tree import geometry as tree_geometry
from runtimes.pipeline import (Generation, Request, activate, close, for_export, generate, initial_latents,
                               runners as pipeline_runners)
from validation import report
from validation.e2e import E2EResult, check_pipeline
from validation.policy import loosest

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
IMAGES = "images"
MAX_GENERATIONS = 12  # generations kept in the report


def default_size(out: Path) -> tuple[int, int]:
    """The denoiser's exported opt size in pixels (e.g. 512x512 for SD 1.5, 64x64 for tiny-sd)."""
    info, specs = tree_specs(out)
    geometry = tree_geometry(info)
    denoiser = specs.get(geometry.denoiser)
    if denoiser is None:
        raise UsageError(f"image generation needs the {geometry.denoiser} component", "re-export with all components")
    scale = geometry.vae_scale_factor
    return denoiser.dim("height").opt * scale, denoiser.dim("width").opt * scale


def _geometry(out: Path):
    return tree_geometry(tree_specs(out)[0])


def parse_size(text: str | None, out: Path) -> tuple[int, int]:
    """'512' or '768x512' (height x width); None: the export's preferred size."""
    if not text:
        return default_size(out)
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"size '{text}' is not N or HxW", "write e.g. --size 512 or --size 768x512") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise UsageError(f"size '{text}' is not N or HxW", "write e.g. --size 512 or --size 768x512")
    return (values[0], values[-1])


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def images_dir(label: str) -> str:
    """Where the image check of `label` writes its PNGs, relative to the output folder."""
    return f"{REPORT_DIR}/{IMAGES}/{_slug(label)}"


def _save_png(out: Path, rel: str, gen: Generation) -> str:
    write_bytes_atomic(out / rel, gen.png())
    return rel


def _runner_info(pipe: Any) -> dict[str, dict[str, str]]:
    return {name: runner.describe() for name, runner in pipeline_runners(pipe).items()}


def _finish(out: Path, update: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite report.html from what report/ holds, then the manifest (always last; it records only report/)."""
    data = manifest.current(out)
    update(data)
    report.write_report(out, manifest=data)
    manifest.commit(out, [REPORT_DIR], update, request={"command": "report"})


# --- generate -----------------------------------------------------------------------------


def generate_job(out: Path, request: Request, *, default: Placement, overrides: Mapping[str, Placement] | None = None,
                 image_path: Path, runner_options: Mapping[str, Any] | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    placements = resolve(out, default, overrides or {})
    request = for_export(request, tree_specs(out)[1])
    label = mix_label(placements)
    runners = Runners(out, runner_options)
    if progress:
        progress(f"loading {label}")
    pipe = runners.pipeline(placements, default)
    try:
        load = activate(pipe)  # compiled before the timed call: `seconds` is the image alone, as deployed
        if progress:
            progress(f"denoising {request.steps} steps")
        gen = generate(pipe, request, initial_latents(_geometry(out), request))
        info = {"label": label, "placements": {n: p.label for n, p in placements.items()}, "runner": _runner_info(pipe),
                "request": request.to_json(), "seconds": round(gen.seconds, 3), "load_seconds": round(load, 3)}
    finally:
        close(pipe)
    write_bytes_atomic(image_path, gen.png())
    info["image"] = str(image_path)
    rel = f"{REPORT_DIR}/{IMAGES}/generated/{_slug(label)}-seed{request.seed}.png"
    info["report_image"] = _save_png(out, rel, gen)
    path = out / REPORT_DIR / "generations.json"
    kept = [g for g in _read_json(path).get("generations", []) if g.get("report_image") != rel]
    write_json_atomic(path, {"generations": ([info] + kept)[:MAX_GENERATIONS]})
    _finish(out, lambda data: data.setdefault("stages", {}).__setitem__("generate", {
        "label": label, "request": request.to_json(), "seconds": info["seconds"], "load_seconds": info["load_seconds"],
        "runner": info["runner"]}))
    return info


# --- image-level validation ---------------------------------------------------------------


def _reference_key(runners: Runners, request: Request) -> str:
    versions = (manifest.load(runners.out) or {}).get("versions") or manifest.versions()
    basis = {"request": request.to_json(), "source": runners.source_info,
             "torch": versions.get("torch"), "diffusers": versions.get("diffusers")}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def reference_generations(out: Path, runners: Runners, requests: Sequence[Request],
                          progress: Progress | None = None) -> list[Generation]:
    """PyTorch generations of each request, cached in report/cache/ (keyed by request, source and versions)."""
    found = []
    for i, request in enumerate(requests):
        path = out / REPORT_DIR / "cache" / f"torch-{_reference_key(runners, request)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as data:
                found.append(Generation(data["image"], data["latents"], float(data["seconds"])))
            continue
        if progress:
            progress(f"PyTorch reference {i + 1}/{len(requests)}")
        gen = generate(runners.source_pipeline(), request, initial_latents(_geometry(out), request))
        tmp = path.with_name(f".{path.name}.tmp")
        save_npz({"image": gen.image, "latents": gen.latents, "seconds": np.array(gen.seconds)}, tmp)
        tmp.replace(path)
        found.append(gen)
    return found


def e2e_job(out: Path, variants: Sequence[Mapping[str, Placement]], requests: Sequence[Request], *,
            runner_options: Mapping[str, Any] | None = None, progress: Progress | None = None) -> list[E2EResult]:
    """Generate every request through PyTorch and through each variant (component -> placement); judge the images."""
    results, reference, ref_images = e2e_work(out, variants, requests, runners=Runners(out, runner_options),
                                              progress=progress)
    record_e2e(out, requests, reference, ref_images, results)
    return results


def e2e_work(out: Path, variants: Sequence[Mapping[str, Placement]], requests: Sequence[Request], *,
             runners: Runners, progress: Progress | None = None) -> tuple[list[E2EResult], list[Generation], list[str]]:
    """The images and verdicts of e2e_job, recorded nowhere: (results, PyTorch generations, their PNG paths)."""
    if not requests:
        raise UsageError("no prompts for the end-to-end check", "pass at least one --e2e-prompt")
    specs = tree_specs(out)[1]
    requests = [for_export(r, specs) for r in requests]  # the exported T5 length, for references too
    reference = reference_generations(out, runners, requests, progress)
    ref_images = [_save_png(out, f"{REPORT_DIR}/{IMAGES}/{TORCH}/{i}.png", g) for i, g in enumerate(reference)]
    results = []
    for placements in variants:
        label = mix_label(placements)
        if progress:
            progress(f"end-to-end {label}")
        default = next(iter(placements.values()))
        pipe = runners.pipeline(placements, default)
        try:
            activate(pipe)
            # Judged as deployed: by the loosest of the variants' rows and what their runtimes compute in.
            computed = [r.compute_precision() for r in pipeline_runners(pipe).values()]
            precision = loosest([p.tolerance_row for p in placements.values()] + [c for c in computed if c])
            result, _ = check_pipeline(
                reference, pipe, requests, geometry=_geometry(out), label=label, precision=precision,
                placements={n: p.label for n, p in placements.items()},
                on_image=lambda i, g, label=label: _save_png(out, f"{images_dir(label)}/{i}.png", g))
            result.runner = _runner_info(pipe)
        finally:
            close(pipe)
        results.append(result)
    return results, reference, ref_images


def e2e_section(section: Mapping[str, Any] | None, requests: Sequence[Mapping[str, Any]],
                reference: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """report/validation.json's "e2e" section with `results` (label -> result JSON) merged in; results judged
    against other requests are dropped."""
    wanted = list(requests)
    merged = dict(section or {})
    if merged.get("requests") != wanted:
        merged = {"requests": wanted, "results": {}}
    merged["reference"] = dict(reference)
    merged["results"] = {**(merged.get("results") or {}), **results}
    return merged


def e2e_verdict(result: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's "e2e:<label>" entry of one result JSON."""
    checks = result.get("checks") or []
    return {"passed": result["passed"], "precision": result["precision"], "images": len(checks),
            "failed": sum(not c["passed"] for c in checks), "error": result.get("error")}


def record_e2e(out: Path, requests: Sequence[Request], reference: Sequence[Generation], ref_images: list[str],
               results: Sequence[E2EResult]) -> None:
    """Merge into report/validation.json under "e2e" and the manifest's verdicts."""
    path = out / REPORT_DIR / "validation.json"
    data = _read_json(path)
    data["e2e"] = e2e_section(data.get("e2e"), [r.to_json() for r in requests],
                              {"images": ref_images, "seconds": [round(g.seconds, 3) for g in reference]},
                              {r.label: r.to_json() for r in results})
    write_json_atomic(path, data)

    def update(m: dict[str, Any]) -> None:
        for result in results:
            m.setdefault("validation", {})[f"e2e:{result.label}"] = e2e_verdict(result.to_json())

    _finish(out, update)


# --- benchmarks and report ----------------------------------------------------------------


def bench_job(out: Path, variants: Sequence[Placement], *, size: tuple[int, int], steps: int, batch: int = 1,
              warmup: int = 1, repeat: int = 5, image_runs: int = 2, components: list[str] | None = None,
              runner_options: Mapping[str, Any] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    from validation import bench

    _, specs = tree_specs(out)
    if components:
        unknown = [c for c in components if c not in specs]
        if unknown:
            raise UsageError(f"component(s) {unknown} are not in this export", f"exported: {list(specs)}")
        specs = {n: s for n, s in specs.items() if n in components}
    runners = Runners(out, runner_options)
    rows = [Placement(TORCH)] + [v for v in variants if v.target != TORCH]
    result = bench.run(
        specs, rows, geometry=_geometry(out), make_runner=runners.runner, artifact_bytes=lambda name, p: _artifact_bytes(runners, name, p),
        make_pipeline=lambda p: runners.pipeline(resolve(out, p, {}), p), size=size, steps=steps, batch=batch,
        warmup=warmup, repeat=repeat, image_runs=image_runs, progress=progress)
    result["hardware"] = manifest.hardware()
    result["versions"] = manifest.versions()
    write_json_atomic(out / REPORT_DIR / "bench.json", result)
    _finish(out, lambda data: data.setdefault("stages", {}).__setitem__("bench", {
        "size": list(size), "steps": steps, "batch": batch, "rows": [p.label for p in rows]}))
    return result


def _artifact_bytes(runners: Runners, name: str, placement: Placement) -> int | None:
    if placement.target == TORCH:
        from exporters.families import exporter_for

        source = runners.source_pipeline()
        module = exporter_for(source, name).module(source)
        return sum(p.numel() * p.element_size() for p in module.parameters())
    folder = runners.artifact_dir(placement) / name
    if not folder.exists():
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def report_job(out: Path) -> Path:
    tree_specs(out)  # a clear error for a folder that is not an export
    manifest.preflight(out, [REPORT_DIR])
    path = report.write_report(out, manifest=manifest.current(out))
    if manifest.load(out) is not None:
        manifest.commit(out, [REPORT_DIR], lambda data: None)
    return path
