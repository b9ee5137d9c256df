"""Argument helpers shared by subcommands."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from exporters.errors import UsageError
from exporters.spec import ShapeRequest


def add_components(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--components", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                        help="comma-separated subset, e.g. unet,vae_decoder (default: all)")


def add_shapes(parser: argparse.ArgumentParser) -> None:
    default = ":".join(str(n) for n in ShapeRequest().batch)  # one default for the CLI and recipes
    parser.add_argument("--batch", default=default, help=f"images per call, N or MIN:OPT:MAX (default {default}); text "
                        "encoders and VAE run per image, the denoiser at twice that under classifier-free guidance")
    parser.add_argument("--size", help="image size range in pixels, N or MIN:OPT:MAX (default: half to double "
                        "the model's native size)")
    parser.add_argument("--sequence", help="token sequence range (default: the tokenizer's max length, static)")
    parser.add_argument("--t5-sequence", help="T5 token range for SD3/Flux (default: the pipeline's "
                        "max_sequence_length, 256 for SD3 and 512 for Flux, static)")


def shapes_from(args: argparse.Namespace) -> ShapeRequest:
    return ShapeRequest(
        batch=ShapeRequest.parse_range(args.batch, "batch"),
        image=ShapeRequest.parse_range(args.size, "size") if args.size else None,
        sequence=ShapeRequest.parse_range(args.sequence, "sequence") if args.sequence else None,
        t5_sequence=ShapeRequest.parse_range(args.t5_sequence, "t5 sequence") if args.t5_sequence else None,
    )


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """--option KEY=VALUE pairs; values are parsed as JSON where they can be (numbers, true/false, lists)."""
    import json

    options: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--option '{item}' is not KEY=VALUE", "write e.g. --option static=true")
        key, value = item.split("=", 1)
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return options


def out_dir(text: str) -> Path:
    return Path(text).expanduser()
