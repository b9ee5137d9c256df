"""diffprism verify DIR: check a downloaded artifact set against its manifest (exit 6 on any problem)."""
from __future__ import annotations

import argparse

from diffprism import manifest
from diffprism.commands.common import out_dir
from exporters.errors import EXIT_INTEGRITY, EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("verify", help="check every file of a set against manifest.json (sizes, sha256, extras)")
    p.add_argument("dir", type=out_dir, help="artifact folder with manifest.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    problems = manifest.verify(args.dir)
    for line in problems:
        ui.error(line)
    count = len((manifest.load(args.dir) or {}).get("files", {}))
    if not problems:
        ui.info(f"[green]OK[/]: {count} files match {args.dir / manifest.MANIFEST}")
    ui.emit({"ok": not problems, "files": count, "problems": problems})
    return EXIT_OK if not problems else EXIT_INTEGRITY
