"""Checks for paths and names that come from files (manifest, report JSON, store index, recipe, tree info).

A file can be edited by anyone who can write the folder, so nothing read from one is used
as a path or a name in a script before it passes these checks.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from exporters.errors import IntegrityError

NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")  # component names: text_encoder_2, vae_decoder
VARIANT = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")  # variant labels: fp16-palettize4, tensorrt-fp16-sm89


def printable(text: str) -> str:
    """Control characters shown as escapes (\\n, \\x1b), so a hostile name cannot redraw a terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def check_relpath(rel: str, what: str = "manifest path") -> PurePosixPath:
    """A relative posix path that stays inside its folder: no absolute, '..', drive, backslash or control char."""
    if not isinstance(rel, str) or not rel:
        raise IntegrityError(f"{what} {rel!r} is empty or not text", "the file was tampered with; rebuild or re-download")
    p = PurePosixPath(rel)
    bad = (p.is_absolute() or rel.startswith("~") or "\\" in rel or any(not ch.isprintable() for ch in rel)
           or any(part in ("..", ".") for part in rel.split("/")) or ":" in p.parts[0] or rel.endswith("/"))
    if bad:
        raise IntegrityError(f"{what} '{printable(rel)}' escapes the artifact folder",
                             "the file was tampered with; rebuild or re-download")
    return p


def resolve_inside(root: Path, rel: str, what: str = "manifest path") -> Path:
    """root/rel after check_relpath, with no symlink in any part of it (lstat of each part)."""
    parts = check_relpath(rel, what).parts
    path = root
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return root.joinpath(*parts)  # missing is the caller's business (e.g. "missing: x")
        except OSError as exc:
            raise IntegrityError(f"cannot read {what} '{printable(rel)}': {exc.strerror}", "check the folder") from None
        if stat.S_ISLNK(mode):
            raise IntegrityError(f"{what} '{printable(rel)}' goes through a symlink ({printable(path.name)})",
                                 "replace links with the files themselves; a set holds regular files only")
    return path


def check_name(name: str, what: str = "component name", pattern: re.Pattern = NAME) -> str:
    if not isinstance(name, str) or not pattern.match(name):
        raise IntegrityError(f"{what} '{printable(name)}' is not allowed (letters a-z, digits and '_' only)",
                             "the file was tampered with; re-export the pipeline")
    return name
