"""diffprism compress DIR --method pruned-structured --out DIR2: a compressed export any target compiles."""
from __future__ import annotations

import argparse

from diffprism.commands.common import add_components, out_dir, parse_options
from exporters.compress.transform import TRANSFORMS


def register(sub) -> None:
    p = sub.add_parser("compress", help="prune or QAT-train a component and write a new export that every "
                       "target compiles")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--method", required=True, choices=sorted(TRANSFORMS),
                   help="pruned (magnitude, unstructured), pruned-structured (channels and heads removed), "
                   "qat (fake-quantized int8, exported as QDQ)")
    p.add_argument("--out", type=out_dir, help="new export folder (default: DIR-METHOD beside DIR)")
    add_components(p)
    p.add_argument("--option", action="append",
                   help="KEY=VALUE: sparsity (0.5), scope (global|layer), distill_steps (20), distill_lr (1e-4), "
                   "distill_batch (2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.lock import folder_lock
    from diffprism.transform_jobs import compress_job

    dst = args.out or args.dir.with_name(f"{args.dir.name}-{args.method}")
    options = parse_options(args.option)
    if "scope" in options:
        options["scope"] = str(options["scope"])
    request = {"command": "compress", "dir": str(args.dir), "method": args.method, "out": str(dst),
               "components": args.components, "options": options}
    with folder_lock(dst), ui.progress("compress") as update:
        record = compress_job(args.dir, dst, transform=args.method, options=options, components=args.components,
                              progress=update, request=request)
    rows = [[name, f"{d['parameters_before']:,} -> {d['parameters_after']:,}",
             f"{d['distillation'].get('error_before', 0):.4g} -> {d['distillation'].get('error_after', 0):.4g}"]
            for name, d in record["components"].items()]
    ui.table(f"compressed export ({args.method}) in {dst}", ["component", "parameters", "held-out error"], rows)
    ui.emit({"ok": True, "out": str(dst), **record})
    return 0
