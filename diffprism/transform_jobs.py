"""diffprism compress and refit: a transformed copy of an export (compressed students, LoRA weights) as a new export folder."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from diffprism import manifest, sources
from exporters.compress.transform import compress_export, options_for
from exporters.errors import SourceError, UsageError
from exporters.files import clean_staging

Progress = Callable[[str], None]


def _transform_base(out: Path, dst: Path, what: str) -> dict[str, Any]:
    """The base export's manifest, once <dst> is checked to be a new, clean output folder."""
    if Path(dst).resolve() == Path(out).resolve():
        raise UsageError(f"the {what} export needs its own folder", "pass --out with a new folder")
    data = manifest.load(out)
    if not data or not data.get("source"):
        raise SourceError(f"{out} has no manifest recording its source", "re-run 'diffprism export SOURCE --out DIR'")
    manifest.check_output_folder(dst)
    clean_staging(dst)
    return data


def compress_job(out: Path, dst: Path, *, transform: str, options: dict[str, Any] | None = None,
                 components: list[str] | None = None, progress: Progress | None = None,
                 request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write <dst> (onnx/, reference/, torch/, manifest last) from the export in <out>; returns the record."""
    data = _transform_base(out, dst, "compressed")
    try:
        compress_options = options_for(transform, **(options or {}))
    except TypeError as exc:
        raise UsageError(f"unknown compression option ({exc})", "use sparsity, scope, distill_steps, distill_lr, "
                         "distill_batch") from None
    if progress:
        progress("reloading the source pipeline")
    src = sources.load_recorded(data["source"])
    if progress:
        progress(f"compressing ({transform})")
    record = compress_export(src.pipeline, out, dst, transform=transform, options=compress_options,
                             components=components)
    new = manifest.new(request or {"command": "compress", "dir": str(out), "transform": transform})
    new["source"] = {"kind": "compressed", "base": data["source"], "path": str(Path(dst).resolve()),
                     "transform": transform, "components": list(record["components"])}
    new["stages"]["export"] = {**copy.deepcopy(data.get("stages", {}).get("export", {})), "transform": record}
    manifest.write(dst, new)
    return record


def refit_job(out: Path, dst: Path, *, adapters: list[Any], progress: Progress | None = None,
              request: dict[str, Any] | None = None, recalibrate: bool = True) -> dict[str, Any]:
    """Write <dst> (onnx/, reference/, manifest last): the export in <out> with the adapters' weights and
    the same graphs. No adapters gives the weights of the source without any (the base export's bytes).
    A capture in <out> is re-taken in <dst> with its settings (the adapters change the activations), so
    calibrated variants of <dst> requantize from it."""
    from exporters import lora
    from exporters.refit import refit_export

    data = _transform_base(out, dst, "refit")
    recorded = data["source"]
    base_adapters = lora.from_record(recorded.get("adapters"))
    raw = {k: v for k, v in recorded.items() if k != "adapters"}
    if raw.get("kind") == "refit":  # a refit of a refit starts from the same source
        raw = raw["base"]
    if progress:
        progress("reloading the source pipeline")
    src = sources.load_recorded(raw)
    touched = lora.touched(src.pipeline, base_adapters)  # the base's own adapters: its tensors may differ too
    if progress:
        progress(f"fusing {len(adapters)} adapter(s)")
    for part, names in lora.fuse(src.pipeline, adapters).items():
        touched.setdefault(part, set()).update(names)
    info = {"kind": "refit", "base": raw, "path": str(Path(dst).resolve()), "from": str(Path(out).resolve()),
            "adapters": lora.record(adapters)}
    if progress:
        progress("rewriting weights")
    record = refit_export(src.pipeline, out, dst, touched=touched, source_info=info,
                          record={"from": str(Path(out).resolve()), "adapters": lora.record(adapters),
                                  "base_adapters": lora.record(base_adapters)})
    from targets.tensorrt_refit import write_refit_jobs

    record["tensorrt_refit"] = write_refit_jobs(out, dst)  # refittable engines of the base take the new weights
    new = manifest.new(request or {"command": "refit", "dir": str(out)})
    new["source"] = info
    new["stages"]["export"] = {**copy.deepcopy(data.get("stages", {}).get("export", {})), "refit": record}
    manifest.write(dst, new)
    capture = data.get("stages", {}).get("calibrate")
    if recalibrate and capture:
        record["recalibrated"] = _recalibrate(out, dst, progress)
    return record


def _recalibrate(out: Path, dst: Path, progress: Progress | None) -> dict[str, Any]:
    """Re-take the base's calibration capture on the refit export with the same prompts, steps and seed."""
    from diffprism.jobs import calibrate_job
    from exporters import calibration

    info = calibration.info(out / calibration.CALIBRATION_DIR)
    runtime = (manifest.load(out) or {}).get("stages", {}).get("calibrate", {}).get("runtime", "torch")
    seeds = info.get("seeds") or [0]
    if progress:
        progress("recalibrating with the adapters")
    calibrate_job(dst, prompts=list(info["prompts"]), steps=int(info["steps"]), seed=int(seeds[0]), runtime=runtime,
                  progress=progress)
    return {"prompts": len(info["prompts"]), "steps": int(info["steps"]), "runtime": runtime}
