"""Geometry: the facts about a pipeline every spec, target, runner and check needs, computed once.

`compute` reads them from the loaded pipeline at export; the export writes them into the tree info
(onnx/diffprism.json, "geometry") and everything downstream reads them from there through
exporters.tree.geometry. Nothing re-derives them from configs or axis scales.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from exporters.errors import ShapeError, SourceError
from exporters.spec import Dim, ShapeRequest


@dataclass(frozen=True)
class Geometry:
    family: str
    vae_scale_factor: int  # pixels per latent cell
    latent_channels: int  # channels of the VAE's latents (the pipeline's initial noise)
    latent_multiple: int  # latent H/W must be multiples of this (UNet downsampling, transformer patch)
    default_latent: int  # the denoiser's preferred latent side (its sample_size)
    denoiser: str  # component name of the denoiser
    denoiser_kind: str
    guidance: bool  # the denoiser runs under classifier-free guidance (2 latents per image)
    max_sequence: Mapping[str, int] = field(default_factory=dict)  # per text encoder
    vocab_size: Mapping[str, int] = field(default_factory=dict)  # per text encoder
    scaling_factor: float = 1.0  # VAE latents scaling
    shift_factor: float | None = None  # VAE latents shift (SD3, Flux)
    t5_sequence: int = 0  # T5 tokens the pipeline pads to (SD3 256, Flux 512); 0: no T5 dim
    latent_packing: int = 1  # the denoiser takes p x p latent patches packed into tokens (Flux: 2)
    guided: tuple[str, ...] = ()  # components besides the denoiser on its guidance batch (a ControlNet)

    @property
    def pixel_multiple(self) -> int:
        return self.latent_multiple * self.vae_scale_factor

    @property
    def default_size(self) -> int:
        return self.default_latent * self.vae_scale_factor

    def batch_factor(self, component: str) -> int:
        """Batch of `component` per image: the denoiser sees 2 latents per image under guidance."""
        return 2 if self.guidance and (component == self.denoiser or component in self.guided) else 1

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["guided"] = list(self.guided)
        if not self.guided:
            del data["guided"]  # trees without a ControlNet keep their geometry record (and stage keys)
        data["max_sequence"] = dict(self.max_sequence)
        data["vocab_size"] = dict(self.vocab_size)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Geometry":
        data = dict(data)
        data["guided"] = tuple(data.get("guided", ()))
        return cls(**data)


def compute(pipe: Any, family: Any) -> Geometry:
    """The pipeline's geometry, asked of the exporter kinds of its components (exporters.families)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise SourceError("the pipeline has no VAE, which relates pixels to latents", "load the whole pipeline")
    max_sequence, vocab = {}, {}
    # The T5 length is the pipeline's padding (max_sequence_length), also when an optional T5 is absent.
    t5_sequence = max((c.t5_sequence for c in family.components), default=0)
    denoiser, guided = None, []
    for name in family.present(pipe):
        exporter = family.exporter(pipe, name)
        if exporter.guided:
            guided.append(name)
        if exporter.role == "text_encoder":
            component = family.component(name)
            tokenizer = getattr(pipe, component.tokenizer, None) if component.tokenizer else None
            limit, vocab[name] = exporter.text_facts(exporter.module(pipe), tokenizer)
            if exporter.sequence_dim == "t5_sequence":
                t5_sequence = min(limit, component.t5_sequence or limit)
            else:
                max_sequence[name] = limit
        elif exporter.role == "denoiser":
            denoiser = exporter
    if denoiser is None:
        raise SourceError("the pipeline has no denoiser (UNet or transformer)", "load the whole pipeline")
    multiple, default_latent = denoiser.latent_facts(denoiser.module(pipe))
    c = vae.config
    scale = 2 ** (len(c.block_out_channels) - 1)
    shift = c.get("shift_factor")
    return Geometry(
        family=family.name,
        vae_scale_factor=scale,
        latent_channels=c.latent_channels,
        latent_multiple=multiple,
        default_latent=default_latent or c.sample_size // scale,
        denoiser=denoiser.name,
        denoiser_kind=denoiser.kind,
        guidance=family.guidance,
        max_sequence=max_sequence,
        vocab_size=vocab,
        scaling_factor=float(c.get("scaling_factor", 1.0)),
        shift_factor=None if shift is None else float(shift),
        t5_sequence=t5_sequence,
        latent_packing=denoiser.latent_packing,
        guided=tuple(guided),
    )


def image_range(geometry: Geometry, shapes: ShapeRequest) -> tuple[int, int, int]:
    """Pixel range asked for (default: half to double the model's size), checked against the latent multiple."""
    step = geometry.pixel_multiple
    if shapes.image is None:
        opt = geometry.default_latent
        lo = max(geometry.latent_multiple, _round_down(opt // 2, geometry.latent_multiple))
        return lo * geometry.vae_scale_factor, opt * geometry.vae_scale_factor, 2 * opt * geometry.vae_scale_factor
    for label, px in zip(("min", "opt", "max"), shapes.image):
        if px % step:
            raise ShapeError(
                f"image size {label}={px} px is not a multiple of {step} "
                f"(latents must be multiples of {geometry.latent_multiple}, VAE scale {geometry.vae_scale_factor})",
                f"use a multiple of {step}, e.g. {max(step, px - px % step)}",
            )
    return shapes.image


def dims_for(geometry: Geometry, shapes: ShapeRequest, exporter: Any) -> dict[str, Dim]:
    """One component's dims from a request in the pipeline's terms: images, pixels, tokens."""
    factor = geometry.batch_factor(exporter.name)
    batch = Dim("batch", *(b * factor for b in shapes.batch))
    latent = tuple(px // geometry.vae_scale_factor for px in image_range(geometry, shapes))
    height = Dim("height", *latent, multiple_of=geometry.latent_multiple)
    width = Dim("width", *latent, multiple_of=geometry.latent_multiple)
    limit = exporter.sequence_limit(geometry)
    seq = shapes.sequence or (limit,) * 3
    if seq[2] > limit:
        raise ShapeError(
            f"sequence length {seq[2]} exceeds {exporter.name}'s {limit} positions",
            f"use at most {limit}",
        )
    dims = {"batch": batch, "height": height, "width": width, "sequence": Dim("sequence", *seq)}
    if geometry.t5_sequence:
        t5 = shapes.t5_sequence or (geometry.t5_sequence,) * 3
        if t5[2] > geometry.t5_sequence:
            raise ShapeError(
                f"T5 sequence length {t5[2]} exceeds the pipeline's {geometry.t5_sequence} tokens",
                f"use at most {geometry.t5_sequence}",
            )
        dims["t5_sequence"] = Dim("t5_sequence", *t5)
    return dims


def _round_down(value: int, multiple: int) -> int:
    return value - value % multiple
