"""Latent Consistency Models (tiny-lcm) and the UNet's broadcasting timestep (what optimum's loaders feed)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from diffprism.cli import main
from diffprism.e2e_jobs import e2e_job
from diffprism.jobs import validate_job
from diffprism.placement import Placement, resolve
from exporters.errors import EXIT_VALIDATION_FAILED
from exporters.tree import read_geometry, read_tree_info
from validation.e2e import requests_for

from tests.validation.test_e2e import _record_as_exported, scale_unet_weights

PROMPT = "a red cube on a blue table"
E2E_ARGS = ["--e2e", "--e2e-steps", "2", "--e2e-size", "32", "--e2e-guidance-scale", "4", "--e2e-prompt", PROMPT]


def _inputs(path):
    proto = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}


def test_lcm_unet_takes_timestep_cond_and_runs_without_guidance_batch(exported):
    tree = exported("tiny-lcm") / "onnx"
    info, specs = read_tree_info(tree)
    assert info["family"] == "lcm" and list(specs) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    # optimum's UNetOnnxConfig: timestep_cond is (batch_size, time_cond_proj_dim)
    assert _inputs(tree / "unet" / "model.onnx") == {
        "sample": ["batch", 4, "height", "width"], "timestep": ["timestep_batch"],
        "encoder_hidden_states": ["batch", 77, 32], "timestep_cond": ["batch", 32]}
    geometry = read_geometry(tree)
    assert not geometry.guidance and geometry.batch_factor("unet") == 1  # guidance is embedded, no CFG batch
    assert specs["unet"].dim("batch").opt == 1


def test_lcm_components_validate_on_onnxruntime_and_openvino(copy_export):
    from diffprism.jobs import compile_job
    from targets.base import get_target

    out = copy_export("tiny-lcm")
    result = validate_job(out, target="onnxruntime")
    assert result.passed and {c.component for c in result.comparisons} >= {"unet", "text_encoder", "vae_decoder"}
    if not get_target("openvino").availability().ok:
        pytest.skip(f"OpenVINO cannot run here: {get_target('openvino').availability().reason}")
    compile_job(out, target="openvino", precision="fp32")
    result = validate_job(out, target="openvino", precision="fp32")
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]


def test_lcm_images_match_pytorch_on_onnxruntime(exported):
    out = exported("tiny-lcm")
    requests = requests_for([PROMPT], size=(32, 32), steps=2, guidance_scale=4.0)
    (result,) = e2e_job(out, [resolve(out, Placement("onnxruntime"), {})], requests)
    assert result.passed and "unet" in result.runner, result.to_json()
    assert result.checks[0].metrics["latent_rel_l2"] < 1e-4


def test_lcm_validate_e2e_fails_on_a_broken_unet(copy_export, capsys):
    out = copy_export("tiny-lcm")
    scale_unet_weights(out / "onnx" / "unet", 1.05)
    _record_as_exported(out, "onnx/unet")
    assert main(["--json", "validate", str(out), "--components", "vae_decoder", *E2E_ARGS]) == EXIT_VALIDATION_FAILED
    e2e = json.loads(capsys.readouterr().out)["e2e"][0]
    assert not e2e["passed"] and e2e["checks"][0]["violations"], e2e


def test_a_negative_prompt_is_refused_by_a_pipeline_without_one(pipeline):
    from exporters.errors import UsageError
    from runtimes.pipeline import Request, _call_options

    pipe = pipeline("tiny-lcm")
    assert _call_options(pipe, Request(PROMPT)) == {}
    with pytest.raises(UsageError, match="no negative prompt"):
        _call_options(pipe, Request(PROMPT, negative_prompt="blurry"))
    assert _call_options(pipeline("tiny-sd"), Request(PROMPT, "blurry")) == {"negative_prompt": "blurry"}


def test_sdxl_unet_broadcasts_one_timestep_over_the_guidance_batch(exported):
    """optimum's ORTUnet feeds a (1,) timestep to a graph whose timestep has a rank, with batch-2 latents."""
    import onnxruntime as ort

    from exporters.inputs import make_feed

    tree = exported("tiny-sdxl") / "onnx"
    _, specs = read_tree_info(tree)
    spec = specs["unet"]
    assert _inputs(tree / "unet" / "model.onnx")["timestep"] == ["timestep_batch"]
    values = spec.dim_values("opt")
    assert values["batch"] == values["timestep_batch"] == 2
    feed = make_feed(spec, values, seed=0)
    feed["timestep"] = np.full(2, 321.0, np.float32)
    session = ort.InferenceSession(str(tree / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    per_sample = session.run(None, feed)[0]
    one = session.run(None, {**feed, "timestep": np.array([321.0], np.float32)})[0]
    np.testing.assert_allclose(one, per_sample, rtol=0, atol=1e-5)
    different = session.run(None, {**feed, "timestep": np.array([321.0, 10.0], np.float32)})[0]
    np.testing.assert_allclose(different[0], per_sample[0], atol=1e-5)  # (batch,) still means per sample
    assert np.abs(different[1] - per_sample[1]).max() > 1e-3
