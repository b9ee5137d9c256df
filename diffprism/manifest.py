"""manifest.json: every file with sha256 and size, tool versions, hardware, request, stages, verdicts.

Written last and atomically, so a folder with a manifest is a finished one; `verify`
checks a folder against its manifest.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from exporters.errors import IntegrityError, OutputError
from exporters.files import STAGING, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
SCHEMA = 1
LOCK = ".diffprism.lock"
STAGES = ".stages"  # build stage records (diffprism.build): bookkeeping, not part of the set
IGNORED = {MANIFEST, LOCK, STAGING, STAGES}
PACKAGES = ("diffprism", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "openvino",
            "nncf", "coremltools", "tensorrt", "polygraphy", "numpy")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
    }
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def scan_files(out: Path) -> dict[str, dict[str, Any]]:
    """Relative posix path -> {sha256, size} for every file in the set (manifest, lock, staging excluded)."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if rel.parts[0] in IGNORED or not path.is_file():
            continue
        files[rel.as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def load(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc.msg})", "re-run the build or re-download the set") from None


def new(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "tool": "diffprism",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "request": request,
        "versions": versions(),
        "hardware": hardware(),
        "source": {},
        "stages": {},
        "targets": {},
        "validation": {},
        "files": {},
    }


def write(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Rescan the files and write the manifest atomically (always the last write of a command)."""
    data = dict(data)
    data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data["versions"] = {**data.get("versions", {}), **versions()}
    data["files"] = scan_files(out)
    write_json_atomic(out / MANIFEST, data)
    return data


def check_output_folder(out: Path) -> None:
    """An output folder must be new, empty, or a diffprism folder (has a manifest or our subfolders)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"output {out} is a file", "pass a folder path with --out")
    entries = [p for p in out.iterdir() if p.name not in IGNORED]
    if not entries or (out / MANIFEST).is_file():
        return
    from targets.base import folder_prefixes

    ours = {"onnx", "reference", "calibration", "report"}
    prefixes = folder_prefixes()  # each target names its artifact folders
    if all(p.name in ours or p.name.split("-")[0] in prefixes for p in entries):
        return  # an earlier run that stopped before its manifest
    raise OutputError(
        f"output folder {out} holds other files ({entries[0].name}, ...)",
        "pass an empty or new folder with --out, or a folder diffprism wrote before",
    )


def safe_relpath(rel: str) -> PurePosixPath:
    """A manifest path must stay inside the set: relative, no '..', no drive or backslash tricks."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or not rel or rel.startswith("~") or ":" in p.parts[0]:
        raise IntegrityError(f"manifest path '{rel}' escapes the artifact folder", "the manifest was tampered with")
    return p


def verify(out: Path, *, check_extra: bool = True) -> list[str]:
    """Problems found comparing a folder with its manifest (empty list: the set is intact)."""
    data = load(out)
    if data is None:
        raise IntegrityError(f"{out} has no {MANIFEST}", "verify a folder written by diffprism")
    problems = []
    listed = data.get("files", {})
    for rel, entry in sorted(listed.items()):
        try:
            safe_relpath(rel)
        except IntegrityError as exc:
            problems.append(str(exc.message))
            continue
        path = out / rel
        if path.is_symlink() and not path.resolve().is_relative_to(out.resolve()):
            problems.append(f"link outside the set: {rel}")
        elif not path.is_file():
            problems.append(f"missing: {rel}")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"size mismatch: {rel} ({path.stat().st_size} != {entry['size']})")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"sha256 mismatch: {rel}")
    if check_extra:
        for rel in scan_paths(out):
            if rel not in listed:
                problems.append(f"not in manifest: {rel}")
    return problems


def scan_paths(out: Path) -> list[str]:
    return [p.relative_to(out).as_posix() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] not in IGNORED]
