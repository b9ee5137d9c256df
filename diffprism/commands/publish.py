"""diffprism publish DIR URL: upload a verified, validated set (fsspec URL or hf://org/repo)."""
from __future__ import annotations

import argparse

from diffprism.commands.common import out_dir
from diffprism import manifest
from diffprism.publish import SetProblems, publish
from exporters.errors import UsageError


def recipe_url(folder) -> str:
    data = manifest.load(folder) or {}
    url = (((data.get("request") or {}).get("recipe") or {}).get("publish") or {}).get("url")
    if not url:
        raise UsageError(f"no destination given and {folder} was not built from a recipe with [publish] url",
                         "pass the URL: diffprism publish DIR URL")
    return url


def register(sub) -> None:
    p = sub.add_parser("publish", help="upload a finished, validated artifact set; checksums checked before "
                       "and after upload")
    p.add_argument("dir", type=out_dir, help="artifact folder with manifest.json")
    p.add_argument("url", nargs="?", help="destination: local path, s3://, gs://, memory://, or hf://org/repo "
                   "(default: [publish] url of the recipe that built the set)")
    p.add_argument("--force", action="store_true", help="publish even without passing validation verdicts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    url = args.url or recipe_url(args.dir)
    try:
        with ui.progress(f"publish {args.dir}") as update:
            result = publish(args.dir, url, force=args.force, progress=update)
    except SetProblems as exc:
        for line in exc.problems:
            ui.error(line)
        raise
    ui.info(f"{'already published' if result.skipped else 'published'}: {result.files} files "
            f"({result.bytes / 1e6:.1f} MB) to {result.url}")
    ui.emit({"ok": True, "url": result.url, "files": result.files, "bytes": result.bytes, "skipped": result.skipped,
             **result.details})
    return 0
