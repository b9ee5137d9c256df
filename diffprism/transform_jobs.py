"""diffprism compress: a compressed copy of an export (exporters.compress.transform) as a new export folder."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from diffprism import manifest, sources
from exporters.compress.transform import compress_export, options_for
from exporters.errors import SourceError, UsageError
from exporters.files import clean_staging

Progress = Callable[[str], None]


def compress_job(out: Path, dst: Path, *, transform: str, options: dict[str, Any] | None = None,
                 components: list[str] | None = None, progress: Progress | None = None,
                 request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write <dst> (onnx/, reference/, torch/, manifest last) from the export in <out>; returns the record."""
    if Path(dst).resolve() == Path(out).resolve():
        raise UsageError("the compressed export needs its own folder", "pass --out with a new folder")
    data = manifest.load(out)
    if not data or not data.get("source"):
        raise SourceError(f"{out} has no manifest recording its source", "re-run 'diffprism export SOURCE --out DIR'")
    manifest.check_output_folder(dst)
    clean_staging(dst)
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
