"""diffprism refit DIR --lora FILE[:SCALE] --out DIR2: the same graphs with LoRA-fused weights, no re-trace."""
from __future__ import annotations

import argparse

from diffprism.commands.common import out_dir


def register(sub) -> None:
    p = sub.add_parser("refit", help="write a new export with LoRA adapters fused into an export's weights "
                       "(graphs unchanged, weights rewritten tensor by tensor); every target compiles it")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", default=[],
                   help="LoRA adapter (.safetensors, diffusers/PEFT or kohya keys) at SCALE (default 1.0); "
                   "repeatable, fused in order. None: the source's own weights (the base export's bytes)")
    p.add_argument("--out", type=out_dir, help="new export folder (default: DIR-refit beside DIR)")
    p.add_argument("--no-recalibrate", dest="recalibrate", action="store_false",
                   help="do not re-take DIR's calibration capture in the new folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.lock import folder_lock
    from diffprism.transform_jobs import refit_job
    from exporters import lora

    dst = args.out or args.dir.with_name(f"{args.dir.name}-refit")
    adapters = lora.from_specs(args.lora)
    request = {"command": "refit", "dir": str(args.dir), "out": str(dst), "lora": list(args.lora)}
    with folder_lock(dst), ui.progress("refit") as update:
        record = refit_job(args.dir, dst, adapters=adapters, progress=update, request=request,
                           recalibrate=args.recalibrate)
    rows = [[name, str(c["rewritten"]), str(c["changed"])] for name, c in record["components"].items()]
    ui.table(f"refit export in {ui.literal(dst)} ({len(adapters)} adapter(s))", ["component", "tensors", "changed"],
             rows)
    if "recalibrated" in record:
        ui.table("calibration re-taken with the adapters (calibrated variants requantize from it)",
                 ["prompts", "steps", "runtime"],
                 [[str(record["recalibrated"][k]) for k in ("prompts", "steps", "runtime")]])
    if record.get("tensorrt_refit"):
        ui.table("TensorRT refit jobs (run on the GPU machine with the base's engines: "
                 "python3 FOLDER/refit_engines.py --base BASE_ENGINE_FOLDER)", ["folder"],
                 [[folder] for folder in record["tensorrt_refit"]])
    ui.emit({"ok": True, "out": str(dst), **record})
    return 0
