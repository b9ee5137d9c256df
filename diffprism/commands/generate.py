"""diffprism generate DIR: draw an image with the exported pipeline on any target, or a per-component mix."""
from __future__ import annotations

import argparse
from pathlib import Path

from diffprism.commands.common import out_dir, parse_options
from diffprism.commands.imagecheck import add_control_image_arg
from exporters.errors import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an image from the exported pipeline on a target (or PyTorch)")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--target", default="onnxruntime",
                   help="torch (the recorded source in PyTorch), onnxruntime (default), openvino, tensorrt, coreml")
    p.add_argument("--precision", default="fp32", help="variant of the target (default fp32)")
    p.add_argument("--component-target", action="append", metavar="COMPONENT=TARGET[:PRECISION]",
                   help="run one component elsewhere, e.g. unet=openvino:int8 (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--size", help="N or HxW in pixels (default: the export's preferred size)")
    p.add_argument("--out", type=Path, default=Path("image.png"), help="PNG to write (default image.png)")
    p.add_argument("--option", action="append", help="runner option KEY=VALUE (repeatable)")
    add_control_image_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.e2e_jobs import generate_job, parse_size
    from diffprism.lock import folder_lock
    from diffprism.placement import Placement, parse_component_targets
    from exporters.errors import UsageError
    from runtimes.pipeline import Request

    if args.steps < 1:
        raise UsageError(f"--steps {args.steps} must be at least 1", "pass e.g. --steps 20")
    default = Placement.parse(f"{args.target}:{args.precision}" if args.precision else args.target, args.dir)
    height, width = parse_size(args.size, args.dir)
    request = Request(args.prompt, args.negative_prompt, args.seed, args.steps, height, width, args.guidance_scale,
                      control_image=args.control_image)
    with folder_lock(args.dir), ui.progress("generate") as update:
        info = generate_job(args.dir, request, default=default, overrides=parse_component_targets(args.component_target),
                            image_path=args.out, runner_options=parse_options(args.option), progress=update)
    ui.info(f"wrote {ui.literal(info['image'])} ({ui.literal(info['label'])}, {height}x{width}, {args.steps} steps, {info['seconds']:.2f} s)")
    ui.emit({"ok": True, **info})
    return EXIT_OK
