"""End to end on a ControlNet pipeline: diffusers' StableDiffusionControlNetPipeline driven by ONNX Runtime
and OpenVINO runners, and the conditioning really wired through (the image follows the control image)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from diffprism.cli import main
from diffprism.e2e_jobs import e2e_job
from diffprism.placement import Placement, resolve
from exporters.errors import EXIT_OK, UsageError
from runtimes.control import control_options, default_control_image
from validation.e2e import requests_for

SD = "tiny-sd-controlnet"
PROMPT = "a red cube on a blue table"


@pytest.fixture(scope="module")
def openvino_controlnet(exported, tmp_path_factory):
    from diffprism.jobs import compile_job
    from targets.base import get_target

    if not get_target("openvino").availability().ok:
        pytest.skip(f"OpenVINO cannot run here: {get_target('openvino').availability().reason}")
    out = tmp_path_factory.mktemp("openvino-controlnet") / SD
    shutil.copytree(exported(SD), out)
    compile_job(out, target="openvino", precision="fp32")
    return out


def test_images_match_pytorch_on_onnxruntime_and_openvino(openvino_controlnet):
    out = openvino_controlnet
    requests = requests_for([PROMPT], size=(32, 32), steps=2)
    variants = [resolve(out, Placement("onnxruntime"), {}), resolve(out, Placement("openvino", "fp32"), {})]
    results = {r.label: r for r in e2e_job(out, variants, requests)}
    for label in ("onnxruntime-fp32", "openvino-fp32"):
        result = results[label]
        assert result.passed, result.to_json()
        assert {"controlnet", "unet"} <= set(result.runner)  # both ran on the target
        assert result.checks[0].metrics["latent_rel_l2"] < 1e-4


def _generate(out, tmp_path, name, *extra) -> np.ndarray:
    path = tmp_path / f"{name}.png"
    assert main(["generate", str(out), "--prompt", PROMPT, "--steps", "2", "--size", "32", "--out", str(path),
                 *extra]) == EXIT_OK
    return np.asarray(Image.open(path), dtype=np.float32)


def test_the_image_follows_the_control_image(openvino_controlnet, tmp_path):
    out = openvino_controlnet
    drawn = tmp_path / "drawn.png"
    Image.fromarray(default_control_image(32, 32)).save(drawn)
    flipped = tmp_path / "flipped.png"
    Image.fromarray(default_control_image(32, 32)[::-1, ::-1].copy()).save(flipped)
    default = _generate(out, tmp_path, "default")
    same = _generate(out, tmp_path, "same", "--control-image", str(drawn))
    other = _generate(out, tmp_path, "other", "--control-image", str(flipped))
    assert np.abs(default - same).max() <= 1  # the default is the drawn image
    assert np.abs(default - other).mean() > 1  # another control image, another picture (2.4 / 255 measured)


def test_validate_e2e_with_a_control_image(openvino_controlnet, tmp_path, capsys):
    control = tmp_path / "control.png"
    Image.fromarray(default_control_image(32, 32)[:, ::-1].copy()).save(control)
    code = main(["--json", "validate", str(openvino_controlnet), "--target", "openvino", "--precision", "fp32",
                 "--components", "controlnet", "--e2e", "--e2e-steps", "2", "--e2e-size", "32",
                 "--e2e-prompt", PROMPT, "--control-image", str(control)])
    doc = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and doc["passed"], doc
    request = doc["e2e"][0]["checks"][0]["request"]
    assert request["control_image"] == str(control.resolve()) and len(request["control_image_sha256"]) == 64


def test_a_control_image_without_a_controlnet_is_a_usage_error(tmp_path):
    class Plain:
        def __call__(self, prompt, height=32, width=32):
            return None

    class Controlled:
        def __call__(self, prompt, image=None, controlnet_conditioning_scale=1.0):
            return None

    assert control_options(Plain(), None, 32, 32) == {}
    with pytest.raises(UsageError, match="no ControlNet"):
        control_options(Plain(), str(tmp_path / "c.png"), 32, 32)
    with pytest.raises(UsageError, match="does not exist"):
        control_options(Controlled(), str(tmp_path / "missing.png"), 32, 32)
    assert control_options(Controlled(), None, 16, 24)["image"].size == (24, 16)
