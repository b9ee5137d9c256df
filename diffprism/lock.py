"""One diffprism command at a time per output folder."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from exporters.errors import LockedError, OutputError
from diffprism.manifest import LOCK


@contextmanager
def folder_lock(out: Path, *, create: bool = True) -> Iterator[None]:
    """create=False (verify, publish): the folder must exist; a read-only one is read without a lock,
    since no other command can write it either."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, not a folder", "pass a folder path (e.g. --out build/tiny-sd)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    elif not out.is_dir():
        yield  # the command names the missing folder itself
        return
    lock = FileLock(str(out / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockedError(
            f"another diffprism command is working on {out}",
            "wait for it to finish, or use another --out folder",
        ) from None
    except PermissionError:
        if create:
            raise OutputError(f"cannot write {out}", "check the folder's permissions") from None
        yield
        return
    try:
        yield
    finally:
        lock.release()
