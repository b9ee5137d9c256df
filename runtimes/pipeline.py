"""A diffusers pipeline whose components are Runners (torch, ONNX Runtime, OpenVINO, TensorRT, Core ML, mixed).

Small shims stand in for the text encoders, the denoiser (UNet or transformer) and the VAE
and forward each call to a Runner; everything else (tokenizers, scheduler loop, classifier-free
guidance, SDXL's added conditioning, Flux's packing and guidance embedding, post-processing)
is diffusers' own pipeline code (the family's text-to-image class), so a runner pipeline
differs from the PyTorch one only by what its runners compute.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from exporters.components import DOWN_RESIDUALS, DOWN_SAMPLES, MID_RESIDUAL, MID_SAMPLE
from exporters.errors import SourceError, UsageError
from exporters.families import family_named
from exporters.geometry import Geometry
from exporters.spec import ComponentSpec, dim_opt
from exporters.tree import read_tree_info
from runtimes.base import Runner
from runtimes.control import control_digest, control_options

log = logging.getLogger(__name__)

RunnerFactory = Callable[[ComponentSpec], Runner]

# Pipeline arguments a runner pipeline leaves off (safety checker, watermark: not part of the export).
OFF = {"safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False,
       "add_watermarker": False}


def _frozen(config: Mapping[str, Any]):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


class _Shim(nn.Module):
    """What a diffusers pipeline reads from a model besides calling it: config, dtype, device."""

    def __init__(self, runner: Runner, config: Mapping[str, Any]):
        super().__init__()
        self.runner = runner
        self.config = _frozen(config)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the feed/fetch contract is float32 whatever the runner computes in

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _run(self, feed: dict[str, Any]) -> dict[str, torch.Tensor]:
        arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in feed.items()}
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.runner.infer(arrays).items()}


class TextEncoderShim(_Shim):
    def forward(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states: bool | None = None,
                return_dict: bool = True, **_: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        names = self.runner.spec.output_names
        hidden_names = sorted((n for n in names if n.startswith("hidden_states.")), key=lambda n: int(n.split(".")[1]))
        if output_hidden_states and not hidden_names:
            raise UsageError(f"{self.runner.spec.name} was exported without hidden states",
                             "generate without clip_skip, or export an SDXL pipeline")
        out = self._run({"input_ids": input_ids.to(torch.int64)})
        hidden = tuple(out[n] for n in hidden_names) if hidden_names else None
        if "text_embeds" in out:  # CLIPTextModelWithProjection: output[0] is the pooled projection
            return CLIPTextModelOutput(text_embeds=out["text_embeds"], last_hidden_state=out["last_hidden_state"],
                                       hidden_states=hidden)
        return BaseModelOutputWithPooling(last_hidden_state=out["last_hidden_state"],
                                          pooler_output=out.get("pooler_output"), hidden_states=hidden)


class UNetShim(_Shim):
    def __init__(self, runner: Runner, config: Mapping[str, Any]):
        super().__init__(runner, config)
        if "time_ids" in runner.spec.input_names:
            # SDXL's pipeline checks the length of its added conditioning against this layer.
            width = config["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, timestep_cond=None,
                cross_attention_kwargs=None, added_cond_kwargs=None, return_dict: bool = True,
                down_block_additional_residuals=None, mid_block_additional_residual=None, **_: Any):
        names = self.runner.spec.input_names
        if cross_attention_kwargs:
            raise UsageError("the exported UNet takes no cross_attention_kwargs", "generate without attention processors")
        if (timestep_cond is not None) != ("timestep_cond" in names):
            raise UsageError("the exported UNet takes timestep_cond" if timestep_cond is None else
                             "the exported UNet takes no timestep_cond",
                             "generate with the family's own pipeline (LCM's embeds the guidance scale)")
        feed = _unet_feed(self.runner.spec, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if timestep_cond is not None:
            feed["timestep_cond"] = timestep_cond.float()
        if MID_RESIDUAL in names:
            if down_block_additional_residuals is None or mid_block_additional_residual is None:
                raise UsageError("this UNet was exported to take a ControlNet's residuals",
                                 "run it in its ControlNet pipeline")
            down = [n for n in names if n.startswith(DOWN_RESIDUALS + ".")]
            if len(down) != len(down_block_additional_residuals):
                raise UsageError(f"the UNet takes {len(down)} down-block residuals, the ControlNet gave "
                                 f"{len(down_block_additional_residuals)}", "export the pipeline again")
            feed.update({n: r.float() for n, r in zip(down, down_block_additional_residuals)})
            feed[MID_RESIDUAL] = mid_block_additional_residual.float()
        elif down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            raise UsageError("this UNet was exported without ControlNet residual inputs",
                             "export the ControlNet pipeline (its UNet takes them)")
        out = self._run(feed)["out_sample"]
        return SimpleNamespace(sample=out) if return_dict else (out,)


def _unet_feed(spec: ComponentSpec, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
               added_cond_kwargs) -> dict[str, Any]:
    """The inputs a UNet and a ControlNet share: per-sample timestep, SDXL's added conditioning."""
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
    feed = {"sample": sample.float(), "timestep": t, "encoder_hidden_states": encoder_hidden_states.float()}
    if "time_ids" in spec.input_names:
        if not added_cond_kwargs:
            raise UsageError(f"the SDXL {spec.name} needs text_embeds and time_ids", "use an SDXL pipeline")
        feed["text_embeds"] = added_cond_kwargs["text_embeds"].float()
        feed["time_ids"] = added_cond_kwargs["time_ids"].float()
    return feed


class _ControlNetShim(_Shim):
    """A ControlNet runner. diffusers' ControlNet pipelines check isinstance(ControlNetModel), so the
    shim class made from this one (controlnet_shim) is one, without building (or holding) its layers."""

    def __init__(self, runner: Runner, config: Mapping[str, Any]):
        nn.Module.__init__(self)  # not ControlNetModel's: it would build the whole network
        self.runner = runner
        self._internal_dict = _frozen(config)  # ConfigMixin.config reads it

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, controlnet_cond=None,
                conditioning_scale=1.0, class_labels=None, timestep_cond=None, attention_mask=None,
                added_cond_kwargs=None, cross_attention_kwargs=None, guess_mode: bool = False,
                return_dict: bool = True, **_: Any):
        if guess_mode or class_labels is not None or timestep_cond is not None or cross_attention_kwargs:
            raise UsageError("the exported ControlNet takes no guess_mode, class labels, timestep_cond or "
                             "attention kwargs", "generate without them")
        feed = _unet_feed(self.runner.spec, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        feed["controlnet_cond"] = controlnet_cond.float()
        feed["conditioning_scale"] = torch.as_tensor(conditioning_scale, dtype=torch.float32).reshape(1)
        out = self._run(feed)
        down = tuple(out[n] for n in self.runner.spec.output_names if n.startswith(DOWN_SAMPLES + "."))
        mid = out[MID_SAMPLE]
        return SimpleNamespace(down_block_res_samples=down, mid_block_res_sample=mid) if return_dict else (down, mid)


class T5Shim(_Shim):
    def forward(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states: bool | None = None,
                return_dict: bool = True, **_: Any):
        from transformers.modeling_outputs import BaseModelOutput

        if output_hidden_states:
            raise UsageError(f"{self.runner.spec.name} was exported without hidden states", "generate without them")
        out = self._run({"input_ids": input_ids.to(torch.int64)})
        return BaseModelOutput(last_hidden_state=out["last_hidden_state"])


def _per_sample(value: Any, batch: int) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1).expand(batch).contiguous()


class _TransformerShim(_Shim):
    def cache_context(self, name: str):  # diffusers' cache hooks: nothing to cache in a runner
        return contextlib.nullcontext()

    def _check(self, joint_attention_kwargs, extra: Mapping[str, Any]) -> None:
        used = sorted(k for k, v in extra.items() if v is not None and v is not False)
        if joint_attention_kwargs or used:
            raise UsageError(f"the exported transformer takes no {used or 'joint_attention_kwargs'}",
                             "generate without IP adapters, ControlNets or skipped layers")


class SD3TransformerShim(_TransformerShim):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections,
                timestep, joint_attention_kwargs=None, return_dict: bool = True, block_controlnet_hidden_states=None,
                skip_layers=None, **_: Any):
        self._check(joint_attention_kwargs, {"block_controlnet_hidden_states": block_controlnet_hidden_states,
                                             "skip_layers": skip_layers})
        out = self._run({"hidden_states": hidden_states.float(), "encoder_hidden_states": encoder_hidden_states.float(),
                         "pooled_projections": pooled_projections.float(),
                         "timestep": _per_sample(timestep, hidden_states.shape[0])})["out_hidden_states"]
        return SimpleNamespace(sample=out) if return_dict else (out,)


class FluxTransformerShim(_TransformerShim):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections,
                timestep, img_ids, txt_ids, guidance=None, joint_attention_kwargs=None, return_dict: bool = True,
                controlnet_block_samples=None, controlnet_single_block_samples=None, **_: Any):
        self._check(joint_attention_kwargs, {"controlnet_block_samples": controlnet_block_samples,
                                             "controlnet_single_block_samples": controlnet_single_block_samples})
        batch = hidden_states.shape[0]
        feed = {"hidden_states": hidden_states.float(), "encoder_hidden_states": encoder_hidden_states.float(),
                "pooled_projections": pooled_projections.float(), "timestep": _per_sample(timestep, batch),
                # diffusers builds the position ids as floats holding integers; the graph takes int64 (as optimum's)
                "img_ids": img_ids.reshape(-1, 3).round().to(torch.int64),
                "txt_ids": txt_ids.reshape(-1, 3).round().to(torch.int64)}
        if "guidance" in self.runner.spec.input_names:
            if guidance is None:
                raise UsageError("the exported Flux transformer takes a guidance value", "pass guidance_scale")
            feed["guidance"] = _per_sample(guidance, batch)
        out = self._run(feed)["out_hidden_states"]
        return SimpleNamespace(sample=out) if return_dict else (out,)


class VaeDecoderShim(_Shim):
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, **_: Any):
        image = self._run({"latent_sample": z.float()})["sample"]
        return SimpleNamespace(sample=image) if return_dict else (image,)

    def forward(self, z: torch.Tensor):
        return self.decode(z, return_dict=False)[0]


@functools.cache
def _controlnet_shim_class() -> type:
    from diffusers import ControlNetModel  # imported when a ControlNet runs, not with this module

    return type("ControlNetShim", (_ControlNetShim, ControlNetModel), {})


def controlnet_shim(runner: Runner, config: Mapping[str, Any]) -> _Shim:
    return _controlnet_shim_class()(runner, config)


SHIMS = {"clip_text": TextEncoderShim, "clip_text_projection": TextEncoderShim, "t5_encoder": T5Shim,
         "unet": UNetShim, "unet_controlled": UNetShim, "controlnet": controlnet_shim,
         "sd3_transformer": SD3TransformerShim, "flux_transformer": FluxTransformerShim,
         "vae_decoder": VaeDecoderShim}  # by exporter kind (the spec's meta)


def needed(info: Mapping[str, Any], specs: Mapping[str, ComponentSpec]) -> list[str]:
    """The exported components text-to-image needs (from the family's declaration)."""
    return family_named(info["family"]).generation_components(specs)


def _component_config(tree: Path, name: str) -> dict[str, Any]:
    path = tree / name / "config.json"
    if not path.is_file():
        raise SourceError(f"the exported tree has no {name}/config.json", "re-run 'diffprism export'")
    return json.loads(path.read_text())


def _scheduler(tree: Path):
    import diffusers

    path = tree / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise SourceError(f"the exported tree has no scheduler ({path})", "re-run 'diffprism export'")
    cls = getattr(diffusers, json.loads(path.read_text())["_class_name"])
    return cls.from_pretrained(tree / "scheduler")


def _tokenizer(tree: Path, name: str):
    from transformers import AutoTokenizer

    if not (tree / name).is_dir():
        raise SourceError(f"the exported tree has no {name}/", "re-run 'diffprism export'")
    return AutoTokenizer.from_pretrained(tree / name)


def load_pipeline(tree: Path, make_runner: Callable[[str, ComponentSpec], Runner]):
    """diffusers' text-to-image pipeline for the exported tree, each component a shim over make_runner(name, spec)."""

    import diffusers

    info, specs = read_tree_info(tree)
    family = family_named(info["family"])
    names = needed(info, specs)
    missing = [c for c in names if c not in specs]
    if missing:
        raise SourceError(f"the export lacks {missing}, which image generation needs",
                          f"re-export with all of {names}")
    index = json.loads((tree / "model_index.json").read_text())
    kwargs: dict[str, Any] = {"scheduler": _scheduler(tree)}
    for name in names:
        kind = specs[name].meta.get("kind")
        if kind not in SHIMS:
            raise SourceError(f"no runner shim for {name} (kind {kind!r})", "re-export with this diffprism version")
        kwargs[family.component(name).source] = SHIMS[kind](make_runner(name, specs[name]),
                                                            _component_config(tree, name))
    for tokenizer in family.tokenizers:
        if (tree / tokenizer).is_dir():
            kwargs[tokenizer] = _tokenizer(tree, tokenizer)
    cls = getattr(diffusers, family.pipeline_classes[0])
    for param in inspect.signature(cls.__init__).parameters:
        if param in kwargs or param == "self":
            continue
        if param in OFF:
            kwargs[param] = OFF[param]
        elif param in index and not isinstance(index[param], list):  # a pipeline option, e.g. force_zeros_...
            kwargs[param] = index[param]
        elif param in index:  # a model the export does not hold (e.g. an absent optional encoder)
            kwargs[param] = None
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def activate(pipe: Any) -> float:
    """Load (compile) every runner of a runner pipeline now, so no image pays for it; returns the seconds."""
    start = time.perf_counter()
    for runner in runners(pipe).values():
        runner.activate()
    return time.perf_counter() - start


def close(pipe: Any) -> None:
    """Free every runner of a runner pipeline (a no-op for a PyTorch pipeline)."""
    for module in pipe.components.values():
        if isinstance(module, _Shim):
            module.runner.deactivate()


def runners(pipe: Any) -> dict[str, Runner]:
    """Component name (as exported) -> its runner."""
    return {m.runner.spec.name: m.runner for m in pipe.components.values() if isinstance(m, _Shim)}


@dataclass(frozen=True)
class Request:
    """One text-to-image call; the seed fixes the initial latents and any scheduler noise."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 20
    height: int = 512
    width: int = 512
    guidance_scale: float = 7.5
    max_sequence_length: int | None = None  # T5 tokens (SD3, Flux); None: the pipeline's default
    control_image: str | None = None  # a ControlNet pipeline's control image (PNG path); None: the drawn default

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for key in ("max_sequence_length", "control_image"):  # unset: the same record (and cache key) as before
            if data[key] is None:
                del data[key]
        if self.control_image is not None:
            data["control_image_sha256"] = control_digest(self.control_image)
        return data


@dataclass
class Generation:
    image: np.ndarray  # HWC float32 in [0, 1]
    latents: np.ndarray  # final denoised latents, before the VAE
    seconds: float

    def png(self) -> bytes:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(to_uint8(self.image)).save(buf, format="PNG")
        return buf.getvalue()


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def initial_latents(geometry: Geometry, request: Request) -> torch.Tensor:
    """Seeded unscaled noise; the pipeline multiplies it by the scheduler's init_noise_sigma itself."""
    from diffusers.utils.torch_utils import randn_tensor

    f = geometry.vae_scale_factor
    if request.height % f or request.width % f:
        raise UsageError(f"image size {request.height}x{request.width} is not a multiple of {f}",
                         f"use a multiple of {f}")
    shape = (1, geometry.latent_channels, request.height // f, request.width // f)
    noise = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(request.seed), dtype=torch.float32)
    return pack_latents(noise, geometry.latent_packing)


def pack_latents(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p): p x p patches as tokens, the layout Flux's pipeline takes."""
    if p == 1:
        return latents
    b, c, h, w = latents.shape
    if h % p or w % p:
        raise UsageError(f"latents {h}x{w} do not split into {p}x{p} patches", "use an image size that does")
    patches = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


def for_export(request: Request, specs: Mapping[str, ComponentSpec]) -> Request:
    """The request with the exported T5 length filled in, so PyTorch references run what the runners run."""
    if request.max_sequence_length is None and (length := dim_opt(specs, "t5_sequence")) is not None:
        return dataclasses.replace(request, max_sequence_length=length)
    return request


def _call_options(pipe: Any, request: Request) -> dict[str, Any]:
    """Arguments only some pipelines take, passed only when the request sets them: the negative prompt
    (LCM's pipeline has none), the T5 length (SD3, Flux), a ControlNet pipeline's control image (the
    request's, or the drawn default)."""
    params = inspect.signature(type(pipe).__call__).parameters
    options = control_options(pipe, request.control_image, request.height, request.width)
    if request.negative_prompt is not None:
        if "negative_prompt" not in params:
            raise UsageError(f"{type(pipe).__name__} takes no negative prompt", "leave --negative-prompt unset")
        options["negative_prompt"] = request.negative_prompt
    if request.max_sequence_length is not None:
        if "max_sequence_length" not in params:
            raise UsageError("max_sequence_length is set but the pipeline has no T5 encoder", "leave it unset")
        options["max_sequence_length"] = request.max_sequence_length
    return options


def generate(pipe: Any, request: Request, latents: torch.Tensor) -> Generation:
    """Run a diffusers pipeline (PyTorch or runner-driven) with fixed initial latents (initial_latents);
    keep the final latents."""
    final: dict[str, torch.Tensor] = {}

    def keep(_pipe, _step, _t, kwargs):
        final["latents"] = kwargs["latents"].detach().clone()
        return {}

    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "watermark", None) is not None:
        pipe.watermark = None  # the invisible watermark would differ from run to run of the same latents
    start = time.perf_counter()
    with torch.no_grad():
        result = pipe(
            prompt=request.prompt, num_inference_steps=request.steps,
            height=request.height, width=request.width, guidance_scale=request.guidance_scale,
            latents=latents.clone(), generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np",
            callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"], **_call_options(pipe, request),
        )
    seconds = time.perf_counter() - start
    image = np.asarray(result.images[0], dtype=np.float32)
    return Generation(image, final["latents"].float().cpu().numpy(), seconds)
