"""Exporter kinds: one per kind of module (CLIP text, UNet, VAE half, ...): its spec, a clean
tensor-in/tensor-out wrapper, its config.

A kind follows from the module's class (KIND_BY_CLASS), never from the component's name: in SDXL
`text_encoder_2` is a CLIP encoder with projection, in Flux a T5 encoder. Families
(exporters.families) say which components a pipeline has; an exporter instance is built as
`KINDS[kind](name=..., attribute=...)`.

Tensor and component names follow diffusers and optimum, so optimum's ONNX loaders
and diffusers' own pipelines find what they expect.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from exporters.errors import SourceError
from exporters.spec import Axis, ComponentSpec, Dim, TensorSpec

if TYPE_CHECKING:
    from exporters.geometry import Geometry

B = Axis("batch")
S = Axis("sequence")
H = Axis("height")
W = Axis("width")


def _f32(name: str, *axes: int | Axis) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(axes))


class ComponentExporter(ABC):
    """Base of every kind. `outputs` names extra outputs the family's pipeline consumes
    (e.g. "hidden_states": SDXL and SD3 condition on a CLIP encoder's penultimate layer)."""

    kind: str
    role: str = "other"  # "text_encoder", "denoiser" or "vae": what geometry asks the kind about

    def __init__(self, name: str, attribute: str | None = None, outputs: tuple[str, ...] = ()):
        self.name = name
        self.attribute = attribute or name
        self.outputs = tuple(outputs)

    def module(self, pipe: Any) -> nn.Module:
        module = getattr(pipe, self.attribute, None)
        if module is None:
            raise SourceError(
                f"the pipeline has no '{self.attribute}' (needed for component '{self.name}')",
                "add the component to the model folder or leave it out with --components",
            )
        return module

    @abstractmethod
    def spec(self, pipe: Any, geometry: "Geometry", dims: dict[str, Dim]) -> ComponentSpec:
        """The component's inputs and outputs with their dims."""

    @abstractmethod
    def wrap(self, module: nn.Module, spec: ComponentSpec) -> nn.Module:
        """A module whose forward takes the spec's inputs positionally and returns its outputs."""

    def config(self, module: nn.Module) -> dict[str, Any]:
        cfg = module.config
        return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)

    def sequence_limit(self, geometry: "Geometry") -> int:
        """Upper bound of this component's `sequence` dim (the text it is conditioned on)."""
        return min(geometry.max_sequence.values()) if geometry.max_sequence else 1

    # Geometry facts a kind knows about its module (exporters.geometry asks by role).
    def text_facts(self, module: nn.Module, tokenizer: Any) -> tuple[int, int]:
        """(max sequence, vocab size) of a text encoder."""
        raise TypeError(f"{self.kind} is not a text encoder")

    def latent_facts(self, module: nn.Module) -> tuple[int, int]:
        """(latent multiple, default latent side) of a denoiser."""
        raise TypeError(f"{self.kind} is not a denoiser")


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


class ClipTextExporter(ComponentExporter):
    """CLIPTextModel: last_hidden_state and pooler_output (+ every hidden state if the family consumes them)."""

    kind = "clip_text"
    role = "text_encoder"

    def _main_outputs(self, enc: nn.Module) -> list[TensorSpec]:
        hidden = enc.config.hidden_size
        return [_f32("last_hidden_state", B, S, hidden), _f32("pooler_output", B, hidden)]

    def spec(self, pipe, geometry, dims):
        enc = self.module(pipe)
        hidden = enc.config.hidden_size
        outputs = self._main_outputs(enc)
        if "hidden_states" in self.outputs:
            outputs += [_f32(f"hidden_states.{i}", B, S, hidden) for i in range(enc.config.num_hidden_layers + 1)]
        ids = TensorSpec("input_ids", "int64", (B, S), value_range=(0, geometry.vocab_size[self.name]))
        return ComponentSpec(self.name, (ids,), tuple(outputs), (dims["batch"], dims["sequence"]))

    def wrap(self, module, spec):
        hidden = any(n.startswith("hidden_states.") for n in spec.output_names)
        return _TextEncoderWrapper(module, spec.output_names, hidden)

    def config(self, module):
        return module.config.to_dict()

    def sequence_limit(self, geometry):
        return geometry.max_sequence[self.name]

    def text_facts(self, module, tokenizer):
        max_seq = min(getattr(tokenizer, "model_max_length", 77), module.config.max_position_embeddings)
        vocab = module.config.vocab_size
        if tokenizer is not None:
            vocab = min(vocab, len(tokenizer))  # generated ids must be valid for both
        return max_seq, vocab


class ClipTextProjectionExporter(ClipTextExporter):
    """CLIPTextModelWithProjection: text_embeds (the pooled projection) and last_hidden_state."""

    kind = "clip_text_projection"

    def _main_outputs(self, enc):
        return [_f32("text_embeds", B, enc.config.projection_dim),
                _f32("last_hidden_state", B, S, enc.config.hidden_size)]


# --- UNet ------------------------------------------------------------------------------


class _UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module, added_cond: bool):
        super().__init__()
        self.unet = unet
        self.added_cond = added_cond

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.added_cond else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class UNetExporter(ComponentExporter):
    kind = "unet"
    role = "denoiser"

    def spec(self, pipe, geometry, dims):
        unet = self.module(pipe)
        c = unet.config
        inputs = [
            _f32("sample", B, c.in_channels, H, W),
            TensorSpec("timestep", "float32", (B,), value_range=(0, 1000)),
            _f32("encoder_hidden_states", B, S, c.cross_attention_dim),
        ]
        if c.addition_embed_type == "text_time":  # SDXL's added conditioning
            time_dim = 6 * c.addition_time_embed_dim
            inputs += [
                _f32("text_embeds", B, c.projection_class_embeddings_input_dim - time_dim),
                _f32("time_ids", B, 6),
            ]
        outputs = (_f32("out_sample", B, c.out_channels, H, W),)
        return ComponentSpec(
            self.name, tuple(inputs), outputs, (dims["batch"], dims["height"], dims["width"], dims["sequence"])
        )

    def wrap(self, module, spec):
        return _UNetWrapper(module, "time_ids" in spec.input_names)

    def latent_facts(self, module):
        ups = len(module.config.down_block_types) - 1
        return max(8, 2**ups), module.config.sample_size


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
    kind = "vae_encoder"
    role = "vae"

    def spec(self, pipe, geometry, dims):
        vae = self.module(pipe)
        f = geometry.vae_scale_factor
        inputs = (_f32("sample", B, vae.config.in_channels, Axis("height", f), Axis("width", f)),)
        outputs = (_f32("latent_parameters", B, 2 * vae.config.latent_channels, H, W),)
        return ComponentSpec(self.name, inputs, outputs, (dims["batch"], dims["height"], dims["width"]))

    def wrap(self, module, spec):
        return _VaeEncoderWrapper(module)


class VaeDecoderExporter(ComponentExporter):
    kind = "vae_decoder"
    role = "vae"

    def spec(self, pipe, geometry, dims):
        vae = self.module(pipe)
        f = geometry.vae_scale_factor
        inputs = (_f32("latent_sample", B, vae.config.latent_channels, H, W),)
        outputs = (_f32("sample", B, vae.config.out_channels, Axis("height", f), Axis("width", f)),)
        return ComponentSpec(self.name, inputs, outputs, (dims["batch"], dims["height"], dims["width"]))

    def wrap(self, module, spec):
        return _VaeDecoderWrapper(module)


# --- registry --------------------------------------------------------------------------

KINDS: dict[str, type[ComponentExporter]] = {
    k.kind: k for k in (ClipTextExporter, ClipTextProjectionExporter, UNetExporter, VaeEncoderExporter,
                        VaeDecoderExporter)
}

# Module class name -> kind. A subclass finds its kind through its base classes (kind_of).
KIND_BY_CLASS: dict[str, str] = {
    "CLIPTextModel": "clip_text",
    "CLIPTextModelWithProjection": "clip_text_projection",
    "UNet2DConditionModel": "unet",
}


def kind_of(module: nn.Module, component: str) -> str:
    for cls in type(module).__mro__:
        if cls.__name__ in KIND_BY_CLASS:
            return KIND_BY_CLASS[cls.__name__]
    raise SourceError(
        f"component '{component}' is a {type(module).__name__}, which diffprism has no exporter for",
        f"supported module classes: {', '.join(sorted(KIND_BY_CLASS))}",
    )
