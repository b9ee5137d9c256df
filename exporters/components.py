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
from exporters.spec import Axis, ComponentSpec, Dim, TensorSpec, derived

if TYPE_CHECKING:
    from exporters.geometry import Geometry

B = Axis("batch")
S = Axis("sequence")
T5 = Axis("t5_sequence")  # T5 tokens: their own dim, apart from CLIP's 77
H = Axis("height")
W = Axis("width")


def _f32(name: str, *axes: int | Axis) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(axes))


class ComponentExporter(ABC):
    """Base of every kind. `outputs` names extra outputs the family's pipeline consumes
    (e.g. "hidden_states": SDXL and SD3 condition on a CLIP encoder's penultimate layer)."""

    kind: str
    role: str = "other"  # "text_encoder", "denoiser" or "vae": what geometry asks the kind about
    sequence_dim: str = "sequence"  # a text encoder's token dim (T5's is "t5_sequence")
    latent_packing: int = 1  # a denoiser taking p x p latent patches packed into tokens (Flux: 2)
    guided = False  # besides the denoiser, runs on its classifier-free guidance batch (a ControlNet)
    controlled_kind: str | None = None  # the kind taking a ControlNet's residuals, if any

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

    def latent_facts(self, module: nn.Module) -> tuple[int, int | None]:
        """(latent multiple, default latent side or None: the VAE's sample size) of a denoiser."""
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


class _T5Wrapper(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        # Eager attention: the SDPA path leaves a transposed output whose reshape torch.onnx cannot
        # decompose with a dynamic batch. Same math; set for this call only.
        config = self.encoder.config
        saved = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            return self.encoder(input_ids, return_dict=False)[0]
        finally:
            config._attn_implementation = saved


class T5EncoderExporter(ComponentExporter):
    """T5EncoderModel (SD3's text_encoder_3, Flux's text_encoder_2): input_ids -> last_hidden_state, as optimum names them."""

    kind = "t5_encoder"
    role = "text_encoder"
    sequence_dim = "t5_sequence"

    def spec(self, pipe, geometry, dims):
        enc = self.module(pipe)
        ids = TensorSpec("input_ids", "int64", (B, T5), value_range=(0, geometry.vocab_size[self.name]))
        out = _f32("last_hidden_state", B, T5, enc.config.d_model)
        return ComponentSpec(self.name, (ids,), (out,), (dims["batch"], dims["t5_sequence"]))

    def wrap(self, module, spec):
        return _T5Wrapper(module)

    def text_facts(self, module, tokenizer):
        vocab = module.config.vocab_size
        if tokenizer is not None:
            vocab = min(vocab, len(tokenizer))
        return getattr(tokenizer, "model_max_length", 512), vocab


# --- UNet ------------------------------------------------------------------------------


class _UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module, extra_names: list[str]):
        super().__init__()
        self.unet = unet
        self.extra_names = extra_names  # the spec's inputs after encoder_hidden_states, in order

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        # The optional inputs (timestep_cond, SDXL's added conditioning, a ControlNet's residuals) map by
        # the spec's names; their count follows the model, so they come as *args (see trace._by_signature).
        extra = dict(zip(self.extra_names, rest))
        # `timestep` is (1,) or (batch,): index it per sample so the graph broadcasts one timestep
        # (what optimum's UNet loaders feed) without tying its size to the batch, which torch.export
        # would otherwise do (diffusers' expand) and ONNX Runtime then takes as equal sizes.
        count = torch.ones_like(timestep, dtype=torch.int64).sum()
        index = torch.minimum(torch.arange(sample.shape[0], device=sample.device), count - 1)
        added = {"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]} if "time_ids" in extra else None
        residuals = {}
        if MID_RESIDUAL in extra:
            residuals = {"down_block_additional_residuals": tuple(v for k, v in extra.items()
                                                                  if k.startswith(DOWN_RESIDUALS + ".")),
                         "mid_block_additional_residual": extra[MID_RESIDUAL]}
        return self.unet(sample, timestep[index], encoder_hidden_states, timestep_cond=extra.get("timestep_cond"),
                         added_cond_kwargs=added, return_dict=False, **residuals)[0]


def _unet_inputs(c: Any, timestep: Axis = B) -> list[TensorSpec]:
    """sample, timestep, encoder_hidden_states (+ SDXL's added conditioning): what a UNet and a ControlNet share."""
    inputs = [
        _f32("sample", B, c.in_channels, H, W),
        TensorSpec("timestep", "float32", (timestep,), value_range=(0, 1000)),
        _f32("encoder_hidden_states", B, S, c.cross_attention_dim),
    ]
    if c.addition_embed_type == "text_time":  # SDXL's added conditioning
        time_dim = 6 * c.addition_time_embed_dim
        inputs += [
            _f32("text_embeds", B, c.projection_class_embeddings_input_dim - time_dim),
            _f32("time_ids", B, 6),
        ]
    return inputs


def residual_layout(c: Any) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, latent divisor) of each down-block residual and of the mid-block one, from a
    UNet/ControlNet config: conv_in's output, each resnet's, each downsampler's."""
    channels = list(c.block_out_channels)
    layers = c.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    down, per = [(channels[0], 1)], 1
    for i, ch in enumerate(channels):
        down += [(ch, per)] * layers[i]
        if i < len(channels) - 1:
            per *= 2
            down.append((ch, per))
    return down, (channels[-1], per)


DOWN_RESIDUALS = "down_block_additional_residuals"  # the UNet's inputs, as diffusers' UNet forward names them
MID_RESIDUAL = "mid_block_additional_residual"
DOWN_SAMPLES = "down_block_res_samples"  # the ControlNet's outputs, as diffusers' ControlNetOutput names them
MID_SAMPLE = "mid_block_res_sample"


def _residual(name: str, channels: int, per: int) -> TensorSpec:
    return _f32(name, B, channels, Axis("height", per=per), Axis("width", per=per))


def residual_specs(c: Any, down_name: str, mid_name: str) -> list[TensorSpec]:
    down, (mid_ch, mid_per) = residual_layout(c)
    return [*(_residual(f"{down_name}.{i}", ch, per) for i, (ch, per) in enumerate(down)),
            _residual(mid_name, mid_ch, mid_per)]


class UNetExporter(ComponentExporter):
    kind = "unet"
    role = "denoiser"
    controlled_kind = "unet_controlled"  # the same UNet taking a ControlNet's residuals (Component.controlled)

    def spec(self, pipe, geometry, dims):
        unet = self.module(pipe)
        c = unet.config
        # The timestep has its own dim (a graph input name of its own), equal to the batch wherever
        # diffprism feeds it; the graph also takes one timestep for the whole batch (see _UNetWrapper).
        steps = derived("timestep_batch", (dims["batch"],))
        inputs = _unet_inputs(c, Axis("timestep_batch"))
        if c.get("time_cond_proj_dim"):  # LCM: the guidance scale as an embedding, as optimum names it
            inputs.insert(3, TensorSpec("timestep_cond", "float32", (B, c.time_cond_proj_dim), value_range=(-1, 1)))
        outputs = (_f32("out_sample", B, c.out_channels, H, W),)
        return ComponentSpec(
            self.name, tuple(inputs), outputs, (dims["batch"], dims["height"], dims["width"], dims["sequence"], steps)
        )

    def wrap(self, module, spec):
        return _UNetWrapper(module, spec.input_names[3:])

    def latent_facts(self, module):
        ups = len(module.config.down_block_types) - 1
        return max(8, 2**ups), module.config.sample_size


class ControlledUNetExporter(UNetExporter):
    """The UNet of a ControlNet pipeline: also takes the ControlNet's down-block and mid-block residuals
    (diffusers' argument names, one input per down-block residual: `down_block_additional_residuals.{i}`)."""

    kind = "unet_controlled"
    controlled_kind = None

    def spec(self, pipe, geometry, dims):
        base = super().spec(pipe, geometry, dims)
        residuals = residual_specs(self.module(pipe).config, DOWN_RESIDUALS, MID_RESIDUAL)
        return ComponentSpec(self.name, (*base.inputs, *residuals), base.outputs, base.dims)


# --- ControlNet ------------------------------------------------------------------------


class _ControlNetWrapper(nn.Module):
    def __init__(self, controlnet: nn.Module, added_cond: bool):
        super().__init__()
        self.controlnet = controlnet
        self.added_cond = added_cond

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        if self.added_cond:
            text_embeds, time_ids, controlnet_cond, conditioning_scale = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        else:
            (controlnet_cond, conditioning_scale), added = rest, None
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=conditioning_scale, added_cond_kwargs=added,
                                    guess_mode=False, return_dict=False)
        return (*down, mid)


class ControlNetExporter(ComponentExporter):
    """ControlNetModel: the UNet's inputs plus the control image (pixels) and a conditioning scale (an
    input, so it is not baked in) -> `down_block_res_samples.{i}` and `mid_block_res_sample`."""

    kind = "controlnet"
    role = "control"
    guided = True  # runs on the denoiser's classifier-free guidance batch

    def spec(self, pipe, geometry, dims):
        c = self.module(pipe).config
        f = geometry.vae_scale_factor
        inputs = [*_unet_inputs(c),
                  _f32("controlnet_cond", B, c.conditioning_channels, Axis("height", f), Axis("width", f)),
                  TensorSpec("conditioning_scale", "float32", (1,), value_range=(0.5, 1.5))]
        outputs = residual_specs(c, DOWN_SAMPLES, MID_SAMPLE)
        return ComponentSpec(self.name, tuple(inputs), tuple(outputs),
                             (dims["batch"], dims["height"], dims["width"], dims["sequence"]))

    def wrap(self, module, spec):
        return _ControlNetWrapper(module, "time_ids" in spec.input_names)


# --- diffusion transformers (DiT) ----------------------------------------------------------
# Names, dims and dtypes follow optimum's SD3TransformerOnnxConfig and FluxTransformerOnnxConfig
# (img_ids/txt_ids without a batch axis, int64), so optimum's ORT/OV pipelines load the tree.

TEXT = Axis("text_sequence")  # SD3: CLIP tokens + T5 tokens, concatenated
PACKED = Axis("packed")  # Flux: (latent height / 2) * (latent width / 2) tokens


class _SD3Wrapper(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class SD3TransformerExporter(ComponentExporter):
    """SD3Transformer2DModel (MMDiT) over patchified latents."""

    kind = "sd3_transformer"
    role = "denoiser"

    def spec(self, pipe, geometry, dims):
        c = self.module(pipe).config
        seq, t5 = dims["sequence"], dims["t5_sequence"]
        # The pipeline concatenates CLIP's tokens and T5's (zeros without T5) on the sequence axis.
        text = Dim("text_sequence", seq.min + t5.min, seq.opt + t5.opt, seq.max + t5.max)
        inputs = (
            _f32("hidden_states", B, c.in_channels, H, W),
            _f32("encoder_hidden_states", B, TEXT, c.joint_attention_dim),
            _f32("pooled_projections", B, c.pooled_projection_dim),
            TensorSpec("timestep", "float32", (B,), value_range=(0, 1000)),
        )
        outputs = (_f32("out_hidden_states", B, c.out_channels, H, W),)
        return ComponentSpec(self.name, inputs, outputs, (dims["batch"], dims["height"], dims["width"], text))

    def wrap(self, module, spec):
        return _SD3Wrapper(module)

    def latent_facts(self, module):
        return module.config.patch_size, module.config.sample_size


class _FluxWrapper(nn.Module):
    def __init__(self, transformer: nn.Module, guidance: bool):
        super().__init__()
        self.transformer = transformer
        self.guidance = guidance

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance if self.guidance else None,
                                return_dict=False)[0]


class FluxTransformerExporter(ComponentExporter):
    """FluxTransformer2DModel over 2x2-packed latents, with a guidance input when guidance-distilled (dev)."""

    kind = "flux_transformer"
    role = "denoiser"
    latent_packing = 2

    def spec(self, pipe, geometry, dims):
        c = self.module(pipe).config
        packed = derived("packed", (dims["height"], dims["width"]), per=self.latent_packing)
        inputs = [
            _f32("hidden_states", B, PACKED, c.in_channels),  # 2x2 patches of in_channels / 4 each
            _f32("encoder_hidden_states", B, T5, c.joint_attention_dim),
            _f32("pooled_projections", B, c.pooled_projection_dim),
            TensorSpec("timestep", "float32", (B,), value_range=(0, 1)),  # sigma; the model scales by 1000
            TensorSpec("img_ids", "int64", (PACKED, 3), value_range=(0, 64)),
            TensorSpec("txt_ids", "int64", (T5, 3), value_range=(0, 1)),
        ]
        if c.guidance_embeds:
            inputs.append(TensorSpec("guidance", "float32", (B,), value_range=(1, 5)))
        outputs = (_f32("out_hidden_states", B, PACKED, c.out_channels or c.in_channels),)
        return ComponentSpec(self.name, tuple(inputs), outputs,
                             (dims["batch"], dims["height"], dims["width"], packed, dims["t5_sequence"]))

    def wrap(self, module, spec):
        return _FluxWrapper(module, "guidance" in spec.input_names)

    def latent_facts(self, module):
        # Latents are packed 2x2 on top of the patch size; the model config has no sample size.
        return module.config.patch_size * self.latent_packing, None


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
    k.kind: k for k in (ClipTextExporter, ClipTextProjectionExporter, T5EncoderExporter, UNetExporter,
                        ControlledUNetExporter, ControlNetExporter, SD3TransformerExporter, FluxTransformerExporter, VaeEncoderExporter, VaeDecoderExporter)
}

# Module class name -> kind. A subclass finds its kind through its base classes (kind_of).
KIND_BY_CLASS: dict[str, str] = {
    "CLIPTextModel": "clip_text",
    "CLIPTextModelWithProjection": "clip_text_projection",
    "T5EncoderModel": "t5_encoder",
    "UNet2DConditionModel": "unet",
    "ControlNetModel": "controlnet",
    "SD3Transformer2DModel": "sd3_transformer",
    "FluxTransformer2DModel": "flux_transformer",
}


def kind_of(module: nn.Module, component: str) -> str:
    for cls in type(module).__mro__:
        if cls.__name__ in KIND_BY_CLASS:
            return KIND_BY_CLASS[cls.__name__]
    raise SourceError(
        f"component '{component}' is a {type(module).__name__}, which diffprism has no exporter for",
        f"supported module classes: {', '.join(sorted(KIND_BY_CLASS))}",
    )
