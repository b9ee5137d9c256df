"""End to end on SD3 and Flux: diffusers' own pipelines driven by ONNX Runtime and OpenVINO runners."""
from __future__ import annotations

import json

import pytest

from diffprism.cli import main
from diffprism.e2e_jobs import e2e_job
from diffprism.placement import Placement, resolve
from exporters.errors import EXIT_VALIDATION_FAILED
from validation.e2e import requests_for

from tests.validation.test_e2e import _record_as_exported, scale_unet_weights

DIT = ("tiny-sd3", "tiny-flux")
# guidance 3.5: SD3 runs its classifier-free guidance batch, Flux feeds it to the guidance embedding
E2E_ARGS = ["--e2e", "--e2e-steps", "2", "--e2e-size", "32", "--e2e-guidance-scale", "3.5",
            "--e2e-prompt", "a red cube on a blue table"]


@pytest.mark.parametrize("preset", DIT)
def test_images_match_pytorch_on_onnxruntime_and_openvino(openvino_dit, preset):
    out = openvino_dit[preset]
    requests = requests_for(["a red cube on a blue table"], size=(32, 64), steps=2, guidance_scale=3.5)
    variants = [resolve(out, Placement("onnxruntime"), {}), resolve(out, Placement("openvino", "fp32"), {})]
    results = {r.label: r for r in e2e_job(out, variants, requests)}
    for label in ("onnxruntime-fp32", "openvino-fp32"):
        result = results[label]
        assert result.passed and result.precision == "fp32", result.to_json()
        assert "transformer" in result.runner and result.checks[0].metrics["latent_rel_l2"] < 1e-4
    if preset == "tiny-sd3":
        assert "text_encoder_3" in results["onnxruntime-fp32"].runner


def test_validate_e2e_fails_on_a_broken_transformer(copy_export, capsys):
    # The image check is the same for every family; both DiT families' e2e paths run in the test above.
    out = copy_export("tiny-flux")
    scale_unet_weights(out / "onnx" / "transformer", 1.05)
    _record_as_exported(out, "onnx/transformer")  # else validate refuses a changed set (exit 6) before running
    # The component check covers only the (intact) VAE decoder, so the failure comes from the images.
    assert main(["--json", "validate", str(out), "--components", "vae_decoder", *E2E_ARGS]) == EXIT_VALIDATION_FAILED
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is True  # the per-component verdict
    e2e = doc["e2e"][0]
    assert not e2e["passed"] and e2e["checks"][0]["violations"], e2e
