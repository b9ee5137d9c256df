"""diffprism build RECIPE: every stage of a release build, resumable and keyed by content."""
from __future__ import annotations

import argparse
from pathlib import Path

from diffprism import manifest
from diffprism.build import run_build
from diffprism.commands.common import out_dir
from diffprism.recipe import load
from exporters.errors import EXIT_OK, EXIT_VALIDATION_FAILED


def register(sub) -> None:
    p = sub.add_parser("build", help="run a build recipe: export, calibrate, compile, validate, manifest "
                       "(reruns skip unchanged stages; exit 1 if any validation fails)")
    p.add_argument("recipe", type=Path, help="TOML build recipe (see examples/tiny-sd.toml)")
    p.add_argument("--out", type=out_dir, help="output folder (default: build/<recipe name>)")
    p.add_argument("--only", action="append", metavar="TARGET:PRECISION",
                   help="build only this variant (repeatable), e.g. --only tensorrt:fp16")
    p.add_argument("--store", metavar="URL", help="shared store (path, s3://, gs://, memory://): pull stages "
                   "built elsewhere by hash, push the ones built here")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--export-only", action="store_true", help="run the export (and calibration) stages only: "
                      "the first job of a CI matrix, with --store")
    mode.add_argument("--merge", action="store_true", help="build nothing: pull every stage from --store and "
                      "write the final manifest (the last job of a CI matrix)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    recipe = load(args.recipe)
    out = args.out or Path("build") / (recipe.name or args.recipe.stem)
    with ui.progress(f"build {args.recipe.name}") as update:
        report = run_build(recipe, out, only=args.only, store_url=args.store, merge=args.merge,
                           export_only=args.export_only, progress=update)
    ui.table(f"build {ui.literal(out)}", ["stage", "action", "key"], [[s.name, s.action, s.key[:12]] for s in report.stages])
    shown = {"passed": "[green]pass[/]", "failed": "[red]FAIL[/]", "structural": "[yellow]structural[/] (numerics not run here)"}
    rows = [[k, shown.get(v["status"], v["status"]), f"{v['comparisons'] - v['failed']}/{v['comparisons']}"]
            for k, v in report.verdicts.items()]
    if rows:
        ui.table("validation", ["variant", "verdict", "within tolerance"], rows)
    images = [[k, shown["passed" if v["passed"] else "failed"], f"{v['images'] - v['failed']}/{v['images']}"]
              for k, v in report.images.items()]
    if images:
        ui.table("images vs PyTorch ([validation] prompts)", ["variant", "verdict", "within tolerance"], images)
    ok = report.passed or args.export_only
    digest = manifest.sha256_of(out) if (out / manifest.MANIFEST).is_file() else None
    if digest:
        ui.info(f"manifest sha256: {digest} (pin it: diffprism verify DIR --manifest-sha256 {digest})")
    failure = {} if ok else {"exit_code": EXIT_VALIDATION_FAILED, "error": "a validation failed",
                             "fix": "see the validation table; fix the build or its tolerances"}
    ui.emit({"ok": ok, "out": str(out), "stages": {s.name: {"action": s.action, "key": s.key} for s in report.stages},
             "validation": report.verdicts, "images": report.images, "manifest_sha256": digest, **failure})
    return EXIT_OK if ok else EXIT_VALIDATION_FAILED
