"""diffprism plan RECIPE [--matrix github|gitlab]: the builds of a recipe, or the CI job matrix for them."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffprism import matrix
from diffprism.recipe import load


def register(sub) -> None:
    p = sub.add_parser("plan", help="list a recipe's builds, or print its CI job matrix as JSON")
    p.add_argument("recipe", type=Path, help="TOML build recipe")
    p.add_argument("--matrix", choices=matrix.FORMATS, help="print the job matrix for this CI system")
    p.add_argument("--only", action="append", metavar="TARGET:PRECISION", help="restrict to these builds")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    recipe = load(args.recipe)
    if args.matrix:
        # The matrix is the command's product: always JSON on stdout (compact, for $GITHUB_OUTPUT).
        doc = matrix.render(recipe, args.matrix, args.only)
        sys.stdout.write(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
        return 0
    jobs = matrix.jobs(recipe, args.only)
    ui.table(f"builds of {args.recipe}", ["build", "runs on"], [[j["build"], ", ".join(j["runs-on"])] for j in jobs])
    ui.emit({"ok": True, "jobs": jobs})
    return 0
