"""diffprism publish DIR URL: upload a verified, validated set (fsspec URL or hf://org/repo)."""
from __future__ import annotations

import argparse
from pathlib import Path

from diffprism.commands.common import out_dir
from diffprism import manifest
from diffprism.publish import SetProblems, publish
from exporters.errors import UsageError


def recipe_url(path: Path) -> str:
    from diffprism.recipe import load

    recipe = load(path)
    if recipe.publish is None:
        raise UsageError(f"recipe {path} has no [publish] url", "add [publish] url = \"...\" or pass the URL")
    return recipe.publish.url


def register(sub) -> None:
    p = sub.add_parser("publish", help="upload a finished, validated artifact set; checksums checked before "
                       "and after upload")
    p.add_argument("dir", type=out_dir, help="artifact folder with manifest.json")
    p.add_argument("url", nargs="?", help="destination: local path, s3://, gs://, memory://, or hf://org/repo")
    p.add_argument("--recipe", type=Path, help="take the destination from this recipe's [publish] url")
    p.add_argument("--force", action="store_true", help="publish even without passing validation verdicts")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files at a destination that holds another set or other files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.lock import folder_lock

    if args.url and args.recipe:
        raise UsageError("give either a URL or --recipe, not both", "drop one of them")
    if not args.url and not args.recipe:
        # The manifest is not protected: a destination is never taken from it.
        raise UsageError("no destination given", "pass the URL (diffprism publish DIR URL) or --recipe RECIPE")
    url = args.url or recipe_url(args.recipe)
    try:
        with folder_lock(args.dir, create=False), ui.progress(f"publish {args.dir}") as update:
            result = publish(args.dir, url, force=args.force, overwrite=args.overwrite, progress=update)
    except SetProblems as exc:
        for line in exc.problems:
            ui.error(line)
        raise
    digest = manifest.sha256_of(args.dir)
    ui.info(f"{'already published' if result.skipped else 'published'}: {result.files} files "
            f"({result.bytes / 1e6:.1f} MB) to {ui.literal(result.url)}")
    ui.info(f"manifest sha256: {digest} (pin it: diffprism verify DIR --manifest-sha256 {digest})")
    ui.emit({"ok": True, "url": result.url, "files": result.files, "bytes": result.bytes, "skipped": result.skipped,
             "manifest_sha256": digest, **result.details})
    return 0
