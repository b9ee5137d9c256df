"""diffprism calibrate DIR: record what each component receives over real denoising runs (for quantizers)."""
from __future__ import annotations

import argparse
from pathlib import Path

from diffprism.commands.common import out_dir
from diffprism.jobs import calibrate_job
from diffprism.lock import folder_lock


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="capture calibration inputs (UNet at every step, VAE, text encoders) "
                       "from the export's source, for int8 builds")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: built-in prompt set)")
    p.add_argument("--num-prompts", type=int, help="use the first N prompts (cycles when N exceeds the set)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i (default 0)")
    p.add_argument("--runtime", default="torch", choices=("torch", "openvino", "onnxruntime", "auto"),
                   help="what runs the denoising loop: the PyTorch source (default), or the exported fp32 graph on "
                        "OpenVINO (f32 hint) or ONNX Runtime; auto: the fastest of those present")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from exporters.calibration import read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else None
    with folder_lock(args.dir), ui.progress("calibrate") as update:
        info = calibrate_job(args.dir, prompts=prompts, num_prompts=args.num_prompts, steps=args.steps,
                             seed=args.seed, runtime=args.runtime, progress=update)
    ui.table(f"calibration: {len(info['prompts'])} prompts x {info['steps']} steps at {info['height']}x{info['width']}",
             ["component", "recorded calls", "shapes"],
             [[name, n, "; ".join(f"{k}{tuple(v)}" for k, v in info["shapes"][name].items())]
              for name, n in info["counts"].items()])
    ui.emit({"ok": True, "dir": str(args.dir / "calibration"), **info})
    return 0
