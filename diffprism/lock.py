"""One diffprism command at a time per output folder."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from exporters.errors import LockedError
from diffprism.manifest import LOCK


@contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockedError(
            f"another diffprism command is working on {out}",
            "wait for it to finish, or use another --out folder",
        ) from None
    try:
        yield
    finally:
        lock.release()
