"""diffprism report DIR: rewrite report/report.html from what the folder holds (runs no model)."""
from __future__ import annotations

import argparse

from diffprism.commands.common import out_dir
from exporters.errors import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("report", help="write DIR/report/report.html (images, comparisons, latency, sizes)")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.e2e_jobs import report_job
    from diffprism.lock import folder_lock

    with folder_lock(args.dir):
        path = report_job(args.dir)
    ui.info(f"report: {ui.literal(path.resolve())}")
    ui.emit({"ok": True, "report": str(path.resolve())})
    return EXIT_OK
