"""LoRA refit against a full re-export: wall time and peak RSS of the UNet with a rank-16 adapter.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/lora_refit.py sd15-random \\
        --work /tmp/bench/lora-refit --json /tmp/bench/lora-refit.json

Steps (each measured command runs once, alone, in a fresh process; peak RSS is the sum over its
process tree, sampled every 50 ms by tree_rss.run_sampled):
1. a random rank-R LoRA (PEFT layout, B non-zero) for the source's UNet attention projections is
   written in-process (not measured);
2. base: `diffprism export SOURCE --out WORK/base --components unet` (not compared; the refit's base);
3. re-export: `diffprism export SOURCE --out WORK/reexport --components unet --lora FILE` (trace + fuse);
4. refit: `diffprism refit WORK/base --lora FILE --out WORK/refit` (no trace; weights rewritten
   tensor by tensor, references recomputed).
The rows give seconds and peak RSS of 3 and 4 and the refit's ratio to the re-export. Outputs are
removed unless --keep.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tree_rss import run_sampled

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="sd15-random", help="preset or diffusers folder (default sd15-random)")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA scale (default 1.0)")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--keep", action="store_true", help="keep the exports")
    p.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval in seconds (default 0.05)")
    args = p.parse_args(argv)
    if args.rank < 1:
        p.error("--rank must be >= 1")
    if args.interval <= 0:
        p.error("--interval must be > 0")
    return args


def make_lora(source: str, rank: int, folder: Path) -> Path:
    """A rank-`rank` UNet LoRA with random A and B for `source`, saved as diffusers does."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffprism import sources

    torch.manual_seed(0)
    unet = sources.load(source).pipeline.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def commands(args: argparse.Namespace, lora_file: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "diffprism.cli", "-q"]
    spec = f"{lora_file}:{args.scale:g}"
    return {
        "base": [*cli, "export", args.source, "--out", str(args.work / "base"), "--components", "unet"],
        "reexport": [*cli, "export", args.source, "--out", str(args.work / "reexport"), "--components", "unet",
                     "--lora", spec],
        "refit": [*cli, "refit", str(args.work / "base"), "--lora", spec, "--out", str(args.work / "refit")],
    }


def measure(cmd: list[str], log: Path, interval: float) -> dict:
    with open(log, "w") as out:
        code, seconds, peak = run_sampled(cmd, interval, cwd=ROOT, stdout=out, stderr=out)
    if code:
        raise SystemExit(f"failed ({code}), see {log}: {' '.join(cmd)}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2), "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    lora_file = make_lora(args.source, args.rank, args.work / "lora")
    rows = {name: measure(cmd, args.work / f"{name}.log", args.interval)
            for name, cmd in commands(args, lora_file).items()}
    result = {"source": args.source, "rank": args.rank, **rows,
              "refit_vs_reexport": {"time": round(rows["refit"]["seconds"] / rows["reexport"]["seconds"], 2),
                                    "rss": round(rows["refit"]["peak_rss_gb"] / max(rows["reexport"]["peak_rss_gb"],
                                                                                    1e-9), 2)}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        for name in rows:
            shutil.rmtree(args.work / name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
