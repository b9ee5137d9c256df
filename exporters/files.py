"""File helpers that never leave a half-written artifact looking finished."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

STAGING = ".staging"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces `final` in one rename.

    The staging folder lives inside the output folder (same filesystem, so the
    rename is atomic) and is removed if the block raises.
    """
    root = final.parent / STAGING
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{final.name}.{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, final: Path) -> None:
    """Move src to final, replacing an older final without a window where neither exists half-made."""
    if final.exists():
        old = final.parent / STAGING / f"{final.name}.old.{uuid.uuid4().hex}"
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)


def clean_staging(out: Path) -> None:
    """Remove leftovers of interrupted runs."""
    shutil.rmtree(out / STAGING, ignore_errors=True)


@contextmanager
def working_dir(path: Path) -> Iterator[Path]:
    """Run a block in `path`: some tools (ONNX Runtime's quantizers) write temp files into the CWD."""
    path.mkdir(parents=True, exist_ok=True)
    before = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(before)
