"""Prompt match of tiny-shapes over its held-out prompts: PyTorch and any built variants, plus a sample grid.

    .venv/bin/python benchmarks/shapes_match.py /tmp/bench/shapes --variant onnxruntime:fp32 \\
        --variant openvino:int8 --steps 20 --grid docs/tiny-shapes-grid.png

OUT is a 'diffprism export tiny-shapes' folder with the variants built. Every held-out prompt
(combinations never seen in training, diffprism.shapes.scenes.split) is drawn once per
pipeline with seed = its index; each image is measured by diffprism.shapes.check, and every
variant's image is compared with PyTorch's (PSNR/SSIM as in the end-to-end check).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffprism.placement import Placement, Runners, resolve  # noqa: E402
from diffprism.shapes import check, scenes  # noqa: E402
from exporters.export import ONNX_DIR  # noqa: E402
from exporters.tree import read_geometry  # noqa: E402
from runtimes.pipeline import close, to_uint8  # noqa: E402
from validation.e2e import image_metrics  # noqa: E402


def grid(prompts: list[str], images: list[np.ndarray], path: Path, cols: int = 9, scale: int = 4) -> None:
    from PIL import Image, ImageDraw

    tile, text_h = scenes.SIZE * scale, 24
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (p, img) in enumerate(zip(prompts, images)):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        sheet.paste(Image.fromarray(to_uint8(img)).resize((tile, tile), Image.NEAREST), (x, y))
        s = scenes.Scene.parse(p)
        for j, line in enumerate((f"{s.colour} {s.shape}", f"on {s.background}, {s.position}")):
            draw.text((x + 2, y + tile + 1 + 11 * j), line, fill=(0, 0, 0))
    sheet.save(path)


def measure(runners: Runners, placement: Placement, prompts: list[str], ref: list, **kw) -> dict:
    """Prompt-match rates of one built variant, and its images' mean PSNR/SSIM against PyTorch's `ref`."""
    pipe = runners.pipeline(resolve(runners.out, placement, {}), placement)
    try:
        matches, gens = check.generate_matches(pipe, prompts, geometry=read_geometry(runners.out / ONNX_DIR), **kw)
    finally:
        close(pipe)
    metrics = [image_metrics(r, g) for r, g in zip(ref, gens)]
    return {"variant": placement.label, **check.rates(matches),
            "psnr": float(np.mean([min(m["psnr"], 100.0) for m in metrics])),
            "ssim": float(np.mean([m["ssim"] for m in metrics]))}


def print_table(rows: list[dict], extra: tuple[str, ...] = ()) -> None:
    """Markdown table of `rows`; `extra` names further columns each row carries as text."""
    print("| variant | match (all) | shape | colour | background | position | PSNR dB vs PyTorch | SSIM |"
          + "".join(f" {c} |" for c in extra))
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(extra))
    for r in rows:
        q = f"{r['psnr']:.1f} | {r['ssim']:.3f}" if "psnr" in r else "— | —"
        print(f"| {r['variant']} | {r['all']:.0%} | {r['shape']:.0%} | {r['colour']:.0%} | {r['background']:.0%} "
              f"| {r['position']:.0%} | {q} |" + "".join(f" {r.get(c, '—')} |" for c in extra))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder written by 'diffprism export tiny-shapes'")
    ap.add_argument("--variant", action="append", default=[], help="TARGET:PRECISION (repeatable)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--grid", type=Path, help="write PyTorch's images as a labelled grid PNG")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread is steadier
    _, held_out = scenes.split()
    prompts = [s.caption for s in held_out]
    runners = Runners(args.out)
    kw = dict(steps=args.steps, guidance_scale=args.guidance_scale)
    ref_matches, ref = check.generate_matches(runners.source_pipeline(), prompts, **kw)
    rows = [{"variant": "PyTorch", **check.rates(ref_matches)}]
    if args.grid:
        grid(prompts, [g.image for g in ref], args.grid)
    rows += [measure(runners, Placement.parse(text), prompts, ref, **kw) for text in args.variant]
    print(json.dumps(rows, indent=1))
    print(f"\n{len(prompts)} held-out prompts, {args.steps} steps, guidance {args.guidance_scale}\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
