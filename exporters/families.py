"""Pipeline families as data: the components a pipeline class splits into, and how its pipeline runs.

A family is one declaration. Each component names the pipeline attribute it reads, whether it may be
absent, its tokenizer and the extra outputs the pipeline consumes; its exporter kind follows from
the module's class (exporters.components.KIND_BY_CLASS), or is fixed for the two VAE halves.
Nothing outside this table branches on the family's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporters.components import KINDS, ComponentExporter, kind_of
from exporters.errors import SourceError, UsageError


@dataclass(frozen=True)
class Component:
    name: str
    attribute: str = ""  # pipeline attribute read ("" = the name)
    optional: bool = False  # the pipeline also runs without it (e.g. SD3's T5 encoder)
    kind: str | None = None  # fixed kind; None: from the module's class
    tokenizer: str | None = None  # the tokenizer feeding a text encoder
    outputs: tuple[str, ...] = ()  # extra outputs the pipeline consumes ("hidden_states")
    generation: bool = True  # text-to-image runs it (the VAE encoder is for image-to-image)
    t5_sequence: int = 0  # a T5 encoder: the tokens its pipeline pads to (the max_sequence_length default)
    controlled: bool = False  # a denoiser taking a ControlNet's residuals: its kind's `controlled_kind`

    @property
    def source(self) -> str:
        return self.attribute or self.name


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]  # the first one is text-to-image
    components: tuple[Component, ...]
    guidance: bool  # the denoiser runs under classifier-free guidance (2 latents per image)
    # (Flux has none: a guidance-distilled transformer takes the scale as an input instead)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(c.tokenizer for c in self.components if c.tokenizer)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise UsageError(f"unknown component '{name}' for a {self.name} pipeline", f"choose from {list(self.names)}")

    def exporter(self, pipe: Any, name: str) -> ComponentExporter:
        """The exporter of one component, its kind chosen by what the module is."""
        c = self.component(name)
        kind = c.kind
        if kind is None:
            module = getattr(pipe, c.source, None)
            if module is None:
                raise SourceError(f"the pipeline has no '{c.source}' (needed for component '{name}')",
                                  "add the component to the model folder or leave it out with --components")
            kind = kind_of(module, name)
        if c.controlled:
            controlled = KINDS[kind].controlled_kind
            if controlled is None:
                raise SourceError(f"component '{name}' ({kind}) cannot take ControlNet residuals",
                                  "use a UNet pipeline for ControlNet")
            kind = controlled
        return KINDS[kind](name=c.name, attribute=c.source, outputs=c.outputs)

    def present(self, pipe: Any) -> list[str]:
        """Components the pipeline holds (optional ones may be None)."""
        return [c.name for c in self.components if not (c.optional and getattr(pipe, c.source, None) is None)]

    def generation_components(self, exported: Any) -> list[str]:
        """Components text-to-image needs, given the exported names (optional ones only if exported)."""
        return [c.name for c in self.components if c.generation and (not c.optional or c.name in exported)]


def _clip(name: str, tokenizer: str, hidden_states: bool = False, optional: bool = False) -> Component:
    return Component(name, tokenizer=tokenizer, outputs=("hidden_states",) if hidden_states else (), optional=optional)


VAE = (Component("vae_encoder", "vae", kind="vae_encoder", generation=False),
       Component("vae_decoder", "vae", kind="vae_decoder"))

FAMILIES = (
    Family(
        "sd",
        ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
        (_clip("text_encoder", "tokenizer"), Component("unet"), *VAE),
        guidance=True,
    ),
    Family(
        "sdxl",
        ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
        # SDXL conditions on the penultimate hidden state of both CLIP encoders.
        (_clip("text_encoder", "tokenizer", hidden_states=True), _clip("text_encoder_2", "tokenizer_2", True),
         Component("unet"), *VAE),
        guidance=True,
    ),
    # Latent Consistency Models: an SD 1.x layout whose UNet takes the guidance scale as an embedding
    # (timestep_cond), so no classifier-free guidance batch.
    Family(
        "lcm",
        ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline"),
        (_clip("text_encoder", "tokenizer"), Component("unet"), *VAE),
        guidance=False,
    ),
    # ControlNet pipelines: the ControlNet is its own component; the UNet takes its residuals as inputs.
    Family(
        "sd-controlnet",
        ("StableDiffusionControlNetPipeline",),
        (_clip("text_encoder", "tokenizer"), Component("controlnet"), Component("unet", controlled=True), *VAE),
        guidance=True,
    ),
    Family(
        "sdxl-controlnet",
        ("StableDiffusionXLControlNetPipeline",),
        (_clip("text_encoder", "tokenizer", hidden_states=True), _clip("text_encoder_2", "tokenizer_2", True),
         Component("controlnet"), Component("unet", controlled=True), *VAE),
        guidance=True,
    ),
    # SD3/3.5: CLIP-L and CLIP-G with projection (pooled text_embeds + penultimate hidden state), a T5
    # encoder (optional: the pipeline pads zeros without it), an MMDiT, a 16-channel VAE.
    Family(
        "sd3",
        ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
        (_clip("text_encoder", "tokenizer", True), _clip("text_encoder_2", "tokenizer_2", True),
         Component("text_encoder_3", tokenizer="tokenizer_3", optional=True, t5_sequence=256),
         Component("transformer"), *VAE),
        guidance=True,
    ),
    # Flux.1: CLIP-L (pooled output), T5 (sequence), a transformer over 2x2-packed latents.
    Family(
        "flux",
        ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
        (_clip("text_encoder", "tokenizer"), Component("text_encoder_2", tokenizer="tokenizer_2", t5_sequence=512),
         Component("transformer"), *VAE),
        guidance=False,
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


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise SourceError(f"unknown pipeline family '{name}' in the tree info", "re-export with this diffprism version")


def exporter_for(pipe: Any, name: str) -> ComponentExporter:
    """The exporter of component `name` of a loaded pipeline."""
    return family_of(type(pipe).__name__).exporter(pipe, name)


def select_components(family: Family, requested: list[str] | None, pipe: Any = None) -> list[str]:
    available = family.present(pipe) if pipe is not None else list(family.names)
    if not requested:
        return available
    unknown = [c for c in requested if c not in family.names]
    if unknown:
        raise UsageError(
            f"unknown component(s) {unknown} for a {family.name} pipeline",
            f"choose from {list(family.names)}",
        )
    absent = [c for c in requested if c not in available]
    if absent:
        raise SourceError(f"the pipeline has no {absent}", f"it holds {available}")
    return [c for c in family.names if c in requested]  # canonical order
