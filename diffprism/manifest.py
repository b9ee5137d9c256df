"""manifest.json: every file with sha256 and size, tool versions, hardware, request, stages, verdicts.

Written last and atomically, so a folder with a manifest is a finished one; `verify`
checks a folder against its manifest.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import re
import stat
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exporters.errors import IntegrityError, OutputError
from exporters.files import STAGING, HashCache, sha256_file, write_json_atomic
from exporters.paths import check_relpath, printable, resolve_inside

MANIFEST = "manifest.json"
SCHEMA = 1
LOCK = ".diffprism.lock"
STAGES = ".stages"  # build stage records (diffprism.build): bookkeeping, not part of the set
IGNORED = {MANIFEST, LOCK, STAGING, STAGES}
VARIANT_KEY = re.compile(r"^[^\s/\\\[\]]{1,256}$")  # e.g. openvino-int8, e2e:unet=openvino-int8+...
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


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Schema(BaseModel):
    """What a manifest must look like before anything in it is used (other keys are kept as they are)."""
    model_config = ConfigDict(extra="allow")
    files: dict[str, FileEntry] = Field(default_factory=dict)
    validation: dict[str, dict[str, Any]] = Field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stages: dict[str, Any] = Field(default_factory=dict)
    request: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("validation", "targets")
    @classmethod
    def _variant_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:  # variant labels end up in folder names, tables and scripts
            if not VARIANT_KEY.match(name) or not name.isprintable():
                raise ValueError(f"variant name {printable(name)!r} is not allowed")
        return value


def hash_cache(out: Path) -> HashCache:
    return HashCache(out / STAGES / "hashes.json")


def _owned(rel: str, owned: Iterable[str] | None) -> bool:
    return owned is None or any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in owned)


def _walk(out: Path) -> tuple[list[str], list[str]]:
    """(regular files, symlinks) of the set as relative posix paths; links are never followed."""
    files, links = [], []
    for root, dirs, names in os.walk(out, followlinks=False):
        base = Path(root)
        rel_root = base.relative_to(out)
        if rel_root.parts and rel_root.parts[0] in IGNORED:
            dirs[:] = []
            continue
        for name in sorted(dirs + names):
            rel = (rel_root / name).as_posix()
            if not rel_root.parts and name in IGNORED:
                continue
            mode = os.lstat(base / name).st_mode
            if stat.S_ISLNK(mode):
                links.append(rel)
            elif stat.S_ISREG(mode):
                files.append(rel)
        dirs[:] = [d for d in dirs if not (base / d).is_symlink() and (rel_root.parts or d not in IGNORED)]
    return sorted(files), sorted(links)


def scan_files(out: Path, cache: HashCache | None = None) -> dict[str, dict[str, Any]]:
    """Relative posix path -> {sha256, size} for every file in the set (manifest, lock, staging excluded)."""
    files, links = _walk(out)
    if links:
        raise IntegrityError(f"{out} holds a symlink ({printable(links[0])})",
                             "a set holds regular files only: replace the link with the file")
    digest = cache.sha256 if cache is not None else sha256_file
    return {rel: {"sha256": digest(out / rel), "size": (out / rel).stat().st_size} for rel in files}


def load(out: Path) -> dict[str, Any] | None:
    """The manifest, checked against its schema (IntegrityError, exit 6, when it is not a manifest)."""
    path = out / MANIFEST
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IntegrityError(f"cannot read {path}: {exc.strerror}", "check the folder's permissions") from None
    fix = "re-run the build or re-download the set"
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        raise IntegrityError(f"{path} is not a regular file (a symlink or folder)", fix)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise IntegrityError(f"{path} is not UTF-8 text", fix) from None
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc.msg})", fix) from None
    except OSError as exc:
        raise IntegrityError(f"cannot read {path}: {exc.strerror}", fix) from None
    try:
        Schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(printable(str(p)) for p in err["loc"]) or "(top level)"
        raise IntegrityError(f"{path} is not a diffprism manifest: {where}: {err['msg']}", fix) from None
    return data


def sha256_of(out: Path) -> str:
    """sha256 of manifest.json itself: pin a set with `diffprism verify DIR --manifest-sha256 HASH`."""
    return sha256_file(out / MANIFEST)


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


Update = Callable[[dict[str, Any]], None]
_PENDING: dict[Path, dict[str, Any]] = {}


def commit(out: Path, owned: Iterable[str] | None, update: Update, *,
           request: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest write of a command: check, update, rescan, write (atomically, last).

    `owned` lists the path prefixes this command wrote (None: the whole set, e.g. export).
    Every other file must still match the manifest, or nothing is written (IntegrityError,
    exit 6): a command never blesses bytes it did not write. Inside `one_write(out)` the
    write is deferred to the end of the block, so a command writes the manifest once.
    """
    pending = _PENDING.get(Path(out).absolute())
    if pending is not None:
        pending["owned"] = None if owned is None or pending["owned"] is None else [*pending["owned"], *owned]
        pending["updates"].append(update)
        pending["request"] = pending["request"] or request
        return current(out)
    return _write(out, None if owned is None else list(owned), [update], request)


@contextmanager
def one_write(out: Path) -> Iterator[None]:
    """Collect the commits made for `out` inside the block; write the manifest once when it ends well."""
    key = Path(out).absolute()
    if key in _PENDING:  # nested: the outer block writes
        yield
        return
    _PENDING[key] = {"owned": [], "updates": [], "request": None}
    try:
        yield
    except BaseException:
        _PENDING.pop(key, None)
        raise
    pending = _PENDING.pop(key)
    if pending["updates"]:
        _write(out, pending["owned"], pending["updates"], pending["request"])


def current(out: Path) -> dict[str, Any]:
    """The manifest as it will be written: on disk plus the updates pending in `one_write`."""
    data = copy.deepcopy(load(out)) or new({})
    pending = _PENDING.get(Path(out).absolute())
    if pending is not None:
        for update in pending["updates"]:
            update(data)
    return data


def unowned_problems(out: Path, data: dict[str, Any], owned: Iterable[str], cache: HashCache | None = None) -> list[str]:
    """Files outside `owned` that differ from the manifest (changed, missing, added, linked)."""
    owned = list(owned)
    listed = {rel: e for rel, e in data.get("files", {}).items() if not _owned(rel, owned)}
    problems = _check_listed(out, listed, cache)
    files, links = _walk(out)
    problems += [f"symlink in the set: {printable(rel)}" for rel in links if not _owned(rel, owned) and rel not in listed]
    problems += [f"not in manifest: {printable(rel)}" for rel in files if rel not in listed and not _owned(rel, owned)]
    return problems


def preflight(out: Path, owned: Iterable[str]) -> None:
    """Refuse to start work on a set whose files (outside `owned`) no longer match its manifest."""
    data = load(out)
    pending = _PENDING.get(Path(out).absolute())
    if data is None or (pending is not None and pending["owned"] is None):
        return
    owned = [*owned, *(pending["owned"] if pending is not None else [])]  # what this command already wrote
    cache = hash_cache(out)
    problems = unowned_problems(out, data, owned, cache)
    cache.save()
    if problems:
        raise SetProblems(f"{out} changed since its manifest was written: {problems[0]}"
                          + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                          "rebuild the set, or run 'diffprism verify' to see every change", problems)


def _write(out: Path, owned: list[str] | None, updates: list[Update], request: dict[str, Any] | None) -> dict[str, Any]:
    cache = hash_cache(out)
    old = load(out)
    if old is not None and owned is not None:
        problems = unowned_problems(out, old, owned, cache)
        if problems:
            raise SetProblems(f"{out} changed since its manifest was written: {problems[0]}"
                              + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                              "this command only records what it wrote itself: rebuild the set, or run "
                              "'diffprism verify' to see every change", problems)
    data = copy.deepcopy(old) if old is not None else new(request or {})
    for update in updates:
        update(data)
    data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data["versions"] = {**data.get("versions", {}), **versions()}
    data["files"] = scan_files(out, cache)
    write_json_atomic(out / MANIFEST, data)
    cache.save()
    return data


def write(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Write `data` as the whole manifest (a command that owns the whole set, e.g. export and build)."""
    def replace(current: dict[str, Any]) -> None:
        current.clear()
        current.update(copy.deepcopy(data))

    return commit(out, None, replace, request=data.get("request"))


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
    """A manifest path must stay inside the set: relative, no '..', no drive, backslash or control tricks."""
    return check_relpath(rel)


def _check_listed(out: Path, listed: dict[str, dict[str, Any]], cache: HashCache | None) -> list[str]:
    digest = cache.sha256 if cache is not None else sha256_file
    problems = []
    for rel, entry in sorted(listed.items()):
        try:
            path = resolve_inside(out, rel)
        except IntegrityError as exc:
            problems.append(exc.message)
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(f"missing: {printable(rel)}")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"not a regular file: {printable(rel)}")
        elif st.st_size != entry["size"]:
            problems.append(f"size mismatch: {printable(rel)} ({st.st_size} != {entry['size']})")
        elif digest(path) != entry["sha256"]:
            problems.append(f"sha256 mismatch: {printable(rel)}")
    return problems


def verify(out: Path, *, check_extra: bool = True, manifest_sha256: str | None = None) -> list[str]:
    """Problems found comparing a folder with its manifest (empty list: the set is intact).

    Every file is read (no hash cache): this is what `verify` and `publish` promise.
    """
    data = load(out)
    if data is None:
        raise IntegrityError(f"{out} has no {MANIFEST}", "verify a folder written by diffprism")
    problems = []
    if manifest_sha256 is not None and sha256_of(out) != manifest_sha256.lower():
        problems.append(f"{MANIFEST} is not the pinned one (sha256 {sha256_of(out)} != {manifest_sha256})")
    listed = data.get("files", {})
    problems += _check_listed(out, listed, None)
    if check_extra:
        files, links = _walk(out)
        problems += [f"symlink in the set: {printable(rel)}" for rel in links if rel not in listed]
        problems += [f"not in manifest: {printable(rel)}" for rel in files if rel not in listed]
    return problems


def scan_paths(out: Path) -> list[str]:
    return _walk(out)[0]


class SetProblems(IntegrityError):
    """The folder does not match its manifest; `problems` holds one line per problem."""

    def __init__(self, message: str, fix: str, problems: list[str]):
        super().__init__(message, fix)
        self.problems = problems


# --- verdicts bound to bytes ----------------------------------------------------------------

REFERENCE_DIR = "reference"
PUBLISHABLE = ("passed", "structural")  # per-component statuses publish accepts


def checked_files(out: Path, artifacts: Path, components: Iterable[str], *, references: bool = True,
                  cache: HashCache | None = None) -> dict[str, dict[str, str]]:
    """Per component: sha256 of every artifact file a validation ran (its folder or package, and the
    variant's top-level files) and of the PyTorch reference it compared against."""
    cache = cache or hash_cache(out)
    top = artifacts.relative_to(out).as_posix() if artifacts.is_relative_to(out) else None
    files, _ = _walk(out)
    found: dict[str, dict[str, str]] = {}
    for name in components:
        mine = {}
        for rel in files:
            if top is None or not rel.startswith(top + "/"):
                continue
            parts = rel[len(top) + 1:].split("/")
            if len(parts) == 1 or parts[0] == name or parts[0].startswith(name + "."):
                mine[rel] = cache.sha256(out / rel)
        ref = f"{REFERENCE_DIR}/{name}.npz"
        if references and (out / ref).is_file():
            mine[ref] = cache.sha256(out / ref)
        found[name] = mine
    cache.save()
    return found


def component_status(result: dict[str, Any], name: str) -> str:
    """passed | failed | structural for one component of a ValidationResult.to_json()."""
    if result.get("status") == "structural":
        return "structural" if (result.get("structure") or {}).get(name, {}).get("ok") else "failed"
    mine = [c for c in result.get("comparisons", []) if c.get("component") == name]
    return "passed" if mine and all(c.get("passed") for c in mine) else "failed"


def verdict_entry(result: dict[str, Any], checked: dict[str, dict[str, str]], exported: Iterable[str],
                  previous: dict[str, Any] | None = None, *, folder: str | None = None) -> dict[str, Any]:
    """The manifest verdict of one variant, merged per component with an earlier (partial) run."""
    components = dict((previous or {}).get("components") or {})
    for name, files in checked.items():
        mine = [c for c in result.get("comparisons", []) if c.get("component") == name]
        components[name] = {"status": component_status(result, name), "files": files,
                            "comparisons": len(mine), "failed": sum(not c.get("passed") for c in mine)}
    exported = list(exported)
    complete = all(n in components for n in exported)  # publish needs this too, see verdict_problems
    statuses = [c["status"] for c in components.values()]
    status = "failed" if "failed" in statuses else "structural" if "structural" in statuses else "passed"
    return {
        "passed": status == "passed" if status != "structural" else None,
        "status": status,
        "complete": complete,
        "verdict": result.get("verdict"),
        "comparisons": sum(c["comparisons"] for c in components.values()),
        "failed": sum(c["failed"] for c in components.values()),
        "runner": {**((previous or {}).get("runner") or {}), **(result.get("runner") or {})},
        # The tolerance row each component's deploy check was judged by, and the weights-only check's runs.
        "rows": {**((previous or {}).get("rows") or {}), **(result.get("rows") or {})},
        "weights_only": {**((previous or {}).get("weights_only") or {}), **(result.get("weights_only") or {})},
        "components": components,
        "dir": folder or (previous or {}).get("dir"),
    }


def verdict_problems(data: dict[str, Any], exported: Iterable[str]) -> tuple[list[str], list[str]]:
    """(failed, unproven): verdicts that failed, and what keeps the others from covering the set as it is."""
    files = data.get("files") or {}
    exported = list(exported)
    failed, unproven = [], []
    verdicts = data.get("validation") or {}
    if not any(not k.startswith("e2e:") for k in verdicts):
        unproven.append("no validation verdict")
    for key, v in sorted(verdicts.items()):
        if key.startswith("e2e:"):
            if not v.get("passed"):
                failed.append(key)
            continue
        components = v.get("components")
        if not isinstance(components, dict):
            unproven.append(f"{key}: the verdict does not name the files it checked (re-run 'diffprism validate')")
            continue
        # A variant compiled for a subset of components (compile --components) answers for those.
        required = ((data.get("targets") or {}).get(key, {}).get("config") or {}).get("components") or exported
        missing = [n for n in required if n not in components]
        if missing:
            unproven.append(f"{key}: partial validation, {', '.join(missing)} not validated")
        bad = [n for n in components if components[n].get("status") not in PUBLISHABLE]
        if bad:
            failed.append(f"{key} ({', '.join(bad)})")
        for name, c in sorted(components.items()):
            for rel, sha in sorted((c.get("files") or {}).items()):
                if (files.get(rel) or {}).get("sha256") != sha:
                    unproven.append(f"{key}: {printable(rel)} changed since {name} was validated")
        top = v.get("dir")
        for rel in sorted(files) if isinstance(top, str) and top else []:
            if not rel.startswith(top + "/"):
                continue
            first = rel[len(top) + 1:].split("/")[0]
            owner = next((n for n in components if first == n or first.startswith(n + ".")), None)
            if owner is not None and rel not in (components[owner].get("files") or {}):
                unproven.append(f"{key}: {printable(rel)} was not there when {owner} was validated")
    return failed, unproven
