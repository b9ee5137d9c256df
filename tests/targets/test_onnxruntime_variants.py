"""ONNX Runtime precision variants of tiny-sd: built once per module, each validated against PyTorch."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest

from diffprism import manifest
from diffprism.jobs import calibrate_job, compile_job, validate_job
from exporters import calibration
from exporters.errors import SourceError, UsageError
from exporters.tree import read_tree_info
from targets.base import get_target

VARIANTS = ("fp16", "bf16", "int8", "int8-dynamic", "int4")


@pytest.fixture(scope="module")
def built(exported, pipeline, tmp_path_factory):
    """A copy of the tiny-sd export with a small calibration capture and every variant built."""
    out = tmp_path_factory.mktemp("ort-variants") / "sd"
    shutil.copytree(exported("tiny-sd"), out)
    calibrate_job(out, prompts=["a red cube"], steps=2)  # recorded in the manifest, as compile requires
    results = {p: compile_job(out, target="onnxruntime", precision=p) for p in VARIANTS}
    return out, results


@pytest.mark.parametrize("precision", VARIANTS)
def test_variant_passes_its_tolerance(built, precision):
    out, _ = built
    result = validate_job(out, target="onnxruntime", precision=precision)
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]
    assert manifest.load(out)["validation"][f"onnxruntime-{precision}"]["passed"]


@pytest.mark.parametrize("precision", VARIANTS)
def test_variant_tree_is_laid_out_like_onnx(built, precision):
    out, results = built
    tree = out / f"onnx-{precision}"
    assert results[precision].out_dir == tree
    for item in (out / "onnx").iterdir():
        assert (tree / item.name).exists(), item.name
    info, specs = read_tree_info(tree)
    assert info["precision"] == precision and set(specs) == set(read_tree_info(out / "onnx")[1])
    for name in specs:
        assert {p.name for p in (tree / name).iterdir()} == {"model.onnx", "model.onnx_data", "config.json"}
        assert info["variant"][name]["bytes"] > 0
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())


def _ops(out, precision, component):
    return {n.op_type for n in onnx.load(str(out / f"onnx-{precision}" / component / "model.onnx"),
                                          load_external_data=False).graph.node}


def test_default_policy_per_component(built):
    out, results = built
    int8 = results["int8"].details
    assert int8["unet"]["method"] == "int8" and int8["unet"]["calibration"] == "capture"
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out, "int8", "unet")
    assert int8["text_encoder"]["method"] == "int8-dynamic" and "MatMulInteger" in _ops(out, "int8", "text_encoder")
    assert int8["vae_decoder"]["method"] == "fp16" and "islands" in int8["vae_decoder"]
    assert "MatMulNBits" in _ops(out, "int4", "unet")
    assert results["int4"].details["unet"]["bytes"] < results["int4"].details["unet"]["fp32_bytes"]
    assert results["fp16"].details["unet"]["bytes"] < 0.7 * results["fp16"].details["unet"]["fp32_bytes"]


def test_manifest_records_sizes_and_islands(built):
    out, _ = built
    targets = manifest.load(out)["targets"]
    fp16 = targets["onnxruntime-fp16"]
    assert fp16["dir"] == "onnx-fp16"
    vae = fp16["details"]["vae_decoder"]
    assert vae["islands"]["clean"] and isinstance(vae["islands"]["kept_fp32"], list)
    assert json.loads(json.dumps(fp16["details"]))  # JSON-able as written


def test_plan_applies_policy_overrides(exported):
    tgt = get_target("onnxruntime")
    _, specs = read_tree_info(exported("tiny-sd") / "onnx")
    plan = tgt.plan(exported("tiny-sd") / "onnx", specs, tgt.config(precision="int8", policy={"vae_decoder": "fp32"}))
    assert plan["components"]["vae_decoder"]["method"] == "fp32"
    assert plan["components"]["unet"]["method"] == "int8"
    with pytest.raises(UsageError, match="unknown method"):
        tgt.plan(exported("tiny-sd") / "onnx", specs, tgt.config(precision="int8", policy={"unet": "int3"}))
    with pytest.raises(UsageError, match="no precision"):
        tgt.config(precision="fp8")


def test_static_int8_without_capture_names_the_fix(copy_export):
    # The target itself never guesses: without a capture its build names the fix (compile_job captures first).
    out = copy_export("tiny-sd")
    tgt = get_target("onnxruntime")
    _, specs = read_tree_info(out / "onnx")
    config = tgt.config(precision="int8", components=["unet"])
    assert tgt.inputs(config).calibration == "required"
    plan = tgt.plan(out / "onnx", {"unet": specs["unet"]}, config)
    with pytest.raises(SourceError, match="diffprism calibrate"):
        tgt.build(plan, out)
    assert not (out / "onnx-int8").exists()  # nothing half-written left looking finished


def test_int8_dynamic_passes_the_image_check(built, capsys):
    from diffprism.cli import main

    out, _ = built
    code = main(["--json", "validate", str(out), "--target", "onnxruntime", "--precision", "int8-dynamic", "--e2e",
                 "--e2e-steps", "2", "--e2e-prompt", "a red cube"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert doc["e2e"][0]["passed"] and doc["e2e"][0]["precision"] == "int8-dynamic"


# Static int8 with each of ONNX Runtime's calibration methods (MinMax is the default variant, built above).
METHODS = ("Entropy", "Percentile")


@pytest.fixture(scope="module")
def calibrated(built):
    out, results = built
    found = {"MinMax": results["int8"]}
    for method in METHODS:
        found[method] = compile_job(out, target="onnxruntime", precision="int8", components=["unet"],
                                    options={"calibrate_method": method})
    return out, found


@pytest.mark.parametrize("method", METHODS)
def test_calibration_method_is_its_own_variant(calibrated, method):
    from diffprism.variant import Variant

    out, found = calibrated
    variant = Variant.of("onnxruntime", "int8", {"calibrate_method": method.lower()})  # any spelling
    assert variant == Variant.of("onnxruntime", "int8", {"calibrate_method": method})
    assert variant.options == {"calibrate_method": method} and variant.digest
    assert found[method].out_dir == variant.folder(out) != out / "onnx-int8"
    assert len({r.out_dir for r in found.values()}) == len(found)  # the variants coexist
    entry = manifest.load(out)["targets"][variant.key]
    assert entry["details"]["unet"]["calibrate_method"] == method
    assert found["MinMax"].details["unet"]["calibrate_method"] == "MinMax"
    assert {"QuantizeLinear", "DequantizeLinear"} <= {
        n.op_type for n in onnx.load(str(variant.folder(out) / "unet" / "model.onnx"), load_external_data=False).graph.node}
    result = validate_job(out, target="onnxruntime", precision="int8", components=["unet"],
                          runner_options={"calibrate_method": method})
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]
    assert manifest.load(out)["validation"][variant.key]["passed"]


def test_calibration_methods_quantize_differently(calibrated):
    from onnx import numpy_helper

    out, found = calibrated

    def scales(result):
        model = onnx.load(str(result.out_dir / "unet" / "model.onnx"))
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_scale")}

    got = {m: scales(r) for m, r in found.items()}
    assert got["Entropy"].keys() == got["MinMax"].keys()
    for method in METHODS:  # activation scales follow the method's ranges
        assert any(not (got[method][n] == got["MinMax"][n]).all() for n in got["MinMax"])


def test_unknown_calibration_method_names_the_choices():
    from diffprism.variant import Variant

    with pytest.raises(UsageError, match="calibrate_method.*MinMax, Entropy, Percentile"):
        Variant.of("onnxruntime", "int8", {"calibrate_method": "kl"})


def test_a_setting_the_method_ignores_is_refused():
    from diffprism.variant import Variant

    with pytest.raises(UsageError, match="calibrate_method=Percentile only"):
        Variant.of("onnxruntime", "int8", {"calibrate_percentile": 99.9})
    with pytest.raises(UsageError, match="calibrate_method=MinMax only"):
        Variant.of("onnxruntime", "int8", {"calibrate_method": "Entropy", "calibrate_moving_average": True})
    assert Variant.of("onnxruntime", "int8", {"calibrate_method": "Percentile", "calibrate_percentile": 99.9}).digest
