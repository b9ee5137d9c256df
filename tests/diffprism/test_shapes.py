"""tiny-shapes: the scene generator and prompt-match check, and the trained preset drawing its prompts
with PyTorch and with ONNX Runtime (a broken copy of the weights must fail the same check)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from diffprism.shapes import check, scenes
from exporters.export import ONNX_DIR

# Fixed prompts from the held-out combinations (never seen in training); few steps keep it quick.
PROMPTS = ("a black circle on a red background, bottom left", "a blue circle on a red background, bottom right")
STEPS = 10


def test_held_out_scenes_are_not_trained_on():
    train, held_out = scenes.split()
    assert train and held_out and not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(scenes.all_scenes())


def test_check_reads_every_attribute_of_drawn_scenes():
    _, held_out = scenes.split()
    images, picked = scenes.dataset(held_out, 200, seed=1)
    assert check.rates([check.match(s.caption, im) for s, im in zip(picked, images)])["all"] == 1.0


def test_check_names_the_attribute_that_differs():
    scene = scenes.Scene("triangle", "red", "blue", "top left")
    image = scenes.render(scene, np.random.default_rng(0))
    m = check.match(scenes.Scene("circle", "red", "green", "top left").caption, image)
    assert m.attributes == {"shape": False, "colour": True, "background": False, "position": True} and not m.ok
    assert check.match(scene.caption, image).ok
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert not check.match(scene.caption, blank).ok  # no shape at all matches nothing


def test_caption_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="not a tiny-shapes caption"):
        scenes.Scene.parse("a purple hexagon on a red background, top left")


def test_prompts_are_held_out():
    _, held_out = scenes.split()
    assert {scenes.Scene.parse(p) for p in PROMPTS} <= set(held_out)


def test_tiny_shapes_loads_offline(pipeline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffprism import presets

    pipe = presets.build("tiny-shapes")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == scenes.SIZE


def test_pytorch_draws_the_prompt(pipeline):
    matches, _ = check.generate_matches(pipeline("tiny-shapes"), list(PROMPTS), steps=STEPS)
    assert all(m.ok for m in matches), [(m.prompt, m.seen) for m in matches]


@pytest.fixture(scope="module")
def shapes_export(tmp_path_factory):
    """tiny-shapes exported with only what text-to-image runs, at one reference point (no test here reads them)."""
    from diffprism.jobs import export_job

    out = tmp_path_factory.mktemp("tiny-shapes")
    export_job("tiny-shapes", out, components=["text_encoder", "unet", "vae_decoder"], reference_points="opt")
    return out


def test_onnxruntime_draws_the_prompt(shapes_export):
    from exporters.tree import read_geometry
    from runtimes.onnxruntime_runner import OnnxRuntimeRunner
    from runtimes.pipeline import close, load_pipeline, runners

    tree = shapes_export / ONNX_DIR
    pipe = load_pipeline(tree, lambda name, spec: OnnxRuntimeRunner(spec, tree / name / "model.onnx"))
    try:
        assert {r.backend for r in runners(pipe).values()} == {"onnxruntime"}
        matches, _ = check.generate_matches(pipe, list(PROMPTS), steps=STEPS, geometry=read_geometry(tree))
    finally:
        close(pipe)
    assert all(m.ok for m in matches), [(m.prompt, m.seen) for m in matches]


def test_broken_weights_fail_the_check(pipeline):
    pipe = copy.deepcopy(pipeline("tiny-shapes"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the UNet's weights shuffled within each tensor: same statistics, no learned structure
        for p in pipe.unet.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    matches, _ = check.generate_matches(pipe, list(PROMPTS), steps=STEPS)
    assert not any(m.ok for m in matches)
