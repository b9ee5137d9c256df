"""Pipeline families: which components a pipeline class splits into, and its geometry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporters.components import Geometry
from exporters.errors import SourceError, UsageError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]
    components: tuple[str, ...]
    tokenizers: tuple[str, ...]


FAMILIES = (
    Family(
        "sd",
        ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
        ("text_encoder", "unet", "vae_encoder", "vae_decoder"),
        ("tokenizer",),
    ),
    Family(
        "sdxl",
        ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
        ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"),
        ("tokenizer", "tokenizer_2"),
    ),
)

SUPPORTED = sorted(c for f in FAMILIES for c in f.pipeline_classes)


def family_of(class_name: str) -> Family:
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    raise SourceError(
        f"unsupported pipeline class '{class_name}'",
        f"diffprism exports {', '.join(SUPPORTED)}",
    )


def select_components(family: Family, requested: list[str] | None) -> list[str]:
    if not requested:
        return list(family.components)
    unknown = [c for c in requested if c not in family.components]
    if unknown:
        raise UsageError(
            f"unknown component(s) {unknown} for a {family.name} pipeline",
            f"choose from {list(family.components)}",
        )
    return [c for c in family.components if c in requested]  # canonical order


def geometry_of(pipe: Any, family: Family) -> Geometry:
    unet = getattr(pipe, "unet", None)
    vae = getattr(pipe, "vae", None)
    tokenizer = getattr(pipe, "tokenizer", None)
    text_encoder = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    if unet is not None:
        ups = len(unet.config.down_block_types) - 1
        multiple = max(8, 2**ups)
        default_latent = unet.config.sample_size
        latent_channels = unet.config.in_channels
    else:
        multiple, default_latent = 8, 64
        latent_channels = vae.config.latent_channels if vae is not None else 4
    max_seq = getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77
    if text_encoder is not None:
        max_seq = min(max_seq, text_encoder.config.max_position_embeddings)
        vocab = text_encoder.config.vocab_size
    else:
        vocab = len(tokenizer) if tokenizer is not None else 49408
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))  # generated ids must be valid for both
    return Geometry(vae_scale, latent_channels, multiple, default_latent, max_seq, vocab, family.name)
