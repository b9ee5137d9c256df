"""ControlNet pipelines: the controlnet component, the UNet taking its residuals, fractional axes,
per-component validation, TensorRT profiles."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from exporters.errors import ShapeError
from exporters.spec import Axis, ComponentSpec, Dim, TensorSpec
from exporters.tree import read_geometry, read_tree_info

SD = "tiny-sd-controlnet"
DOWN = [f"down_block_additional_residuals.{i}" for i in range(4)]
SAMPLES = [f"down_block_res_samples.{i}" for i in range(4)]


def test_fractional_axes_shape_feed_and_json():
    half = Axis("height", per=2)
    spec = ComponentSpec("x", (TensorSpec("r", "float32", (1, half)),), (), (Dim("height", 8, 16, 32, multiple_of=8),))
    assert half.label() == "height/2" and half.size(16) == 8
    assert spec.input_shapes("max") == {"r": (1, 16)}
    assert spec.check_feed({"r": np.zeros((1, 12), np.float32)}) == {"height": 24}
    with pytest.raises(ShapeError, match="multiple of 8"):
        spec.check_feed({"r": np.zeros((1, 5), np.float32)})  # height 10
    again = ComponentSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again.inputs[0].axes[1] == half
    assert "per" not in TensorSpec("s", "float32", (Axis("height", 2),)).to_json()["axes"][0]  # old trees unchanged
    with pytest.raises(ValueError, match="not whole"):  # height/16 is not whole for multiples of 8
        ComponentSpec("y", (TensorSpec("r", "float32", (Axis("height", per=16),)),), (), (Dim("height", 8, 16, 32, 8),))


def test_controlnet_and_unet_are_exported_with_the_residuals(exported):
    out = exported(SD)
    info, specs = read_tree_info(out / "onnx")
    assert info["family"] == "sd-controlnet"
    assert specs["controlnet"].meta["kind"] == "controlnet" and specs["unet"].meta["kind"] == "unet_controlled"
    cn, unet = specs["controlnet"], specs["unet"]
    assert cn.input_names == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    assert cn.output_names == [*SAMPLES, "mid_block_res_sample"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states", *DOWN, "mid_block_additional_residual"]
    # every residual the ControlNet returns is the shape the UNet takes, at every point
    for point in ("min", "opt", "max"):
        produced = cn.output_shapes(point)
        taken = unet.input_shapes(point)
        assert [produced[n] for n in cn.output_names] == [taken[n] for n in [*DOWN, "mid_block_additional_residual"]]
    geometry = read_geometry(out / "onnx")
    assert geometry.guided == ("controlnet",) and geometry.batch_factor("controlnet") == 2
    assert cn.dim("batch") == unet.dim("batch")  # the ControlNet runs on the guidance batch too
    f = geometry.vae_scale_factor
    assert cn.input_shapes("max")["controlnet_cond"][2:] == tuple(f * s for s in cn.input_shapes("max")["sample"][2:])
    graph = onnx.load(str(out / "onnx" / "unet" / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["down_block_additional_residuals.2"][2:] == ["height/2", "width/2"]  # dynamic, at half the latent
    assert dims["mid_block_additional_residual"][1] == 64


def test_components_validate_on_onnxruntime(copy_export):
    from diffprism.jobs import validate_job

    out = copy_export(SD)
    result = validate_job(out, target="onnxruntime", components=["controlnet", "unet"])
    bad = [(c.component, c.point, c.error) for c in result.comparisons if not c.passed]
    assert result.passed and not bad, bad
    assert {c.component for c in result.comparisons} == {"controlnet", "unet"}


def test_tensorrt_plan_has_profiles_for_residuals_and_the_control_image(exported):
    from targets.base import get_target

    out = exported(SD)
    target = get_target("tensorrt")
    _, specs = read_tree_info(out / "onnx")
    scale = read_geometry(out / "onnx").vae_scale_factor
    sizes = [f"{16 * scale}:{32 * scale}:{48 * scale}"]
    plan = target.plan(out / "onnx", specs, target.config(precision="fp16", sizes=sizes, gpu="sm89", trt_version="10.8.0"))
    (unet,) = plan["components"]["unet"]["profiles"]
    (cn,) = plan["components"]["controlnet"]["profiles"]
    assert unet["sample"]["max"][2:] == [48, 48]
    assert unet["down_block_additional_residuals.0"]["min"][2:] == [16, 16]
    assert unet["down_block_additional_residuals.2"]["max"][2:] == [24, 24]  # half the latent size
    assert unet["mid_block_additional_residual"]["opt"] == [2, 64, 16, 16]
    assert cn["controlnet_cond"]["min"][2:] == [16 * scale] * 2 and cn["controlnet_cond"]["max"][2:] == [48 * scale] * 2
    assert cn["sample"]["max"][0] == unet["sample"]["max"][0]  # guidance batch for both
    assert "conditioning_scale" not in cn  # static (1,): no profile needed


def test_sdxl_controlnet_exports_and_validates(tmp_path):
    from diffprism.jobs import export_job, validate_job

    # The two components ControlNet adds; SDXL's text encoders and VAE are tiny-sdxl's (tested there).
    out = tmp_path / "sdxl"
    export_job("tiny-sdxl-controlnet", out, components=["controlnet", "unet"], reference_points="opt")
    _, specs = read_tree_info(out / "onnx")
    assert specs["controlnet"].input_names[3:5] == ["text_embeds", "time_ids"]  # SDXL's added conditioning
    assert specs["unet"].input_names[-1] == "mid_block_additional_residual"
    result = validate_job(out, target="onnxruntime", components=["controlnet"])
    assert result.passed, [(c.point, c.error) for c in result.comparisons if not c.passed]


def test_coreml_converts_the_controlnet_and_its_unet(exported, pipeline, tmp_path):
    pytest.importorskip("coremltools")
    import coremltools as ct

    from targets.coreml import CoreMlTarget
    from targets.coreml_inspect import inspect_package

    src, out = exported(SD), tmp_path / "coreml"
    out.mkdir()
    for part in ("onnx", "reference"):
        (out / part).symlink_to(src / part)
    target = CoreMlTarget()
    _, specs = read_tree_info(out / "onnx")
    specs = {n: specs[n] for n in ("controlnet", "unet")}
    plan = target.plan(out / "onnx", specs, target.config(components=list(specs)))
    result = target.build(plan, out, source=pipeline(SD))
    for name, spec in specs.items():
        path = out / "coreml-fp16" / f"{name}.mlpackage"
        facts = inspect_package(path, spec, precision="fp16", compress="none")
        assert facts["ok"], facts["problems"]
        assert result.details[name]["program_rel_l2"] < 1e-4  # the converted program reproduces the reference
    unet = ct.utils.load_spec(str(out / "coreml-fp16" / "unet.mlpackage"))
    # Core ML feature names are identifiers (`down_block_additional_residuals_2`): match by position.
    residual = unet.description.input[specs["unet"].input_names.index("down_block_additional_residuals.2")]
    assert residual.name == "down_block_additional_residuals_2"
    h = specs["unet"].dim("height")
    assert [(r.lowerBound, r.upperBound) for r in residual.type.multiArrayType.shapeRange.sizeRanges][2] == \
        (h.min // 2, h.max // 2)


def test_calibration_captures_the_controlnet_and_the_residuals(pipeline, tmp_path):
    from exporters.calibration import capture, load_feeds

    folder = capture(pipeline(SD), tmp_path, prompts=["a red cube"], steps=1, height=32, width=32)
    (unet,) = load_feeds(folder, "unet")  # one step, checked against the spec when recorded
    assert set(DOWN) <= set(unet) and unet["mid_block_additional_residual"].shape[1] == 64
    assert np.abs(unet["down_block_additional_residuals.0"]).max() > 0  # the ControlNet's, not zeros
    (cn,) = load_feeds(folder, "controlnet")
    assert cn["conditioning_scale"].tolist() == [1.0] and cn["controlnet_cond"].shape[:2] == (2, 3)
