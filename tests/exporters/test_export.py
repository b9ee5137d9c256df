"""The spine on all three tiny presets: tree layout, tensor names, dynamic dims, ORT vs PyTorch."""
import json

import numpy as np
import onnx
import pytest

from exporters import reference
from exporters.errors import ShapeError, UsageError
from exporters.export import plan_specs
from exporters.onnx_writer import DATA_NAME, MIN_OPSET, read_spec
from exporters.spec import ShapeRequest
from exporters.tree import read_tree_info
from runtimes.onnxruntime_runner import OnnxRuntimeRunner
from validation.compare import compare
from validation.policy import Policy

EXPECTED = {
    "tiny-sd": ["text_encoder", "unet", "vae_encoder", "vae_decoder"],
    "tiny-sd2": ["text_encoder", "unet", "vae_encoder", "vae_decoder"],
    "tiny-sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"],
}
IO = {
    "text_encoder": (["input_ids"], "last_hidden_state"),
    "text_encoder_2": (["input_ids"], "text_embeds"),
    "unet": (["sample", "timestep", "encoder_hidden_states"], "out_sample"),
    "vae_encoder": (["sample"], "latent_parameters"),
    "vae_decoder": (["latent_sample"], "sample"),
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_tree_layout(exported, preset):
    tree = exported(preset) / "onnx"
    assert json.loads((tree / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
    assert (tree / "scheduler" / "scheduler_config.json").is_file()
    assert (tree / "tokenizer").is_dir()
    if preset == "tiny-sdxl":
        assert (tree / "tokenizer_2").is_dir()
    info, specs = read_tree_info(tree)
    assert list(specs) == EXPECTED[preset]
    for name in EXPECTED[preset]:
        files = sorted(p.name for p in (tree / name).iterdir())
        assert files == ["config.json", "model.onnx", DATA_NAME], files
        assert json.loads((tree / name / "config.json").read_text())


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_graphs_have_spec_names_dims_and_opset(exported, preset):
    tree = exported(preset) / "onnx"
    for name in EXPECTED[preset]:
        path = tree / name / "model.onnx"
        proto = onnx.load(str(path), load_external_data=False)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= MIN_OPSET
        inputs = [i.name for i in proto.graph.input]
        outputs = [o.name for o in proto.graph.output]
        want_in, want_out = IO[name]
        assert inputs[: len(want_in)] == want_in
        assert want_out in outputs
        spec = read_spec(path)
        assert spec.input_names == inputs and spec.output_names == outputs
        # Dynamic dims carry the spec's names, not exporter symbols.
        batch_axis = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_axis.dim_param == "batch"
        # Weights live in the one external-data file, none inline above 1 KiB.
        for init in proto.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                assert len(init.raw_data) <= 1024, init.name
        onnx.checker.check_model(str(path))


def test_sdxl_extras(exported):
    _, specs = read_tree_info(exported("tiny-sdxl") / "onnx")
    assert specs["unet"].input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert "pooler_output" in specs["text_encoder"].output_names
    assert specs["text_encoder_2"].output_names[:2] == ["text_embeds", "last_hidden_state"]
    assert any(n.startswith("hidden_states.") for n in specs["text_encoder_2"].output_names)


@pytest.mark.parametrize("preset", list(EXPECTED))
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
                result = compare(name, point, case["dims"], case["outputs"], runner.infer(case["inputs"]), tol)
                assert result.passed, result.to_json()


def test_spatial_request_must_be_a_multiple_of_the_latent_grid(pipeline):
    with pytest.raises(ShapeError, match="multiple of 16"):  # tiny VAE scale 2 x latent multiple 8
        plan_specs(pipeline("tiny-sd"), shapes=ShapeRequest(image=(40, 64, 128)))
    with pytest.raises(ShapeError, match="exceeds"):
        plan_specs(pipeline("tiny-sd"), shapes=ShapeRequest(sequence=(1, 77, 100)))


def test_unknown_component_is_an_error_not_a_skip(pipeline):
    with pytest.raises(UsageError, match="text_encoder_2"):
        plan_specs(pipeline("tiny-sd"), components=["unet", "text_encoder_2"])


def test_requested_ranges_reach_the_spec(pipeline):
    _, specs = plan_specs(pipeline("tiny-sd"), ["unet"], ShapeRequest(batch=(1, 1, 2), image=(32, 64, 96)))
    height = specs["unet"].dim("height")
    assert (height.min, height.opt, height.max) == (16, 32, 48)


def test_batch_counts_images_and_the_denoiser_doubles_under_guidance(pipeline):
    _, specs = plan_specs(pipeline("tiny-sdxl"), shapes=ShapeRequest(batch=(1, 2, 3)))
    batch = {name: (s.dim("batch").min, s.dim("batch").opt, s.dim("batch").max) for name, s in specs.items()}
    assert batch == {"text_encoder": (1, 2, 3), "text_encoder_2": (1, 2, 3), "unet": (2, 4, 6),
                     "vae_encoder": (1, 2, 3), "vae_decoder": (1, 2, 3)}


def test_exporter_kind_follows_the_module_class_not_the_name(pipeline):
    from types import SimpleNamespace

    from exporters.errors import SourceError
    from exporters.families import family_of

    sdxl = pipeline("tiny-sdxl")
    family = family_of(type(sdxl).__name__)
    kinds = {name: family.exporter(sdxl, name).kind for name in family.names}
    assert kinds == {"text_encoder": "clip_text", "text_encoder_2": "clip_text_projection", "unet": "unet",
                     "vae_encoder": "vae_encoder", "vae_decoder": "vae_decoder"}
    # The same slot holding a plain CLIP encoder gets the plain CLIP exporter.
    swapped = SimpleNamespace(text_encoder_2=sdxl.text_encoder)
    assert family.exporter(swapped, "text_encoder_2").kind == "clip_text"
    # SDXL consumes every hidden state (penultimate layer); SD does not.
    _, specs = plan_specs(sdxl, ["text_encoder_2"])
    assert "hidden_states.0" in specs["text_encoder_2"].output_names
    _, sd_specs = plan_specs(pipeline("tiny-sd"), ["text_encoder"])
    assert not any(n.startswith("hidden_states") for n in sd_specs["text_encoder"].output_names)
    with pytest.raises(SourceError, match="no exporter for"):
        family.exporter(SimpleNamespace(text_encoder=sdxl.vae), "text_encoder")


def test_geometry_is_in_the_tree_info(exported, pipeline, copy_export):
    import json

    from exporters.errors import SourceError
    from exporters.families import family_of
    from exporters.geometry import compute
    from exporters.tree import read_geometry

    pipe = pipeline("tiny-sdxl")
    geometry = read_geometry(exported("tiny-sdxl") / "onnx")
    assert geometry == compute(pipe, family_of(type(pipe).__name__))
    assert (geometry.vae_scale_factor, geometry.latent_channels, geometry.denoiser, geometry.guidance) == (2, 4, "unet", True)
    assert geometry.scaling_factor == pipe.vae.config.scaling_factor
    assert set(geometry.max_sequence) == {"text_encoder", "text_encoder_2"}
    old = copy_export("tiny-sd") / "onnx"
    info = json.loads((old / "diffprism.json").read_text())
    del info["geometry"]
    (old / "diffprism.json").write_text(json.dumps(info))
    with pytest.raises(SourceError, match="re-run 'diffprism export'"):
        read_geometry(old)


def test_default_references_cover_several_shape_points(exported):
    out = exported("tiny-sd")
    _, specs = read_tree_info(out / "onnx")
    for name, spec in specs.items():
        cases = reference.load(out / "reference" / f"{name}.npz")
        shapes = {tuple(v.shape for v in case["inputs"].values()) for case in cases.values()}
        assert len(shapes) == len(cases) >= 2, (name, list(cases))
        # static builds at the opt size have a reference to be judged by
        assert spec.dim_values("opt") in [case["dims"] for case in cases.values()]
    unet = reference.load(out / "reference" / "unet.npz")
    small = unet["small"]["inputs"]["sample"].shape
    assert small[0] == 3 and small[2] < small[3]  # one step up in batch and width: off-square
    assert max(c["inputs"]["sample"].shape[3] for c in unet.values()) < specs["unet"].dim("width").max


def test_references_are_deterministic(exported, pipeline, tmp_path):
    from exporters.families import exporter_for
    from exporters.spec import select_points

    out = exported("tiny-sd")
    _, specs = read_tree_info(out / "onnx")
    spec = specs["vae_decoder"]
    wrapper = exporter_for(pipeline("tiny-sd"), "vae_decoder").wrap(pipeline("tiny-sd").vae, spec)
    reference.save(reference.compute(wrapper, spec, select_points(spec)), tmp_path / "a.npz")
    assert (tmp_path / "a.npz").read_bytes() == (out / "reference" / "vae_decoder.npz").read_bytes()
    cases = reference.load(tmp_path / "a.npz")
    assert all(np.isfinite(c["outputs"]["sample"]).all() for c in cases.values())
