"""diffprism export SOURCE --out DIR: trace every component once and write the ONNX tree + references."""
from __future__ import annotations

import argparse

from diffprism.commands.common import add_components, add_shapes, out_dir, shapes_from
from diffprism.jobs import export_job
from diffprism.lock import folder_lock
from exporters.spec import DEFAULT_REFERENCE_POINTS, REFERENCE_POINTS


def register(sub) -> None:
    p = sub.add_parser("export", help="export a pipeline to an ONNX tree with PyTorch references")
    p.add_argument("source", help="diffusers folder, Hub id (org/name), or preset (tiny-sd, tiny-sd2, tiny-sdxl, "
                   "sd15-random, sdxl-random, flux-random, sd35-medium-random, ...)")
    p.add_argument("--out", required=True, type=out_dir, help="output folder")
    add_components(p)
    add_shapes(p)
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, default 18)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="trace without weights and stream them from the safetensors files into the ONNX data "
                   "(memory stays a fraction of the model's size; same bytes as the plain export). Default: "
                   "streamed for a folder source, with the plain export as the fallback")
    p.add_argument("--reference-points", choices=REFERENCE_POINTS, default=DEFAULT_REFERENCE_POINTS,
                   help="shape points of the PyTorch reference outputs: standard (default: min, opt and a small "
                   "off-square point), all (adds max, non-square and batch points; slow on full-size models) "
                   "or opt")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="storage dtype of the ONNX weights, converted as each tensor is streamed (compute stays "
                   "fp32: a Cast follows each weight). Default fp32, also for bf16 sources (bf16 -> fp32 is exact)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="memory the export may use (e.g. 24G; default: available memory, or "
                   "$DIFFPRISM_MEMORY_BUDGET); a step that would need more stops before it starts")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled weights (.bin/.ckpt): only for sources you trust")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="fuse a LoRA adapter (.safetensors, diffusers/PEFT or kohya keys) into the weights before "
                   "the trace, at SCALE (default 1.0); repeatable, fused in order")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    shapes = shapes_from(args)
    request = {"command": "export", "source": args.source, "components": args.components, "opset": args.opset,
               "batch": args.batch, "size": args.size, "sequence": args.sequence,
               **({"t5_sequence": args.t5_sequence} if args.t5_sequence else {}),
               "streaming": args.streaming, "reference_points": args.reference_points,
               **({"lora": args.lora} if args.lora else {}),
               **({"dtype": args.dtype} if args.dtype != "fp32" else {})}
    from exporters import lora

    adapters = lora.from_specs(args.lora)
    with folder_lock(args.out), ui.progress("export") as update:
        result = export_job(args.source, args.out, components=args.components, shapes=shapes, opset=args.opset,
                            allow_pickle=args.allow_pickle, revision=args.revision, progress=update, request=request,
                            streaming=args.streaming, reference_points=args.reference_points,
                            adapters=adapters, dtype=args.dtype, memory_budget=args.memory_budget)
    rows = []
    for c in result.components:
        dims = ", ".join(f"{d.name} {d.min}..{d.max}" for d in c.spec.dims if not d.is_static)
        rows.append([c.name, dims, f"{c.seconds:.1f}s", f"{c.onnx_bytes / 1e6:.1f} MB"])
    ui.table(f"exported {result.family} pipeline to {ui.literal(result.tree)}", ["component", "dynamic dims", "time", "size"], rows)
    ui.emit({"ok": True, "tree": str(result.tree), "family": result.family,
             "components": {c.name: {"seconds": c.seconds, "bytes": c.onnx_bytes} for c in result.components}})
    return 0
