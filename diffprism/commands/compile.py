"""diffprism compile DIR --target T --precision P: build a target variant from the exported ONNX tree."""
from __future__ import annotations

import argparse

from diffprism.commands.common import add_components, out_dir, parse_options
from diffprism.jobs import compile_job
from diffprism.lock import folder_lock


def register(sub) -> None:
    p = sub.add_parser("compile", help="build a target (onnxruntime, openvino, tensorrt, coreml, web, aotinductor, torch_tensorrt) from the export")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--target", required=True, help="onnxruntime, openvino, tensorrt, coreml, web, aotinductor or torch_tensorrt")
    p.add_argument("--precision", default=None, help="precision variant (target default if omitted)")
    add_components(p)
    p.add_argument("--option", action="append", help="target option KEY=VALUE (repeatable), e.g. "
                   "compress=palettize4 for Core ML; see README")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    options = parse_options(args.option)
    with folder_lock(args.dir), ui.progress(f"compile {args.target}") as update:
        result = compile_job(args.dir, target=args.target, precision=args.precision,
                             components=args.components, options=options, progress=update)
    rows = [[name, ", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list)))]
            for name, d in result.details.items()]
    ui.table(f"{result.target} {result.precision} -> {ui.literal(result.out_dir)}", ["component", "details"], rows)
    if result.note:
        ui.info(result.note)
    ui.emit({"ok": True, "target": result.target, "precision": result.precision, "dir": str(result.out_dir),
             "files": [str(f) for f in result.files], "details": result.details, "note": result.note})
    return 0
