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
    global FILES_READ
    FILES_READ += 1
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


FILES_READ = 0  # how many files sha256_file has read in this process (tests count re-reads)


class HashCache:
    """sha256 of files, remembered by what the filesystem says about them.

    An entry is reused only while path, size, mtime, ctime and inode all match: any write
    changes mtime and ctime (ctime cannot be set back from user space), so a tampered or
    replaced file is read again. Saved as JSON (atomically) where `store` points.
    """

    def __init__(self, store: Path | None = None):
        self.store = store
        self._entries: dict[str, list] = {}
        if store is not None and store.is_file():
            try:
                loaded = json.loads(store.read_text())
                if isinstance(loaded, dict):
                    self._entries = {k: v for k, v in loaded.items() if isinstance(v, list) and len(v) == 2}
            except (OSError, ValueError):
                self._entries = {}  # a damaged cache only costs re-reads

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def sha256(self, path: Path) -> str:
        key = str(Path(path).absolute())
        stamp = self._stamp(path)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        digest = sha256_file(path)
        if self._stamp(path) == stamp:  # unchanged while it was read
            self._entries[key] = [stamp, digest]
        return digest

    def save(self) -> None:
        if self.store is not None:
            write_json_atomic(self.store, self._entries)


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
