"""One exporter per component kind: its spec, a clean tensor-in/tensor-out wrapper, its config.

Tensor and component names follow diffusers and optimum, so optimum's ONNX loaders
and diffusers' own pipelines find what they expect.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from exporters.errors import ShapeError
from exporters.spec import Axis, ComponentSpec, Dim, ShapeRequest, TensorSpec

B = Axis("batch")
S = Axis("sequence")
H = Axis("height")
W = Axis("width")


@dataclass(frozen=True)
class Geometry:
    """Facts about a pipeline that every component spec needs."""

    vae_scale_factor: int
    latent_channels: int
    latent_multiple: int  # latent H/W must be multiples of this (the UNet's upsamplers)
    default_latent: int  # the UNet's sample_size
    max_sequence: int  # tokenizer model_max_length
    vocab_size: int
    family: str  # "sd" or "sdxl"


def dims_for(geometry: Geometry, shapes: ShapeRequest) -> dict[str, Dim]:
    """Turn a pixel/batch request into latent-space dims, with clear errors for impossible requests."""
    batch = Dim("batch", *shapes.batch)
    step = geometry.latent_multiple * geometry.vae_scale_factor
    if shapes.image is None:
        opt = geometry.default_latent
        lo = max(geometry.latent_multiple, _round_down(opt // 2, geometry.latent_multiple))
        image = (lo * geometry.vae_scale_factor, opt * geometry.vae_scale_factor, 2 * opt * geometry.vae_scale_factor)
    else:
        image = shapes.image
    for label, px in zip(("min", "opt", "max"), image):
        if px % step:
            raise ShapeError(
                f"image size {label}={px} px is not a multiple of {step} "
                f"(latents must be multiples of {geometry.latent_multiple}, VAE scale {geometry.vae_scale_factor})",
                f"use a multiple of {step}, e.g. {max(step, px - px % step)}",
            )
    latent = tuple(px // geometry.vae_scale_factor for px in image)
    height = Dim("height", *latent, multiple_of=geometry.latent_multiple)
    width = Dim("width", *latent, multiple_of=geometry.latent_multiple)
    seq = shapes.sequence or (geometry.max_sequence,) * 3
    if seq[2] > geometry.max_sequence:
        raise ShapeError(
            f"sequence length {seq[2]} exceeds the text encoder's {geometry.max_sequence} positions",
            f"use at most {geometry.max_sequence}",
        )
    sequence = Dim("sequence", *seq)
    return {"batch": batch, "height": height, "width": width, "sequence": sequence}


def _round_down(value: int, multiple: int) -> int:
    return value - value % multiple


def _f32(name: str, *axes: int | Axis) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(axes))


class ComponentExporter(ABC):
    """Base: subclasses name the component, the pipeline attribute it reads, and its I/O."""

    name: str
    attribute: str

    def module(self, pipe: Any) -> nn.Module:
        module = getattr(pipe, self.attribute, None)
        if module is None:
            from exporters.errors import SourceError

            raise SourceError(
                f"the pipeline has no '{self.attribute}' (needed for component '{self.name}')",
                "add the component to the model folder or leave it out with --components",
            )
        return module

    @abstractmethod
    def spec(self, pipe: Any, geometry: Geometry, dims: dict[str, Dim]) -> ComponentSpec:
        """The component's inputs and outputs with their dims."""

    @abstractmethod
    def wrap(self, module: nn.Module, spec: ComponentSpec) -> nn.Module:
        """A module whose forward takes the spec's inputs positionally and returns its outputs."""

    def config(self, module: nn.Module) -> dict[str, Any]:
        cfg = module.config
        return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


# --- text encoders -----------------------------------------------------------------------


class _TextEncoderWrapper(nn.Module):
    def __init__(self, encoder: nn.Module, output_names: list[str], hidden_states: bool):
        super().__init__()
        self.encoder = encoder
        self.output_names = output_names
        self.hidden_states = hidden_states

    def forward(self, input_ids: torch.Tensor):
        out = self.encoder(input_ids, output_hidden_states=self.hidden_states, return_dict=True)
        values = []
        for name in self.output_names:
            if name.startswith("hidden_states."):
                values.append(out.hidden_states[int(name.split(".")[1])])
            else:
                values.append(out[name])
        return tuple(values)


class TextEncoderExporter(ComponentExporter):
    def __init__(self, name: str):
        self.name = name
        self.attribute = name

    def spec(self, pipe, geometry, dims):
        enc = self.module(pipe)
        hidden = enc.config.hidden_size
        with_projection = type(enc).__name__.endswith("WithProjection")
        outputs = []
        if with_projection:
            outputs.append(_f32("text_embeds", B, enc.config.projection_dim))
        outputs.append(_f32("last_hidden_state", B, S, hidden))
        if not with_projection:
            outputs.append(_f32("pooler_output", B, hidden))
        if geometry.family == "sdxl":  # SDXL conditions on the penultimate hidden state
            outputs += [_f32(f"hidden_states.{i}", B, S, hidden) for i in range(enc.config.num_hidden_layers + 1)]
        ids = TensorSpec("input_ids", "int64", (B, S), value_range=(0, geometry.vocab_size))
        return ComponentSpec(self.name, (ids,), tuple(outputs), (dims["batch"], dims["sequence"]))

    def wrap(self, module, spec):
        hidden = any(n.startswith("hidden_states.") for n in spec.output_names)
        return _TextEncoderWrapper(module, spec.output_names, hidden)

    def config(self, module):
        return module.config.to_dict()


# --- UNet ------------------------------------------------------------------------------


class _UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module, sdxl: bool):
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class UNetExporter(ComponentExporter):
    name = "unet"
    attribute = "unet"

    def spec(self, pipe, geometry, dims):
        unet = self.module(pipe)
        c = unet.config
        latent = c.in_channels
        inputs = [
            _f32("sample", B, latent, H, W),
            TensorSpec("timestep", "float32", (B,), value_range=(0, 1000)),
            _f32("encoder_hidden_states", B, S, c.cross_attention_dim),
        ]
        if c.addition_embed_type == "text_time":
            time_dim = 6 * c.addition_time_embed_dim
            inputs += [
                _f32("text_embeds", B, c.projection_class_embeddings_input_dim - time_dim),
                _f32("time_ids", B, 6),
            ]
        outputs = (_f32("out_sample", B, c.out_channels, H, W),)
        return ComponentSpec(
            "unet", tuple(inputs), outputs, (dims["batch"], dims["height"], dims["width"], dims["sequence"])
        )

    def wrap(self, module, spec):
        return _UNetWrapper(module, "time_ids" in spec.input_names)


# --- VAE -------------------------------------------------------------------------------


class _VaeEncoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters


class _VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderExporter(ComponentExporter):
    name = "vae_encoder"
    attribute = "vae"

    def spec(self, pipe, geometry, dims):
        vae = self.module(pipe)
        f = geometry.vae_scale_factor
        inputs = (_f32("sample", B, vae.config.in_channels, Axis("height", f), Axis("width", f)),)
        outputs = (_f32("latent_parameters", B, 2 * vae.config.latent_channels, H, W),)
        return ComponentSpec("vae_encoder", inputs, outputs, (dims["batch"], dims["height"], dims["width"]))

    def wrap(self, module, spec):
        return _VaeEncoderWrapper(module)


class VaeDecoderExporter(ComponentExporter):
    name = "vae_decoder"
    attribute = "vae"

    def spec(self, pipe, geometry, dims):
        vae = self.module(pipe)
        f = geometry.vae_scale_factor
        inputs = (_f32("latent_sample", B, vae.config.latent_channels, H, W),)
        outputs = (_f32("sample", B, vae.config.out_channels, Axis("height", f), Axis("width", f)),)
        return ComponentSpec("vae_decoder", inputs, outputs, (dims["batch"], dims["height"], dims["width"]))

    def wrap(self, module, spec):
        return _VaeDecoderWrapper(module)


EXPORTERS: dict[str, ComponentExporter] = {
    e.name: e
    for e in (
        TextEncoderExporter("text_encoder"),
        TextEncoderExporter("text_encoder_2"),
        UNetExporter(),
        VaeEncoderExporter(),
        VaeDecoderExporter(),
    )
}
