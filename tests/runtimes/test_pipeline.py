"""Runner-driven diffusers pipelines draw what the PyTorch pipeline draws, on every runtime here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters.families import exporter_for
from exporters.geometry import Geometry
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR
from runtimes.onnxruntime_runner import OnnxRuntimeRunner
from runtimes.pipeline import Request, close, generate, initial_latents, load_pipeline, runners
from runtimes.torch_runner import TorchRunner
from targets.base import get_target
from validation.metrics import rel_l2

# Small and short: the tiny presets' smallest latent (16) and two guided steps.
REQUEST = Request("a red cube on a blue table", negative_prompt="blurry", seed=3, steps=2, height=32, width=32,
                  guidance_scale=6.0)
# Every tiny preset has 4 latent channels and a VAE scale of 2: one set of initial latents serves all.
LATENTS = initial_latents(Geometry("sd", 2, 4, 8, 32, "unet", "unet", True), REQUEST)


def ort_factory(tree):
    return lambda name, spec: OnnxRuntimeRunner(spec, tree / name / "model.onnx")


@pytest.fixture(scope="module")
def reference(pipeline):
    """PyTorch generations of REQUEST, one per preset (computed once)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = generate(pipeline(name), REQUEST, LATENTS)
        return cache[name]

    return get


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sd2", "tiny-sdxl"])
def test_onnxruntime_pipeline_matches_pytorch(preset, exported, reference):
    tree = exported(preset) / ONNX_DIR
    pipe = load_pipeline(tree, ort_factory(tree))
    try:
        gen = generate(pipe, REQUEST, LATENTS)
        assert {r.backend for r in runners(pipe).values()} == {"onnxruntime"}
    finally:
        close(pipe)
    ref = reference(preset)
    assert gen.image.shape == (32, 32, 3) and gen.latents.shape == ref.latents.shape
    assert rel_l2(ref.latents, gen.latents) < 1e-4
    assert np.abs(gen.image - ref.image).max() < 1e-3
    assert ref.image.std() > 0.01  # the image is not blank, so agreement means something


def test_torch_shims_add_nothing(exported, pipeline, reference):
    """The same modules behind the shims give bit-identical latents: the shims and the tree's scheduler and
    tokenizer reproduce diffusers' own pipeline exactly."""
    source = pipeline("tiny-sd")

    def make(name, spec):
        exporter = exporter_for(source, name)
        return TorchRunner(spec, exporter.wrap(exporter.module(source), spec))

    pipe = load_pipeline(exported("tiny-sd") / ONNX_DIR, make)
    gen = generate(pipe, REQUEST, LATENTS)
    np.testing.assert_array_equal(gen.latents, reference("tiny-sd").latents)


def test_openvino_pipeline_matches_pytorch(openvino_tiny_sd, reference):
    out, target = openvino_tiny_sd, get_target("openvino")
    tree = out / ONNX_DIR
    artifacts = target.output_dir(out, target.config(precision="fp32"))
    pipe = load_pipeline(tree, lambda name, spec: target.runner(artifacts, spec))
    try:
        gen = generate(pipe, REQUEST, LATENTS)
        assert {r.backend for r in runners(pipe).values()} == {"openvino"}
    finally:
        close(pipe)
    ref = reference("tiny-sd")
    assert rel_l2(ref.latents, gen.latents) < 1e-3
    assert np.abs(gen.image - ref.image).max() < 1e-2


def test_mixed_runtimes_per_component(openvino_tiny_sd, reference):
    """UNet on OpenVINO, text encoder and VAE on ONNX Runtime."""
    out, target = openvino_tiny_sd, get_target("openvino")
    tree = out / ONNX_DIR
    artifacts = target.output_dir(out, target.config(precision="fp32"))
    ort = ort_factory(tree)
    pipe = load_pipeline(tree, lambda name, spec: target.runner(artifacts, spec) if name == "unet" else ort(name, spec))
    gen = generate(pipe, REQUEST, LATENTS)
    assert {n: r.backend for n, r in runners(pipe).items()} == {
        "text_encoder": "onnxruntime", "unet": "openvino", "vae_decoder": "onnxruntime"}
    close(pipe)
    assert rel_l2(reference("tiny-sd").latents, gen.latents) < 1e-3


def test_initial_latents_are_seeded_and_checked(exported):
    from exporters.tree import read_geometry

    geometry = read_geometry(exported("tiny-sd") / ONNX_DIR)
    a, b = initial_latents(geometry, REQUEST), initial_latents(geometry, REQUEST)
    assert a.shape == (1, 4, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, initial_latents(geometry, Request("x", seed=4, height=32, width=32)))
    with pytest.raises(UsageError, match="multiple of 2"):
        initial_latents(geometry, Request("x", height=33, width=32))


def test_unet_shim_refuses_what_the_export_cannot_take(exported):
    tree = exported("tiny-sd") / ONNX_DIR
    pipe = load_pipeline(tree, ort_factory(tree))
    x = torch.zeros(2, 4, 16, 16)
    with pytest.raises(UsageError, match="timestep_cond"):
        pipe.unet(x, torch.tensor(10), torch.zeros(2, 77, 32), timestep_cond=torch.zeros(2, 8))
    out = pipe.unet(x, torch.tensor(10), torch.zeros(2, 77, 32), return_dict=False)[0]
    assert out.shape == x.shape and out.dtype == torch.float32
    with pytest.raises(UsageError, match="hidden states"):
        pipe.text_encoder(torch.zeros(1, 77, dtype=torch.int64), output_hidden_states=True)


def test_missing_component_is_a_clear_error(copy_export):
    import json

    out = copy_export("tiny-sd")
    info_path = out / ONNX_DIR / "diffprism.json"
    info = json.loads(info_path.read_text())
    info["components"] = [c for c in info["components"] if c["name"] != "vae_decoder"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(SourceError, match="vae_decoder"):
        load_pipeline(out / ONNX_DIR, ort_factory(out / ONNX_DIR))
