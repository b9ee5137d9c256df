"""diffprism verify DIR: check a downloaded artifact set against its manifest (exit 6 on any problem).

It proves the folder holds exactly the files its manifest lists, byte for byte; not who wrote the
manifest. Pin that with --manifest-sha256 (the hash build and publish print).
"""
from __future__ import annotations

import argparse
import re

from diffprism import manifest
from diffprism.commands.common import out_dir
from exporters.errors import EXIT_INTEGRITY, EXIT_OK, UsageError


def register(sub) -> None:
    p = sub.add_parser("verify", help="check every file of a set against manifest.json (sizes, sha256, extras)")
    p.add_argument("dir", type=out_dir, help="artifact folder with manifest.json")
    p.add_argument("--manifest-sha256", metavar="HASH",
                   help="also require manifest.json to have this sha256 (printed by build and publish)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.lock import folder_lock

    pin = args.manifest_sha256
    if pin is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pin):
        raise UsageError(f"--manifest-sha256 '{ui.literal(pin)}' is not a sha256", "pass 64 hex digits")
    with folder_lock(args.dir, create=False):
        problems = manifest.verify(args.dir, manifest_sha256=pin)
        count = len((manifest.load(args.dir) or {}).get("files", {}))
    for line in problems:
        ui.error(line)
    if not problems:
        ui.info(f"[green]OK[/]: {count} files match {ui.literal(args.dir / manifest.MANIFEST)}")
        ui.emit({"ok": True, "files": count, "problems": [], "manifest_sha256": manifest.sha256_of(args.dir)})
        return EXIT_OK
    ui.emit({"ok": False, "files": count, "problems": problems, "exit_code": EXIT_INTEGRITY,
             "error": f"{args.dir} does not match its manifest: {problems[0]}",
             "fix": "rebuild the set or download it again; do not use these files"})
    return EXIT_INTEGRITY
