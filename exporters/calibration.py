"""Calibration capture: what each component really receives while the pipeline denoises.

Every quantizer (OpenVINO/NNCF, ONNX Runtime QDQ, TensorRT int8) calibrates on the same
capture: the pipeline runs in PyTorch over N prompts x the scheduler's steps, and hooks
record the inputs of the UNet or transformer (every step, CFG batch, SDXL text_embeds/time_ids,
Flux's packed latents, position ids and guidance), the
VAE decoder (final latents), the text encoders (token ids) and the VAE encoder (fed the
decoded images, the closest thing to real images a text-to-image run has). Feeds are
named and typed as the component's ComponentSpec inputs, so they go straight into a
Runner or a quantizer's data reader.

On disk: <out>/calibration/{info.json, <component>.npz}; npz keys are "<index>/<input>".
"""
from __future__ import annotations

import inspect
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from exporters.components import DOWN_RESIDUALS, MID_RESIDUAL
from exporters.errors import SourceError, UsageError
from exporters.files import staged_dir, write_json_atomic
from exporters.geometry import Geometry
from exporters.reference import save_npz
from exporters.spec import ComponentSpec, dim_opt
from runtimes.control import control_options

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
INFO = "info.json"

# Varied subjects, styles and lengths, so the UNet sees a spread of conditionings.
DEFAULT_PROMPTS: list[str] = [
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a rocky coast at dawn",
    "a close-up portrait of an old fisherman, dramatic lighting, 85mm",
    "a futuristic city skyline at night with neon signs, cyberpunk",
    "a bowl of ramen on a wooden table, studio food photography",
    "an oil painting of a field of sunflowers in the style of van gogh",
    "a cute corgi puppy wearing sunglasses on the beach",
    "an isometric pixel art castle floating in the clouds",
]


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and '#' comments skipped)."""
    if not path.is_file():
        raise SourceError(f"prompt file {path} does not exist", "pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SourceError(f"prompt file {path} holds no prompts", "write one prompt per line")
    return prompts


def pick_prompts(prompts: list[str] | None, num_prompts: int | None) -> list[str]:
    """The first N prompts of a set, cycling through it when N exceeds its length (seeds still differ)."""
    base = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    if num_prompts is None:
        return base
    if num_prompts < 1:
        raise UsageError(f"--num-prompts {num_prompts} is not positive", "pass at least 1")
    return [base[i % len(base)] for i in range(num_prompts)]


class _Recorder:
    """Collects feeds per component, converted to the spec's names and dtypes."""

    def __init__(self, specs: Mapping[str, ComponentSpec]):
        self.specs = specs
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in specs}

    def add(self, component: str, values: Mapping[str, Any]) -> None:
        spec = self.specs.get(component)
        if spec is None:
            return
        feed = {}
        for t in spec.inputs:
            value = values[t.name]
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            feed[t.name] = np.ascontiguousarray(arr.astype(np.dtype(t.dtype), copy=False))
        spec.check_feed(feed)  # a capture that a runner would refuse is a bug here, not later
        self.feeds[component].append(feed)


def _bound(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    ba = inspect.signature(fn).bind(*args, **kwargs)
    return dict(ba.arguments)


def _unet_values(args: tuple, kwargs: dict, forward: Callable) -> dict[str, Any]:
    a = _bound(forward, args, kwargs)
    sample = a["sample"]
    timestep = torch.as_tensor(a["timestep"]).reshape(-1).float()
    values = {"sample": sample, "timestep": timestep.expand(sample.shape[0]),
              "encoder_hidden_states": a["encoder_hidden_states"]}
    if a.get("timestep_cond") is not None:  # LCM's guidance embedding
        values["timestep_cond"] = a["timestep_cond"]
    values.update(a.get("added_cond_kwargs") or {})
    return values


def _transformer_values(args: tuple, kwargs: dict, forward: Callable) -> dict[str, Any]:
    """SD3/Flux: tensors by their forward names (the spec's); a scalar timestep or guidance per sample."""
    a = _bound(forward, args, kwargs)
    batch = a["hidden_states"].shape[0]
    values = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
    for key in ("timestep", "guidance"):
        if a.get(key) is not None:
            values[key] = torch.as_tensor(a[key]).reshape(-1).float().expand(batch)
    return values


def _controlled_unet_values(args: tuple, kwargs: dict, forward: Callable) -> dict[str, Any]:
    """The UNet of a ControlNet pipeline: its inputs plus the residuals, one input each."""
    a = _bound(forward, args, kwargs)
    values = _unet_values(args, kwargs, forward)
    values.update({f"{DOWN_RESIDUALS}.{i}": r for i, r in enumerate(a["down_block_additional_residuals"])})
    values[MID_RESIDUAL] = a["mid_block_additional_residual"]
    return values


def _controlnet_values(args: tuple, kwargs: dict, forward: Callable) -> dict[str, Any]:
    a = _bound(forward, args, kwargs)
    values = _unet_values(args, kwargs, forward)
    values["controlnet_cond"] = a["controlnet_cond"]
    values["conditioning_scale"] = torch.as_tensor(a.get("conditioning_scale", 1.0), dtype=torch.float32).reshape(1)
    return values


def _text_values(args: tuple, kwargs: dict, forward: Callable) -> dict[str, Any]:
    return {"input_ids": _bound(forward, args, kwargs)["input_ids"]}


# Exporter kind -> the spec's inputs from a call of the module (forward args and kwargs).
CAPTURE: dict[str, Callable[[tuple, dict, Callable], dict[str, Any]]] = {
    "unet": _unet_values, "unet_controlled": _controlled_unet_values, "controlnet": _controlnet_values,
    "clip_text": _text_values, "clip_text_projection": _text_values,
    "t5_encoder": _text_values, "sd3_transformer": _transformer_values, "flux_transformer": _transformer_values,
}


@contextmanager
def _hooks(pipe: Any, recorder: _Recorder) -> Iterator[None]:
    """Forward pre-hooks on the denoiser and text encoders, a wrapper around vae.decode; all removed on exit."""
    from exporters.families import family_of

    family = family_of(type(pipe).__name__)
    handles = []
    for name, spec in recorder.specs.items():
        values_of = CAPTURE.get(spec.meta.get("kind"))
        module = getattr(pipe, family.component(name).source, None)
        if values_of is None or module is None:
            continue

        def hook(module, args, kwargs, name=name, values_of=values_of):
            recorder.add(name, values_of(args, kwargs, module.forward))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    vae = getattr(pipe, "vae", None)
    original = vae.decode if vae is not None else None
    if vae is not None:
        def decode(z, *args, **kwargs):
            recorder.add("vae_decoder", {"latent_sample": z})
            out = original(z, *args, **kwargs)
            image = out[0] if isinstance(out, tuple) else out.sample
            recorder.add("vae_encoder", {"sample": image})
            return out

        vae.decode = decode  # instance attribute: the pipeline calls self.vae.decode
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if vae is not None:
            del vae.decode


def capture(pipe: Any, out: Path, *, prompts: list[str] | None = None, steps: int = 4, seed: int = 0,
            guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
            specs: dict[str, ComponentSpec] | None = None, geometry: Geometry | None = None,
            runtime: dict[str, Any] | None = None) -> Path:
    """Run the pipeline over the prompts and write <out>/calibration atomically; returns that folder.

    Prompt i runs with seed + i. Components absent from `specs` are not recorded; with
    specs=None every component of the pipeline's family is (specs at their defaults).
    `pipe` may be the PyTorch pipeline or a runner pipeline over the exported graphs (its shims
    take the same arguments); `runtime` says which ran, recorded in info.json.
    """
    if steps < 1:
        raise UsageError(f"--steps {steps} is not positive", "pass at least 1")
    prompts = pick_prompts(prompts, None)
    if specs is None or geometry is None:
        from exporters.export import plan_export

        _, geometry, planned = plan_export(pipe)
        specs = planned if specs is None else specs
    height, width = _size(geometry, specs, height, width)
    recorder = _Recorder(specs)
    pipe.set_progress_bar_config(disable=True)
    seeds = [seed + i for i in range(len(prompts))]
    t5 = dim_opt(specs, "t5_sequence")  # SD3/Flux pad T5 prompts to the exported length
    options = {} if t5 is None else {"max_sequence_length": t5}
    options.update(control_options(pipe, None, height, width))  # a ControlNet pipeline: the drawn control image
    with torch.no_grad(), _hooks(pipe, recorder):
        for i, (prompt, s) in enumerate(zip(prompts, seeds)):
            generator = torch.Generator("cpu").manual_seed(s)
            pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                 generator=generator, output_type="np", **options)
            log.info("calibration: ran prompt %d/%d", i + 1, len(prompts))
    empty = [name for name, feeds in recorder.feeds.items() if not feeds]
    if empty:
        raise SourceError(f"the pipeline never called {empty} while denoising", "calibrate only the components it runs")
    final = out / CALIBRATION_DIR
    with staged_dir(final) as tmp:
        for name, feeds in recorder.feeds.items():
            save_npz({f"{i:05d}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()}, tmp / f"{name}.npz")
        info = {
            "prompts": prompts,
            "seeds": seeds,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "scheduler": type(pipe.scheduler).__name__,
            "runtime": runtime or {"name": "torch"},
            "counts": {name: len(feeds) for name, feeds in recorder.feeds.items()},
            "shapes": {name: {k: list(v.shape) for k, v in feeds[0].items()} for name, feeds in recorder.feeds.items()},
        }
        write_json_atomic(tmp / INFO, info)
    log.info("calibration written to %s: %s", final, info["counts"])
    return final


def _size(geometry: Geometry, specs: Mapping[str, ComponentSpec], height: int | None,
          width: int | None) -> tuple[int, int]:
    """Pixel size to run at: the given one, else the exported opt size, else the model's default."""
    factor = geometry.vae_scale_factor
    for spec in specs.values():
        names = {d.name for d in spec.dims}
        if {"height", "width"} <= names:
            height = height or spec.dim("height").opt * factor
            width = width or spec.dim("width").opt * factor
            break
    return int(height or geometry.default_size), int(width or geometry.default_size)


def info(calibration_dir: Path) -> dict[str, Any]:
    path = calibration_dir / INFO
    if not path.is_file():
        raise SourceError(f"no calibration capture at {calibration_dir}", f"run 'diffprism calibrate {calibration_dir.parent}'")
    return json.loads(path.read_text())


def load_feeds(calibration_dir: Path, component: str) -> list[dict[str, np.ndarray]]:
    """One feed per recorded call of `component`, in call order."""
    path = calibration_dir / f"{component}.npz"
    if not path.is_file():
        raise SourceError(
            f"no calibration data for '{component}' at {path}",
            f"run 'diffprism calibrate {calibration_dir.parent}' first",
        )
    feeds: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            index, name = key.split("/", 1)
            feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]
