"""OpenVINO target: plans, builds of every precision from the tiny presets, IR contents, runner, validation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffprism.jobs import calibrate_job
from exporters import calibration
from exporters.errors import BackendUnavailable, ShapeError, UsageError
from exporters.tree import read_tree_info
from targets.base import get_target

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'diffprism[openvino]')")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'diffprism[openvino]')")

from targets.openvino import BIN_NAME, XML_NAME, OpenVinoTarget, ir_summary  # noqa: E402


def _ir(folder: Path, component: str):
    return ov.Core().read_model(str(folder / component / XML_NAME))


def _workdir(exported, pipeline, tmp_path_factory, name: str) -> Path:
    """A private copy of the session export plus a small calibration capture (2 prompts x 2 steps)."""
    out = tmp_path_factory.mktemp(f"ov-{name}") / name
    shutil.copytree(exported(name), out)
    calibrate_job(out, prompts=calibration.DEFAULT_PROMPTS[:2], steps=2)  # recorded in the manifest
    return out


@pytest.fixture(scope="module")
def sd(exported, pipeline, tmp_path_factory):
    return _workdir(exported, pipeline, tmp_path_factory, "tiny-sd")


@pytest.fixture(scope="module")
def sd_builds(sd):
    from diffprism.jobs import compile_job

    return {p: compile_job(sd, target="openvino", precision=p) for p in ("fp32", "fp16", "int8", "int4")}


# --- plan (pure) ---------------------------------------------------------------------------


def test_plan_per_precision(exported):
    tree = exported("tiny-sd") / "onnx"
    specs = read_tree_info(tree)[1]
    target = get_target("openvino")
    plan = target.plan(tree, specs, target.config(precision="int8"))
    assert plan["out_name"] == "openvino-int8"
    assert {n: c["compression"] for n, c in plan["components"].items()} == {
        "text_encoder": "int8_weights", "unet": "int8_activations", "vae_decoder": "int8_weights",
        "vae_encoder": "int8_weights"}
    plan = target.plan(tree, specs, target.config(precision="int8", quantize_activations=["unet", "vae_decoder"]))
    assert plan["components"]["vae_decoder"]["compression"] == "int8_activations"
    plan = target.plan(tree, specs, target.config(precision="int4"))
    assert {c["compression"] for c in plan["components"].values()} == {"int4_weights"}
    # Dynamic by default: the spec's bounded ranges (latent 16..64; the VAE encoder's pixels, VAE scale 2).
    shapes = target.plan(tree, specs, target.config(precision="fp32"))["components"]
    # Batch per component: 1..2 images, the UNet 2 latents per image under guidance.
    assert shapes["unet"]["shapes"]["sample"] == [[2, 4], 4, [16, 64], [16, 64]]
    assert shapes["vae_encoder"]["shapes"]["sample"] == [[1, 2], 3, [32, 128], [32, 128]]
    assert shapes["text_encoder"]["shapes"]["input_ids"] == [[1, 2], 77]


def test_plan_static_shapes(exported, tmp_path):
    tree = exported("tiny-sd") / "onnx"
    specs = read_tree_info(tree)[1]
    target = get_target("openvino")
    comps = target.plan(tree, specs, target.config(precision="fp16", static="64x128", batch=2))["components"]
    assert comps["unet"]["shapes"]["sample"] == [4, 4, 32, 64]  # pixels / VAE scale 2; 2 images x 2 (guidance)
    assert comps["vae_encoder"]["shapes"]["sample"] == [2, 3, 64, 128]
    assert comps["vae_decoder"]["shapes"]["latent_sample"] == [2, 4, 32, 64]
    # A UNet-only export: the VAE scale comes from the tree's geometry, recorded at export.
    comps = target.plan(tree, {"unet": specs["unet"]}, target.config(static="128x128"))["components"]
    assert comps["unet"]["shapes"]["sample"] == [[2, 4], 4, 64, 64]
    with pytest.raises(UsageError, match="HEIGHTxWIDTH"):
        target.plan(tree, specs, target.config(static="512"))
    with pytest.raises(ShapeError, match="outside the exported range"):
        target.plan(tree, specs, target.config(static="4096x4096"))
    with pytest.raises(UsageError, match="not in this export"):
        target.plan(tree, specs, target.config(precision="int8", quantize_activations=["transformer"]))
    with pytest.raises(UsageError, match="no precision"):
        target.config(precision="int2")


def test_availability_and_registry():
    target = get_target("openvino")
    assert isinstance(target, OpenVinoTarget) and target.availability().ok


def test_int8_without_calibration_captures_it_first(copy_export, caplog):
    import logging

    from diffprism import manifest
    from diffprism.jobs import compile_job

    out = copy_export("tiny-sd")
    assert not (out / "calibration").exists()
    with caplog.at_level(logging.WARNING, logger="diffprism.jobs"):
        result = compile_job(out, target="openvino", precision="int8", components=["unet"])
    assert "running 'diffprism calibrate' with its defaults" in caplog.text  # and says so
    assert (out / "calibration" / "info.json").is_file()
    assert result.details["unet"]["fake_quantize"] > 0  # calibrated activations
    data = manifest.load(out)
    assert data["stages"]["calibrate"]["steps"] == 4 and "openvino-int8" in data["targets"]


# --- builds of tiny-sd -------------------------------------------------------------------------


def test_layout_loadable_by_optimum_intel(sd, sd_builds):
    folder = sd_builds["fp32"].out_dir
    assert folder == sd / "openvino-fp32"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    tokenizer = sorted(p.name for p in (sd / "onnx" / "tokenizer").iterdir())
    assert tokenizer and sorted(p.name for p in (folder / "tokenizer").iterdir()) == tokenizer
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        for f in (XML_NAME, BIN_NAME, "config.json"):
            assert (folder / name / f).is_file(), (name, f)
    names = {p.get_any_name() for p in _ir(folder, "unet").inputs}
    assert names == {"sample", "timestep", "encoder_hidden_states"}


def test_sizes_reported_and_weights_really_compressed(sd_builds):
    fp32 = sd_builds["fp32"].details["unet"]
    for precision, result in sd_builds.items():
        for name, d in result.details.items():
            on_disk = sum((result.out_dir / name / f).stat().st_size for f in (XML_NAME, BIN_NAME))
            assert d["bytes"] == on_disk > 0, (precision, name)
    assert sd_builds["fp16"].details["unet"]["bytes"] < 0.7 * fp32["bytes"]
    assert sd_builds["int8"].details["unet"]["bytes"] < 0.5 * fp32["bytes"]
    assert sd_builds["int4"].details["unet"]["bytes"] < 0.5 * fp32["bytes"]
    types = ir_summary(_ir(sd_builds["fp16"].out_dir, "unet"))["weights"]
    assert types.get("f16", 0) > 0
    assert "f16" not in ir_summary(_ir(sd_builds["fp32"].out_dir, "unet"))["weights"]


def test_int8_unet_has_quantized_activations(sd_builds):
    folder = sd_builds["int8"].out_dir
    unet = ir_summary(_ir(folder, "unet"))
    assert unet["ops"].get("FakeQuantize", 0) > 10  # activations quantized (calibrated)
    assert unet["weights"].get("i8", 0) + unet["weights"].get("u8", 0) > 10  # int8 weights stored
    assert sd_builds["int8"].details["unet"]["fake_quantize"] == unet["ops"]["FakeQuantize"]
    # The other components are weight-only: int8 constants, no activation quantizers.
    text = ir_summary(_ir(folder, "text_encoder"))
    assert text["ops"].get("FakeQuantize", 0) == 0
    assert text["weights"].get("u8", 0) + text["weights"].get("i8", 0) > 0


def test_every_unet_group_norm_is_one_op_in_each_precision(sd_builds, pipeline):
    import torch

    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in pipeline("tiny-sd").unet.modules())
    for precision, result in sd_builds.items():
        ops = ir_summary(_ir(result.out_dir, "unet"))["ops"]
        assert ops.get("GroupNormalization", 0) == norms == result.details["unet"]["group_norms_fused"], precision
        assert ops.get("MVN", 0) == sum(isinstance(m, torch.nn.LayerNorm) for m in pipeline("tiny-sd").unet.modules())


def test_int4_has_4bit_weights(sd_builds):
    for name in ("unet", "text_encoder"):
        weights = ir_summary(_ir(sd_builds["int4"].out_dir, name))["weights"]
        assert weights.get("u4", 0) + weights.get("i4", 0) > 0, (name, weights)


def _device_default() -> str:
    """The CPU plugin's own inference precision (bf16 on CPUs with AVX512-BF16/AMX, else f32)."""
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_validates_against_pytorch(sd, sd_builds, precision):
    from diffprism import manifest
    from diffprism.jobs import validate_job
    from runtimes.openvino_runner import ROWS
    from validation.policy import loosest

    result = validate_job(sd, target="openvino", precision=precision)
    bad = [(c.component, c.point, c.check, c.error, [v for o in c.outputs for v in o.violations])
           for c in result.comparisons if not c.passed]
    assert result.passed, bad
    from exporters import reference

    # every reference point of every component ran, as deployed
    stored = sum(len(reference.load(f)) for f in (sd / "reference").glob("*.npz"))
    assert stored == 11  # min, opt and a small point (the text encoder's min is its opt)
    deploy = [c for c in result.comparisons if c.check == "deploy"]
    weights = [c for c in result.comparisons if c.check == "weights_only"]
    assert len(deploy) == stored
    data = manifest.load(sd)
    entry = data["validation"][f"openvino-{precision}"]
    if precision == "fp32":  # deployed at f32: the deploy check is the full-precision one, no second run
        assert {r["hint"] for r in result.runner.values()} == {"f32"}
        assert {r["inference_precision"] for r in result.runner.values()} == {"f32"}
        assert set(result.rows.values()) == {"fp32"} and not weights and not result.weights_only
        assert max(c.worst("rel_l2") for c in result.comparisons) < 1e-5  # same math, other kernels
    else:
        # Deployed at the device's own precision, read back from each compiled model, and judged by the
        # looser of the variant's row and that precision's (an fp16 IR computed in bf16: the bf16 row).
        assert {r["hint"] for r in result.runner.values()} == {"default"}
        assert {r["inference_precision"] for r in result.runner.values()} == {_device_default()}
        assert set(result.rows.values()) == {loosest([precision, ROWS[_device_default()]])}
        if precision == "fp16" and "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            assert set(result.rows.values()) == {"bf16"}
        assert {c.row for c in deploy} == set(result.rows.values())
        # Beside it, the weights-only check: the same points at the f32 hint, by the variant's own row.
        assert len(weights) == stored and {c.row for c in weights} == {precision}
        assert {w["runner"]["inference_precision"] for w in result.weights_only.values()} == {"f32"}
        assert entry["weights_only"] == result.weights_only
        assert result.to_json()["checks"] == {"deploy": True, "weights_only": True}
    assert entry["passed"] and entry["rows"] == result.rows and entry["runner"] == result.runner
    assert entry["comparisons"] == len(result.comparisons)
    assert data["targets"][f"openvino-{precision}"]["details"]["unet"]["bytes"] > 0


def test_deploy_check_failing_fails_the_verdict(sd, sd_builds):
    """Judged as shipped: a deploy check outside its row fails the verdict though the weights-only check passes."""
    from diffprism import manifest
    from diffprism.jobs import validate_job
    from validation.policy import DEFAULTS, Policy, Tolerance

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU computes f32 by default: deploy and weights-only checks coincide")
    strict = Policy(defaults={**DEFAULTS, "bf16": Tolerance(rel_l2=1e-7)})  # tighter than any bf16 result
    result = validate_job(sd, target="openvino", precision="fp16", components=["unet"], policy=strict)
    assert not result.passed
    assert result.to_json()["checks"] == {"deploy": False, "weights_only": True}
    assert manifest.load(sd)["validation"]["openvino-fp16"]["components"]["unet"]["status"] == "failed"
    assert validate_job(sd, target="openvino", precision="fp16", components=["unet"]).passed  # restore the verdict


def test_runners_report_the_deploy_hint(sd, sd_builds):
    """fp16/int8 runners compile at the device default (read back from the compiled model), fp32 at f32;
    an explicit hint option wins over the variant's configuration."""
    from diffprism.variant import Variant

    target = get_target("openvino")
    spec = read_tree_info(sd / "onnx")[1]["unet"]
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for precision, hint in (("fp32", "f32"), ("fp16", "default"), ("int8", "default")):
        variant = Variant.of("openvino", precision)
        assert variant.runtime_options() == {"hint": hint}
        with target.runner(sd_builds[precision].out_dir, spec, **variant.runtime_options()) as r:
            used = r.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            assert r.describe()["inference_precision"] == used
            assert used == ("f32" if precision == "fp32" else _device_default())
            assert r.compute_precision() == {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}[used]
        if "BF16" in caps and precision != "fp32":
            assert used == "bf16"
    options = Variant.of("openvino", "fp32").runtime_options({"hint": "bf16"})
    assert options == {"hint": "bf16"}
    with target.runner(sd_builds["fp32"].out_dir, spec, **options) as r:
        if "BF16" in caps:
            assert r.compute_precision() == "bf16"  # an fp32 IR computed in bf16 is judged by the bf16 row


def test_hint_option_variant_is_judged_by_its_compute_precision(sd, sd_builds):
    from diffprism.jobs import validate_job

    result = validate_job(sd, target="openvino", precision="fp32", components=["unet"], runner_options={"hint": "bf16"})
    used = {r["inference_precision"] for r in result.runner.values()}
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert used == {"bf16"} and result.rows == {"unet": "bf16"}
    # The weights-only check beside it, at f32 and by the variant's own row, wherever the deploy run was not f32.
    assert {w["runner"]["inference_precision"] for w in result.weights_only.values()} == {"f32"}
    assert {w["row"] for w in result.weights_only.values()} == {"fp32"}
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]
    validate_job(sd, target="openvino", precision="fp32", components=["unet"])  # the default verdict again


# --- runner ----------------------------------------------------------------------------------


def test_runner_hint_cache_and_device(sd, sd_builds, tmp_path):
    from exporters import reference

    target = get_target("openvino")
    spec = read_tree_info(sd / "onnx")[1]["unet"]
    case = reference.load(sd / "reference" / "unet.npz")["opt"]
    cache = tmp_path / "cache"
    with target.runner(sd_builds["fp32"].out_dir, spec, cache_dir=cache) as r:
        f32 = r.infer(case["inputs"])["out_sample"]
        assert r.describe()["inference_precision"] == "f32"
    assert any(cache.iterdir())  # compiled blob cached for the next load
    np.testing.assert_allclose(f32, case["outputs"]["out_sample"], rtol=1e-4, atol=1e-4)
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with target.runner(sd_builds["fp32"].out_dir, spec, hint="bf16") as r:
        bf16 = r.infer(case["inputs"])["out_sample"]
        used = r.describe()["inference_precision"]
    if "BF16" in caps:
        assert used == "bf16"
        assert not np.array_equal(bf16, f32)  # the hint really changed the compute precision
    with pytest.raises(UsageError, match="precision hint"):
        target.runner(sd_builds["fp32"].out_dir, spec, hint="int8")
    with pytest.raises(BackendUnavailable, match="not present"):
        target.runner(sd_builds["fp32"].out_dir, spec, device="NOSUCHDEVICE").activate()


# --- static shapes, CLI, SDXL --------------------------------------------------------------------


def test_static_int8_build_via_cli(sd, capfd):
    from diffprism.cli import main

    code = main(["--json", "compile", str(sd), "--target", "openvino", "--precision", "int8", "--components", "unet",
                 "--option", "static=64x64", "--option", "batch=1", "--option", "int8_scheme=full"])
    out = capfd.readouterr().out
    assert code == 0
    doc = json.loads(out)  # NNCF's progress output must not leak into the JSON document
    assert doc["details"]["unet"]["fake_quantize"] > 0
    folder = Path(doc["dir"])
    assert folder.name.startswith("openvino-int8-")  # beside the default int8 variant, named by its options digest
    model = _ir(folder, "unet")
    assert all(p.get_partial_shape().is_static for p in model.inputs)
    assert list(model.input("sample").get_shape()) == [2, 4, 32, 32]  # one image: 2 latents under guidance
    code = main(["--json", "validate", str(sd), "--target", "openvino", "--precision", "int8", "--components", "unet",
                 "--option", "static=64x64", "--option", "batch=1", "--option", "int8_scheme=full"])
    doc = json.loads(capfd.readouterr().out)
    assert code == 0 and doc["passed"]
    # the one reference case of that fixed size, as deployed and in the weights-only check beside it
    assert [(c["point"], c["check"]) for c in doc["comparisons"]] == [("opt", "deploy"), ("opt", "weights_only")]
    assert "unet/min" in doc["skipped_points"]


@pytest.fixture(scope="module")
def sdxl(exported, pipeline, tmp_path_factory):
    return _workdir(exported, pipeline, tmp_path_factory, "tiny-sdxl")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_sdxl_builds_and_validates(sdxl, precision):
    from diffprism.jobs import compile_job, validate_job

    # int8: the calibrated UNet with SDXL's added conditioning; the other components' int8 is weight-only, as tiny-sd's
    components = ["unet"] if precision == "int8" else None
    result = compile_job(sdxl, target="openvino", precision=precision, components=components)
    assert set(result.details) == set(components or ("text_encoder", "text_encoder_2", "unet", "vae_encoder",
                                                     "vae_decoder"))
    assert (result.out_dir / "tokenizer_2").is_dir()
    unet = _ir(result.out_dir, "unet")
    assert {"text_embeds", "time_ids"} <= {p.get_any_name() for p in unet.inputs}
    if precision == "int8":
        assert ir_summary(unet)["ops"].get("FakeQuantize", 0) > 10
    check = validate_job(sdxl, target="openvino", precision=precision, components=components)
    bad = [(c.component, c.point, [v for o in c.outputs for v in o.violations]) for c in check.comparisons if not c.passed]
    assert check.passed, bad
