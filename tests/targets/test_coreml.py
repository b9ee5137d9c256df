"""Core ML target: conversion from the torch.export program, flexible shapes, compression, metadata,
structural validation here and numeric validation on macOS.

Each (preset, components, options) build happens once per session (`built`); the builds write into
a private folder that links the session export's onnx/ and reference/.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

pytest.importorskip("coremltools")

from diffprism.cli import main  # noqa: E402
from exporters.errors import BackendUnavailable, ExportError, UsageError  # noqa: E402
from exporters.tree import read_tree_info  # noqa: E402
from targets import coreml_convert  # noqa: E402
from targets.coreml import CoreMlTarget  # noqa: E402
from targets.coreml_inspect import inspect_package  # noqa: E402

TINY_SD = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
SMALL = ("text_encoder",)  # the quickest component, for the compression and option variants
MAC_ONLY = "Core ML predictions need macOS"


@pytest.fixture(scope="session")
def built(exported, pipeline, tmp_path_factory):
    """built(preset, components, **options) -> (out folder, BuildResult, specs), once per session."""
    cache: dict = {}

    def get(preset: str, components: tuple[str, ...], **options):
        key = (preset, components, tuple(sorted(options.items())))
        if key not in cache:
            src = exported(preset)
            out = tmp_path_factory.mktemp(f"coreml-{preset}")
            for part in ("onnx", "reference"):
                (out / part).symlink_to(src / part)
            target = CoreMlTarget()
            _, specs = read_tree_info(out / "onnx")
            specs = {n: specs[n] for n in components}
            config = target.config(components=list(components), **options)
            plan = target.plan(out / "onnx", specs, config)
            cache[key] = (out, target.build(plan, out, source=pipeline(preset)), specs)
        return cache[key]

    return get


def package_spec(path: Path):
    import coremltools as ct

    return ct.utils.load_spec(str(path))


# -- conversion of every component ----------------------------------------------------------


def test_tiny_sd_every_component_converts_and_matches_its_spec(built):
    out, result, specs = built("tiny-sd", TINY_SD)
    assert result.out_dir == out / "coreml-fp16"
    for name, spec in specs.items():
        path = out / "coreml-fp16" / f"{name}.mlpackage"
        facts = inspect_package(path, spec, precision="fp16", compress="none")
        assert facts["ok"], facts["problems"]
        assert facts["shapes"] == "range" and "fallback" not in result.details[name]
        # The program handed to coremltools reproduces the stored PyTorch reference.
        assert result.details[name]["program_rel_l2"] < 1e-4
        pb = package_spec(path)
        assert [i.name for i in pb.description.input] == spec.input_names
        assert [o.name for o in pb.description.output] == spec.output_names
        # fp16 weights, fp32 I/O
        assert facts["weights"].get("float16", 0) > 0 and not facts["weights"].get("float32")
        assert all(v["dtype"] in ("float32", "int32") for v in facts["io"].values())


def test_flexible_shape_ranges_follow_the_component_spec(built):
    out, _, specs = built("tiny-sd", TINY_SD)
    unet = package_spec(out / "coreml-fp16" / "unet.mlpackage")
    sample = next(i for i in unet.description.input if i.name == "sample").type.multiArrayType
    ranges = [(r.lowerBound, r.upperBound) for r in sample.shapeRange.sizeRanges]
    b, h, w = specs["unet"].dim("batch"), specs["unet"].dim("height"), specs["unet"].dim("width")
    assert ranges == [(b.min, b.max), (4, 4), (h.min, h.max), (w.min, w.max)]
    # The VAE encoder's image input is scale x the latent dims.
    enc = package_spec(out / "coreml-fp16" / "vae_encoder.mlpackage")
    image = enc.description.input[0].type.multiArrayType
    scale = specs["vae_encoder"].inputs[0].axes[2].scale
    assert [(r.lowerBound, r.upperBound) for r in image.shapeRange.sizeRanges][2] == (h.min * scale, h.max * scale)
    # Token ids are int32 in Core ML (no int64 multiarrays).
    te = package_spec(out / "coreml-fp16" / "text_encoder.mlpackage")
    assert te.description.input[0].type.multiArrayType.dataType == te.description.input[0].type.multiArrayType.INT32


def test_metadata_names_source_versions_precision_and_io(built):
    out, _, specs = built("tiny-sd", TINY_SD)
    pb = package_spec(out / "coreml-fp16" / "unet.mlpackage")
    meta = pb.description.metadata
    assert meta.author == "diffprism" and meta.versionString
    assert "unet of tiny-sd" in meta.shortDescription
    user = dict(meta.userDefined)
    assert user["diffprism.precision"] == "fp16" and user["diffprism.compress"] == "none"
    assert json.loads(user["diffprism.source"])["preset"] == "tiny-sd"
    assert {"torch", "coremltools", "diffusers"} <= set(json.loads(user["diffprism.versions"]))
    assert json.loads(user["diffprism.spec"]) == specs["unet"].to_json()
    descriptions = {f.name: f.shortDescription for f in (*pb.description.input, *pb.description.output)}
    assert "height in [" in descriptions["sample"] and descriptions["out_sample"].startswith("float32")


def test_tiny_sdxl_text_encoders_and_unet(built):
    # SDXL's OpenCLIP text encoder (gelu) and linear-projection UNet are SD 2.x's too; its CLIP-L text encoder is
    # tiny-sd's, converted by test_tiny_sd_every_component_converts_and_matches_its_spec.
    out, result, specs = built("tiny-sdxl", ("text_encoder_2", "unet"))
    for name, spec in specs.items():
        facts = inspect_package(out / "coreml-fp16" / f"{name}.mlpackage", spec, precision="fp16", compress="none")
        assert facts["ok"], facts["problems"]
        assert facts["shapes"] == "range", name  # as the SD 2.x test asserted for these layers
        assert result.details[name]["program_rel_l2"] < 1e-4
    outputs = [o.name for o in package_spec(out / "coreml-fp16" / "text_encoder_2.mlpackage").description.output]
    # Core ML feature names are identifiers: hidden_states.1 -> hidden_states_1, recorded in the package.
    assert outputs[0] == "text_embeds" and "hidden_states_1" in outputs
    renamed = json.loads(dict(package_spec(out / "coreml-fp16" / "text_encoder_2.mlpackage").description.metadata
                              .userDefined)["diffprism.io_names"])
    assert renamed["hidden_states.1"] == "hidden_states_1" and "text_embeds" not in renamed
    unet_inputs = [i.name for i in package_spec(out / "coreml-fp16" / "unet.mlpackage").description.input]
    assert unet_inputs[-2:] == ["text_embeds", "time_ids"]


# -- precision and compression --------------------------------------------------------------


def test_fp32_keeps_fp32_weights(built):
    out, result, specs = built("tiny-sd", ("text_encoder",), precision="fp32")
    facts = inspect_package(out / "coreml-fp32" / "text_encoder.mlpackage", specs["text_encoder"],
                            precision="fp32", compress="none")
    assert facts["ok"], facts["problems"]
    assert facts["weights"].get("float32", 0) > 0 and not facts["weights"].get("float16")


@pytest.mark.parametrize("compress, op, components", [
    ("palettize4", "constexpr_lut_to_dense", SMALL),
    ("linear8", "constexpr_affine_dequantize", ("text_encoder",)),
])
def test_compressed_packages_are_smaller_and_carry_the_compression(built, compress, op, components):
    plain_out, plain, _ = built("tiny-sd", TINY_SD)
    out, result, specs = built("tiny-sd", components, compress=compress)
    assert result.out_dir == out / f"coreml-fp16-{compress}"
    for name in components:
        facts = inspect_package(result.out_dir / f"{name}.mlpackage", specs[name], precision="fp16", compress=compress)
        assert facts["ok"], facts["problems"]
        assert facts["ops"].get(op, 0) > 0
        assert result.details[name]["bytes"] < plain.details[name]["bytes"]
        assert dict(package_spec(result.out_dir / f"{name}.mlpackage").description.metadata.userDefined)[
            "diffprism.compress"] == compress


def test_inspection_reports_mismatches(built):
    out, _, specs = built("tiny-sd", TINY_SD)
    path = out / "coreml-fp16" / "text_encoder.mlpackage"
    wrong_precision = inspect_package(path, specs["text_encoder"], precision="fp32", compress="none")
    assert not wrong_precision["ok"] and any("float16 weight" in p for p in wrong_precision["problems"])
    wrong_compress = inspect_package(path, specs["text_encoder"], precision="fp16", compress="palettize4")
    assert any("constexpr_lut_to_dense" in p for p in wrong_compress["problems"])
    narrower = specs["text_encoder"].restrict(batch=(1, 1, 1))
    wrong_shapes = inspect_package(path, narrower, precision="fp16", compress="none")
    assert any("input_ids shapes" in p for p in wrong_shapes["problems"])


# -- shapes: enumerated and the static fallback -------------------------------------------


def _enumerated(pb, name):
    feature = next(f for f in pb.description.input if f.name == name)
    array = feature.type.multiArrayType
    if array.HasField("enumeratedShapes"):
        return [tuple(s.shape) for s in array.enumeratedShapes.shapes]
    assert not array.HasField("shapeRange"), f"{name} has a shape range in an enumerated package"
    return None  # static


def test_enumerated_resolutions(built):
    out, result, specs = built("tiny-sd", ("vae_decoder",), resolutions=("64x64", "32x64"))
    assert result.details["vae_decoder"]["shapes"] == "enumerated"
    shapes = _enumerated(package_spec(result.out_dir / "vae_decoder.mlpackage"), "latent_sample")
    scale = specs["vae_decoder"].outputs[0].axes[2].scale
    batch = specs["vae_decoder"].dim("batch")
    # one input: sizes x batch opt/min/max, the default (opt batch, first size) first
    assert shapes[0] == (batch.opt, 4, 64 // scale, 64 // scale) and (batch.min, 4, 32 // scale, 64 // scale) in shapes
    assert len(shapes) == len(set(shapes)) == 2 * len({batch.at(p) for p in ("min", "opt", "max")})


def test_enumerated_unet_below_ios18_enumerates_one_input(built):
    """Below iOS 18 Core ML takes one enumerated input: the UNet's batch is fixed, only sample varies."""
    out, result, specs = built("tiny-sd", ("unet",), resolutions=("64x64", "32x64"))
    details = result.details["unet"]
    assert details["shapes"] == "enumerated" and "fallback" not in details
    assert details["enumerated"]["inputs"] == ["sample"] and "batch fixed" in details["enumerated"]["notes"][0]
    spec, pb = specs["unet"], package_spec(result.out_dir / "unet.mlpackage")
    b, scale = spec.dim("batch").opt, 2
    assert _enumerated(pb, "sample") == [(b, 4, 32, 32), (b, 4, 16, 32)] == [(b, 4, 64 // scale, 64 // scale),
                                                                                (b, 4, 32 // scale, 64 // scale)]
    assert _enumerated(pb, "timestep") is None and _enumerated(pb, "encoder_hidden_states") is None
    facts = inspect_package(result.out_dir / "unet.mlpackage", spec, precision="fp16", compress="none")
    assert facts["ok"], facts["problems"]
    assert facts["io"]["timestep"] == {"dtype": "float32", "static": [b]}


def test_enumerated_unet_ios18_parallel_lists(built):
    """From iOS 18 every input that varies is enumerated, with as many shapes as points, matched by index."""
    out, result, specs = built("tiny-sd", ("unet",), resolutions=("64x64", "32x64"),
                               minimum_deployment_target="macOS15")
    details = result.details["unet"]
    assert "fallback" not in details and "notes" not in details["enumerated"]
    assert details["enumerated"]["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    spec, pb = specs["unet"], package_spec(result.out_dir / "unet.mlpackage")
    batch = spec.dim("batch")
    batches = list(dict.fromkeys(batch.at(p) for p in ("opt", "min", "max")))
    points = [(b, hw) for b in batches for hw in ((32, 32), (16, 32))]
    sample, timestep, hidden = (_enumerated(pb, n) for n in ("sample", "timestep", "encoder_hidden_states"))
    assert len(sample) == len(timestep) == len(hidden) == len(points)
    for i, (b, (h, w)) in enumerate(points):  # shape i of each input is point i
        assert sample[i] == (b, 4, h, w) and timestep[i] == (b,) and hidden[i][0] == b
    facts = inspect_package(result.out_dir / "unet.mlpackage", spec, precision="fp16", compress="none")
    assert facts["ok"], facts["problems"]


def test_enumeration_rules_without_conversion(exported):
    """The rules alone: one shape is static, not enumerated; the inspector flags packages that break them."""
    from targets.coreml_inspect import enumeration_problems

    _, specs = read_tree_info(exported("tiny-sd") / "onnx")
    one = coreml_convert.enumerate_shapes(specs["unet"].restrict(batch=(2, 2, 2)), [(32, 32)], "macOS14")
    assert one["inputs"] == [] and len(one["points"]) == 1 and "static" in one["notes"][0]
    text = coreml_convert.enumerate_shapes(specs["text_encoder"], [(32, 32), (16, 32)], "macOS14")
    assert text["inputs"] == ["input_ids"] and not text["notes"]  # one input: its batch may vary
    io = {"sample": {"enumerated": [[2, 4, 8, 8], [1, 4, 8, 8]]}, "timestep": {"enumerated": [[2], [1], [4]]}}
    problems = enumeration_problems(["sample", "timestep"], io, "macOS14")
    assert any("takes one" in p for p in problems) and any("different shape counts" in p for p in problems)
    assert enumeration_problems(["sample"], {"sample": {"enumerated": [[2, 4, 8, 8]]}}, "iOS18") == [
        "input sample enumerates 1 shape(s); Core ML needs at least two"]


def test_static_fallback_is_recorded(exported, pipeline, tmp_path, monkeypatch):
    """When the flexible conversion fails, the component is retraced and converted at its opt point."""
    real = coreml_convert.convert

    def flexible_fails(program, spec, *, mode, **kw):
        if mode != "static":
            raise ValueError("symbolic shape not supported")
        return real(program, spec, mode=mode, **kw)

    monkeypatch.setattr(coreml_convert, "convert", flexible_fails)
    for part in ("onnx", "reference"):
        (tmp_path / part).symlink_to(exported("tiny-sd") / part)
    target = CoreMlTarget()
    _, specs = read_tree_info(tmp_path / "onnx")
    spec = specs["text_encoder"]
    plan = target.plan(tmp_path / "onnx", {"text_encoder": spec}, target.config())
    result = target.build(plan, tmp_path, source=pipeline("tiny-sd"))
    details = result.details["text_encoder"]
    assert details["shapes"] == "static" and "symbolic shape not supported" in details["fallback"]
    assert "static-shape fallback" in result.note
    facts = inspect_package(result.out_dir / "text_encoder.mlpackage", spec, precision="fp16", compress="none")
    assert facts["ok"], facts["problems"]
    assert facts["io"]["input_ids"]["static"] == list(spec.input_shapes("opt")["input_ids"])


# -- plan and options -----------------------------------------------------------------------


def test_plan_is_pure_and_options_are_checked(exported, tmp_path):
    target = CoreMlTarget()
    tree = exported("tiny-sd") / "onnx"
    _, specs = read_tree_info(tree)
    plan = target.plan(tree, specs, target.config())
    assert plan["precision"] == "fp16" and plan["shapes"] == "range" and plan["dir"] == "coreml-fp16"
    assert plan["source"]["preset"] == "tiny-sd" and list(plan["components"]) == list(specs)
    assert target.output_dir(tmp_path, target.config(compress="palettize6")).name == "coreml-fp16-palettize6"
    with pytest.raises(UsageError, match="compress"):
        target.config(compress="int3")
    with pytest.raises(UsageError, match="deployment target"):
        target.config(minimum_deployment_target="macOS11")
    with pytest.raises(UsageError, match="no precision"):
        target.config(precision="int8")
    with pytest.raises(UsageError, match="not a multiple"):
        target.plan(tree, specs, target.config(resolutions="65x64"))
    with pytest.raises(UsageError, match="enumerated needs"):
        target.plan(tree, specs, target.config(shapes="enumerated"))
    with pytest.raises(UsageError, match="source pipeline"):
        target.build(plan, tmp_path)


# -- no Apple Swift loader layout ----------------------------------------------------------


def test_no_apple_swift_layout_is_claimed(built):
    """The packages keep diffusers' I/O, which Apple's Swift loader does not read: no Resources/, no option."""
    out, result, _ = built("tiny-sd", TINY_SD)
    assert not (result.out_dir / "Resources").exists() and "apple_names" not in result.details
    with pytest.raises(UsageError, match="apple_names"):
        CoreMlTarget().config(apple_names=True)


# -- CLI: compile, structural validation --------------------------------------------------


def test_cli_compile_and_structural_validate(copy_export, capsys):
    out = copy_export("tiny-sd")
    assert main(["--json", "compile", str(out), "--target", "coreml", "--precision", "fp16",
                 "--option", "compress=palettize4", "--components", "text_encoder"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["dir"].endswith("coreml-fp16-palettize4")
    assert doc["details"]["text_encoder"]["palettized_ops"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["coreml-fp16-palettize4"]["config"]["compress"] == "palettize4"

    args = ["--json", "validate", str(out), "--target", "coreml", "--components", "text_encoder",
            "--option", "compress=palettize4"]
    code = main(args)
    doc = json.loads(capsys.readouterr().out)
    if platform.system() == "Darwin":
        pytest.skip("numeric validation ran (macOS); see test_numeric_validation_on_macos")
    assert code == 0
    assert doc["status"] == "structural" and doc["passed"] is None and doc["comparisons"] == []
    assert doc["verdict"] == "structure ok, numerics not run" and "macOS" in doc["numerics_skipped"]
    assert doc["structure"]["text_encoder"]["ok"] and doc["precision"] == "fp16-palettize4"
    recorded = json.loads((out / "manifest.json").read_text())["validation"]["coreml-fp16-palettize4"]
    assert recorded["status"] == "structural" and recorded["passed"] is None

    assert main([*args, "--require-numeric"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    # No build of this variant: a clear error, not a structural "pass".
    assert main(["--json", "validate", str(out), "--target", "coreml", "--precision", "fp32"]) == 3


def test_runner_needs_macos_here(exported):
    if platform.system() == "Darwin":
        pytest.skip("this is macOS: predictions can run")
    from runtimes.coreml_runner import CoreMlRunner

    _, specs = read_tree_info(exported("tiny-sd") / "onnx")
    runner = CoreMlRunner(specs["text_encoder"], Path("missing.mlpackage"))
    with pytest.raises(BackendUnavailable, match=MAC_ONLY):
        runner.activate()
    assert not CoreMlTarget().runner_availability().ok


@pytest.mark.macos
def test_numeric_validation_on_macos(built):
    """Core ML predictions against the stored PyTorch references (no PyTorch re-run)."""
    if platform.system() != "Darwin":
        pytest.skip(f"{MAC_ONLY} (this is {platform.system()})")
    from diffprism.jobs import validate_job

    out, _, _ = built("tiny-sd", TINY_SD)
    result = validate_job(out, target="coreml", precision="fp16")
    assert result.status == "numeric" and result.comparisons
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]


def test_build_fails_clearly_when_the_source_changed(exported, pipeline, tmp_path):
    """The traced program is checked against the export's reference: a different source is an error."""
    from diffprism import presets

    for part in ("onnx", "reference"):
        (tmp_path / part).symlink_to(exported("tiny-sd") / part)
    target = CoreMlTarget()
    _, specs = read_tree_info(tmp_path / "onnx")
    plan = target.plan(tmp_path / "onnx", {"text_encoder": specs["text_encoder"]}, target.config())
    other = presets.build("tiny-sd", 1)  # other seed: other weights
    with pytest.raises(ExportError, match="differs from the export"):
        target.build(plan, tmp_path, source=other)
    assert not (tmp_path / "coreml-fp16").exists()


@pytest.mark.parametrize("preset", ("tiny-sd3", "tiny-flux"))
def test_dit_transformers_convert_and_pass_the_structural_check(built, preset):
    """SD3's MMDiT and Flux's transformer (packed tokens, int64 ids, guidance) from the same torch.export trace.
    coremltools 9 cannot give them range shapes: the static opt point is used, and the fallback recorded."""
    out, result, specs = built(preset, ("transformer",))
    spec = specs["transformer"]
    facts = inspect_package(out / "coreml-fp16" / "transformer.mlpackage", spec, precision="fp16", compress="none")
    assert facts["ok"], facts["problems"]
    details = result.details["transformer"]
    assert details["program_rel_l2"] < 1e-4  # the lowered program still computes what the export does
    assert details["shapes"] == "static" and "range shapes failed" in details["fallback"]
    inputs = [i.name for i in package_spec(out / "coreml-fp16" / "transformer.mlpackage").description.input]
    assert inputs == spec.input_names


def test_palettized_dit_transformer_passes_the_structural_check(built):
    """A 4-bit palettized transformer (look-up tables in the package); its predictions need macOS.
    tiny-flux's: SD3's converts by the same path, tested plain above."""
    preset = "tiny-flux"
    _, plain, _ = built(preset, ("transformer",))
    out, result, specs = built(preset, ("transformer",), compress="palettize4")
    path = out / "coreml-fp16-palettize4" / "transformer.mlpackage"
    facts = inspect_package(path, specs["transformer"], precision="fp16", compress="palettize4")
    assert facts["ok"], facts["problems"]
    assert facts["ops"].get("constexpr_lut_to_dense", 0) > 0 and result.details["transformer"]["palettized_ops"] > 0
    assert result.details["transformer"]["bytes"] < plain.details["transformer"]["bytes"]
    assert CoreMlTarget().tolerance_row(CoreMlTarget().config(compress="palettize4")) == "int4"


@pytest.mark.macos
def test_palettized_flux_transformer_predictions_on_macos(built):
    if platform.system() != "Darwin":
        pytest.skip(f"{MAC_ONLY} (this is {platform.system()})")
    from diffprism.jobs import validate_job

    out, _, _ = built("tiny-flux", ("transformer",), compress="palettize4")
    result = validate_job(out, target="coreml", precision="fp16", components=["transformer"],
                          runner_options={"compress": "palettize4"})
    assert result.status == "numeric" and result.passed, [c.to_json() for c in result.comparisons if not c.passed]
