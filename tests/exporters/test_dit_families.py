"""SD3 and Flux (tiny-sd3, tiny-flux): components, optimum's tensor names, dims, ORT and OpenVINO vs PyTorch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from exporters import reference
from exporters.export import plan_specs
from exporters.onnx_writer import DATA_NAME
from exporters.spec import ShapeRequest
from exporters.tree import read_geometry, read_tree_info
from runtimes.onnxruntime_runner import OnnxRuntimeRunner
from validation.compare import compare
from validation.policy import Policy

DIT = ("tiny-sd3", "tiny-flux")
EXPECTED = {
    "tiny-sd3": {
        "text_encoder": (["input_ids"], ["text_embeds", "last_hidden_state"]),
        "text_encoder_2": (["input_ids"], ["text_embeds", "last_hidden_state"]),
        "text_encoder_3": (["input_ids"], ["last_hidden_state"]),
        "transformer": (["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
                        ["out_hidden_states"]),
        "vae_encoder": (["sample"], ["latent_parameters"]),
        "vae_decoder": (["latent_sample"], ["sample"]),
    },
    "tiny-flux": {
        "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
        "text_encoder_2": (["input_ids"], ["last_hidden_state"]),
        "transformer": (["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                         "txt_ids", "guidance"], ["out_hidden_states"]),
        "vae_encoder": (["sample"], ["latent_parameters"]),
        "vae_decoder": (["latent_sample"], ["sample"]),
    },
}
KINDS = {
    "tiny-sd3": {"text_encoder": "clip_text_projection", "text_encoder_2": "clip_text_projection",
                 "text_encoder_3": "t5_encoder", "transformer": "sd3_transformer"},
    "tiny-flux": {"text_encoder": "clip_text", "text_encoder_2": "t5_encoder", "transformer": "flux_transformer"},
}


@pytest.mark.parametrize("preset", DIT)
def test_tree_has_every_component_with_optimum_names(exported, preset):
    tree = exported(preset) / "onnx"
    info, specs = read_tree_info(tree)
    assert list(specs) == list(EXPECTED[preset])
    for name, (inputs, outputs) in EXPECTED[preset].items():
        assert sorted(p.name for p in (tree / name).iterdir()) == ["config.json", "model.onnx", DATA_NAME]
        proto = onnx.load(str(tree / name / "model.onnx"), load_external_data=False)
        assert [i.name for i in proto.graph.input] == inputs
        assert [o.name for o in proto.graph.output][: len(outputs)] == outputs
    for name, kind in KINDS[preset].items():
        assert specs[name].meta["kind"] == kind


def _axes(tree, component, tensor):
    proto = onnx.load(str(tree / component / "model.onnx"), load_external_data=False)
    value = next(v for v in (*proto.graph.input, *proto.graph.output) if v.name == tensor)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_flux_transformer_takes_packed_latents_and_int64_ids(exported):
    tree = exported("tiny-flux") / "onnx"
    _, specs = read_tree_info(tree)
    spec = specs["transformer"]
    assert _axes(tree, "transformer", "hidden_states") == ["batch", "packed", 64]  # 16 channels x 2x2
    assert _axes(tree, "transformer", "img_ids") == ["packed", 3]
    assert _axes(tree, "transformer", "txt_ids") == [512, 3]  # the T5 length, static by default
    assert _axes(tree, "transformer", "out_hidden_states") == ["batch", "packed", 64]
    assert spec.input("img_ids").dtype == spec.input("txt_ids").dtype == "int64"
    packed = spec.dim("packed")
    assert packed.product_of == ("height", "width") and packed.per == 2
    h, w = spec.dim("height"), spec.dim("width")
    assert packed.max == (h.max // 2) * (w.max // 2)


def test_geometry_is_recorded_in_the_tree(exported):
    sd3 = read_geometry(exported("tiny-sd3") / "onnx")
    flux = read_geometry(exported("tiny-flux") / "onnx")
    assert sd3.latent_channels == flux.latent_channels == 16
    assert sd3.latent_multiple == 2  # the MMDiT's patch size
    assert flux.latent_multiple == 2  # patch size 1, packed 2x2
    assert (sd3.latent_packing, flux.latent_packing) == (1, 2)
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)
    assert (flux.scaling_factor, flux.shift_factor) == (0.3611, 0.1159)
    assert (sd3.guidance, flux.guidance) == (True, False)  # Flux embeds guidance instead of a CFG batch
    assert (sd3.batch_factor("transformer"), flux.batch_factor("transformer")) == (2, 1)
    assert (sd3.t5_sequence, flux.t5_sequence) == (256, 512)
    assert (sd3.denoiser_kind, flux.denoiser_kind) == ("sd3_transformer", "flux_transformer")
    assert sd3.max_sequence == {"text_encoder": 77, "text_encoder_2": 77}  # T5's is its own dim
    _, specs = read_tree_info(exported("tiny-sd3") / "onnx")
    text = specs["transformer"].dim("text_sequence")
    assert text.opt == 77 + 256  # CLIP tokens then T5 tokens, concatenated


@pytest.mark.parametrize("preset", DIT)
def test_onnxruntime_matches_pytorch_at_several_shapes(exported, preset):
    out = exported(preset)
    _, specs = read_tree_info(out / "onnx")
    tol = Policy().tolerance("fp32", "unet")
    for name, spec in specs.items():
        cases = reference.load(out / "reference" / f"{name}.npz")
        shapes = {tuple(sorted(c["dims"].items())) for c in cases.values()}
        assert len(shapes) >= 2, f"{name} validated at fewer than two shapes"
        with OnnxRuntimeRunner(spec, out / "onnx" / name / "model.onnx") as runner:
            for point, case in cases.items():
                got = runner.infer(case["inputs"])
                assert all(np.isfinite(v).all() for v in got.values())
                result = compare(name, point, case["dims"], case["outputs"], got, tol)
                assert result.passed, result.to_json()


def test_t5_sequence_is_its_own_configurable_dim(pipeline):
    from exporters.errors import ShapeError

    _, specs = plan_specs(pipeline("tiny-flux"), ["text_encoder_2", "transformer"],
                          ShapeRequest(t5_sequence=(64, 128, 512)))
    t5 = specs["text_encoder_2"].dim("t5_sequence")
    assert (t5.min, t5.opt, t5.max) == (64, 128, 512)
    assert specs["transformer"].profile()["txt_ids"] == {"min": (64, 3), "opt": (128, 3), "max": (512, 3)}
    assert specs["transformer"].profile()["encoder_hidden_states"]["max"][1] == 512
    with pytest.raises(ShapeError, match="exceeds the pipeline's 256"):
        plan_specs(pipeline("tiny-sd3"), ["text_encoder_3"], ShapeRequest(t5_sequence=(64, 128, 300)))


def test_flux_images_must_be_multiples_of_the_packed_grid(pipeline):
    from exporters.errors import ShapeError

    with pytest.raises(ShapeError, match="multiple of 4"):  # tiny VAE scale 2 x 2x2 packing
        plan_specs(pipeline("tiny-flux"), ["transformer"], ShapeRequest(image=(30, 64, 128)))


def test_sd3_without_t5_leaves_it_out(pipeline):
    import copy

    pipe = copy.copy(pipeline("tiny-sd3"))  # shallow: the modules stay shared and untouched
    pipe.text_encoder_3 = None
    _, specs = plan_specs(pipe)
    assert "text_encoder_3" not in specs
    assert specs["transformer"].dim("text_sequence").opt == 77 + 256  # the pipeline pads zeros in its place


def test_flux_schnell_style_transformer_has_no_guidance_input(pipeline):
    import copy

    from diffusers import FluxTransformer2DModel

    pipe = copy.copy(pipeline("tiny-flux"))
    config = dict(pipe.transformer.config)
    config["guidance_embeds"] = False
    pipe.transformer = FluxTransformer2DModel.from_config(config)
    _, specs = plan_specs(pipe, ["transformer"])
    assert "guidance" not in specs["transformer"].input_names


def test_openvino_fp32_validates_every_component(openvino_dit):
    from diffprism.jobs import validate_job

    for preset, out in openvino_dit.items():
        result = validate_job(out, target="openvino", precision="fp32")
        assert result.passed, (preset, [c.to_json() for c in result.comparisons if not c.passed])
        _, specs = read_tree_info(out / "onnx")
        assert {c.component for c in result.comparisons} == set(specs)


def test_model_index_loads_in_older_transformers(exported):
    """T5's entry names the fast class (the slow one needs sentencepiece and spiece.model)."""
    index = json.loads((exported("tiny-flux") / "onnx" / "model_index.json").read_text())
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    config = json.loads((exported("tiny-flux") / "onnx" / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert isinstance(config.get("extra_special_tokens", {}), dict)
