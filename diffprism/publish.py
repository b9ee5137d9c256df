"""Publish a finished, validated artifact set to an fsspec URL or a Hugging Face Hub repo.

Before upload the folder must match its manifest and carry passing verdicts; after
upload every file is checked at the destination (read back and hashed, or for the Hub
compared with the sha256 / git ids the Hub reports). The manifest goes last, so a
destination with a manifest holds a complete set.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffprism import manifest
from exporters.errors import (EXIT_VALIDATION_FAILED, BackendUnavailable, DiffprismError, IntegrityError,
                              OutputError, UsageError)
from exporters.files import sha256_file

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class NotValidated(DiffprismError):
    """The set has no verdict or a failed one."""

    exit_code = EXIT_VALIDATION_FAILED


class SetProblems(IntegrityError):
    """The folder does not match its manifest; `problems` holds one line per problem."""

    def __init__(self, message: str, fix: str, problems: list[str]):
        super().__init__(message, fix)
        self.problems = problems


@dataclass
class Published:
    url: str
    files: int
    bytes: int
    skipped: bool = False  # the destination already held this exact set
    details: dict[str, Any] = field(default_factory=dict)


def check_set(folder: Path, *, force: bool = False) -> dict[str, Any]:
    """The manifest of a set that may be published (intact; validated and passing unless force)."""
    data = manifest.load(folder)
    if data is None:
        raise IntegrityError(f"{folder} has no {manifest.MANIFEST}", "publish a folder written by 'diffprism build'")
    problems = manifest.verify(folder)
    if problems:
        raise SetProblems(f"{folder} does not match its manifest: {problems[0]}"
                          + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                          "rebuild the set or re-download it", problems)
    verdicts = data.get("validation") or {}
    if not force:
        if not verdicts:
            raise NotValidated(f"{folder} has no validation verdict", "run 'diffprism build' or 'diffprism validate' "
                               "first, or pass --force")
        # A structural verdict (numerics cannot run on the building machine, e.g. Core ML off macOS) is
        # neither passed nor failed: it is published as such.
        failed = [k for k, v in verdicts.items() if not v.get("passed") and v.get("status") != "structural"]
        if failed:
            raise NotValidated(f"validation failed for {', '.join(failed)}", "fix the build, or pass --force")
    return data


def publish(folder: Path, url: str, *, force: bool = False, progress: Progress | None = None) -> Published:
    data = check_set(folder, force=force)
    notify = progress or (lambda text: None)
    if url.startswith("hf://"):
        return _publish_hub(folder, url, data, notify)
    return _publish_fsspec(folder, url, data, notify)


def _publish_fsspec(folder: Path, url: str, data: dict[str, Any], notify: Progress) -> Published:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"cannot open destination '{url}': {exc}", "install the fsspec backend for it "
                         "(s3fs, gcsfs) or use a local path") from None
    root = root.rstrip("/")
    ours = (folder / manifest.MANIFEST).read_bytes()
    remote_manifest = f"{root}/{manifest.MANIFEST}"
    if fs.exists(remote_manifest):
        if fs.cat_file(remote_manifest) == ours:
            notify("already published")
            return Published(url, len(data["files"]), 0, skipped=True)
        raise OutputError(f"{url} already holds a different published set",
                          "publish each release to its own URL (e.g. with the version in it)")
    total = 0
    for rel, entry in sorted(data["files"].items()):
        notify(f"upload {rel}")
        manifest.safe_relpath(rel)
        fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(folder / rel), f"{root}/{rel}")
        total += entry["size"]
    for rel, entry in sorted(data["files"].items()):  # read back before the manifest makes the set official
        notify(f"check {rel}")
        if _remote_sha256(fs, f"{root}/{rel}") != entry["sha256"]:
            raise IntegrityError(f"{url}/{rel} does not match its sha256 after upload", "publish again")
    fs.pipe_file(remote_manifest, ours)
    if fs.cat_file(remote_manifest) != ours:
        raise IntegrityError(f"{url}/{manifest.MANIFEST} differs after upload", "publish again")
    log.info("published %d files (%d bytes) to %s", len(data["files"]), total, url)
    return Published(url, len(data["files"]), total)


def _remote_sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def parse_hub_url(url: str) -> tuple[str, str | None, str | None]:
    """hf://org/repo[@revision][/path/in/repo] -> (repo_id, revision, path_in_repo)."""
    rest = url.removeprefix("hf://").strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise UsageError(f"'{url}' is not a Hub repo URL", "write hf://org/repo (optionally hf://org/repo@branch/sub/dir)")
    name, _, revision = parts[1].partition("@")
    path = "/".join(parts[2:]) or None
    return f"{parts[0]}/{name}", revision or None, path


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file, which the Hub reports for files not stored in LFS."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _publish_hub(folder: Path, url: str, data: dict[str, Any], notify: Progress) -> Published:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise BackendUnavailable("publishing to the Hub needs huggingface_hub", "pip install 'diffprism[hub]'") from None
    repo_id, revision, path_in_repo = parse_hub_url(url)
    api = HfApi()
    names = [*sorted(data["files"]), manifest.MANIFEST]
    notify(f"upload {len(names)} files to {repo_id}")
    try:
        # One commit holds the whole set, manifest included: the Hub never shows half of it.
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                                   revision=revision, repo_type="model", allow_patterns=names,
                                   commit_message=f"diffprism: publish {len(names)} files")
        prefix = f"{path_in_repo}/" if path_in_repo else ""
        notify("check uploaded files")
        infos = api.get_paths_info(repo_id, [prefix + n for n in names], revision=commit.oid, repo_type="model")
    except Exception as exc:
        if isinstance(exc, DiffprismError):
            raise
        raise OutputError(f"cannot publish to {url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          "check the repo exists (huggingface-cli repo create), your token (HF_TOKEN) and the network"
                          ) from None
    remote = {info.path.removeprefix(prefix): info for info in infos}
    for rel in names:
        info = remote.get(rel)
        local = folder / rel
        if info is None:
            raise IntegrityError(f"{url}: {rel} is missing after upload", "publish again")
        ok = (info.lfs.sha256 == sha256_file(local) and info.lfs.size == local.stat().st_size) if info.lfs \
            else info.blob_id == git_blob_sha1(local)
        if not ok:
            raise IntegrityError(f"{url}: {rel} does not match after upload", "publish again")
    total = sum(e["size"] for e in data["files"].values())
    return Published(url, len(data["files"]), total, details={"commit": commit.oid, "commit_url": commit.commit_url})
