"""Image-level validation: metrics, bounds, and `diffprism validate --e2e` verdicts and exit codes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffprism.cli import main
from diffprism.e2e_jobs import e2e_job
from diffprism.placement import Placement, mix_label, parse_component_targets, resolve
from exporters.errors import EXIT_OK, EXIT_VALIDATION_FAILED, UsageError
from runtimes.pipeline import Generation, Request
from validation.e2e import TOLERANCES, image_metrics, loosest, requests_for

E2E_ARGS = ["--e2e", "--e2e-steps", "2", "--e2e-size", "32", "--e2e-prompt", "a red cube on a blue table"]


def _gen(image, latents=None):
    latents = np.ones((1, 4, 4, 4), np.float32) if latents is None else latents
    return Generation(image.astype(np.float32), latents, 0.0)


def test_image_metrics_use_skimage_and_rank_damage():
    rng = np.random.default_rng(0)
    ref = _gen(rng.uniform(0, 1, (32, 32, 3)))
    same = image_metrics(ref, ref)
    assert same == {"latent_rel_l2": 0.0, "psnr": math.inf, "ssim": pytest.approx(1.0)}
    slight = image_metrics(ref, _gen(ref.image + rng.normal(0, 0.002, ref.image.shape)))
    heavy = image_metrics(ref, _gen(rng.uniform(0, 1, (32, 32, 3)), np.full((1, 4, 4, 4), 2, np.float32)))
    assert 45 < slight["psnr"] < 60 and slight["ssim"] > 0.99
    assert heavy["psnr"] < 10 and heavy["ssim"] < 0.2 and heavy["latent_rel_l2"] == pytest.approx(1.0)
    assert not TOLERANCES["fp32"].violations(slight)
    assert len(TOLERANCES["int8"].violations(heavy)) == 3
    broken = image_metrics(ref, _gen(np.full((32, 32, 3), np.nan)))
    assert broken["psnr"] == -math.inf and TOLERANCES["int4"].violations(broken)


def test_a_mix_is_judged_by_its_loosest_precision():
    assert loosest(["fp32", "int8", "fp16"]) == "int8"
    assert loosest(["fp32"]) == "fp32"
    with pytest.raises(UsageError, match="int3"):
        loosest(["int3"])


def test_placements_parse_and_name_mixes(exported):
    assert Placement.parse("openvino:int8") == Placement("openvino", "int8")
    assert Placement.parse("onnxruntime") == Placement("onnxruntime", "fp32")
    assert Placement.parse("torch").label == "torch"
    with pytest.raises(UsageError, match="unknown target 'openvion'"):
        Placement.parse("openvion:int8")
    with pytest.raises(UsageError, match="COMPONENT=TARGET"):
        parse_component_targets(["unet"])
    out = exported("tiny-sd")
    mix = resolve(out, Placement("onnxruntime"), parse_component_targets(["unet=openvino:int8"]))
    assert list(mix) == ["text_encoder", "unet", "vae_decoder"]
    assert mix_label(mix) == "text_encoder=onnxruntime-fp32+unet=openvino-int8+vae_decoder=onnxruntime-fp32"
    with pytest.raises(UsageError, match="vae_encoder"):
        resolve(out, Placement("onnxruntime"), {"vae_encoder": Placement("torch")})


def test_validate_e2e_passes_on_onnxruntime_then_fails_on_a_broken_unet(copy_export, capsys):
    out = copy_export("tiny-sd")
    assert main(["--json", "validate", str(out), "--components", "vae_decoder", *E2E_ARGS]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["e2e"][0]["label"] == "onnxruntime-fp32"
    check = doc["e2e"][0]["checks"][0]
    assert check["passed"] and check["metrics"]["latent_rel_l2"] < 1e-4 and check["metrics"]["ssim"] > 0.999

    scale_unet_weights(out / "onnx" / "unet", 1.05)
    _record_as_exported(out, "onnx/unet")  # else validate refuses a changed set (exit 6) before running
    # The component check covers only the (intact) VAE decoder, so the failure comes from the images.
    assert main(["--json", "validate", str(out), "--components", "vae_decoder", *E2E_ARGS]) == EXIT_VALIDATION_FAILED
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is True  # the per-component verdict
    e2e = doc["e2e"][0]
    assert not e2e["passed"] and e2e["checks"][0]["violations"]
    recorded = json.loads((out / "report" / "validation.json").read_text())
    assert recorded["e2e"]["results"]["onnxruntime-fp32"]["passed"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["e2e:onnxruntime-fp32"]["passed"] is False


def _record_as_exported(out, folder):
    """Rewrite the manifest entries under `folder` as if the export had written these bytes."""
    from exporters.files import sha256_file

    data = json.loads((out / "manifest.json").read_text())
    for path in sorted((out / folder).rglob("*")):
        if path.is_file():
            data["files"][path.relative_to(out).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (out / "manifest.json").write_text(json.dumps(data))


def scale_unet_weights(folder, factor):
    """Multiply every weight matrix/kernel of the ONNX UNet by `factor` (a plausible-looking but wrong artifact)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))  # reads model.onnx_data into memory too
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim >= 2:  # conv and matmul weights; not Resize scales
            init.CopyFrom(numpy_helper.from_array(arr * np.float32(factor), init.name))
    (folder / "model.onnx_data").unlink()
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data")


def test_sdxl_images_match_on_onnxruntime(copy_export):
    out = copy_export("tiny-sdxl")
    requests = requests_for(["a watercolor harbour"], size=(32, 32), steps=2)
    [result] = e2e_job(out, [resolve(out, Placement("onnxruntime"), {})], requests)
    assert result.passed, result.to_json()
    assert result.checks[0].metrics["latent_rel_l2"] < 1e-4
    assert set(result.runner) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}


def test_openvino_variants_and_a_mix_match_pytorch(openvino_tiny_sd):
    out = openvino_tiny_sd
    requests = requests_for(["a red cube on a blue table"], size=(32, 32), steps=2)
    variants = [resolve(out, Placement("openvino", "fp32"), {}), resolve(out, Placement("openvino", "int8"), {}),
                resolve(out, Placement("onnxruntime"), {"unet": Placement("openvino", "int8")})]
    results = {r.label: r for r in e2e_job(out, variants, requests)}
    # The fixture's int8 is weight-only (an option): 'openvino int8' finds that variant, named by its options digest.
    key = variants[1]["unet"].key
    assert key.startswith("openvino-int8-") and variants[1]["unet"].options == {"quantize_activations": []}
    fp32, int8 = results["openvino-fp32"], results[key]
    mix = results[f"text_encoder=onnxruntime-fp32+unet={key}+vae_decoder=onnxruntime-fp32"]
    assert fp32.passed and fp32.precision == "fp32" and fp32.checks[0].metrics["latent_rel_l2"] < 1e-4
    assert int8.passed and int8.precision == "int8", int8.to_json()
    assert mix.passed and mix.precision == "int8" and mix.runner["unet"]["backend"] == "openvino"
    assert int8.checks[0].metrics["latent_rel_l2"] > fp32.checks[0].metrics["latent_rel_l2"]  # int8 really differs
    # Each ran as deployed, recorded: fp32 at the f32 hint, int8 at the device's own inference precision.
    default = _ov_default()
    assert {r["inference_precision"] for r in fp32.runner.values()} == {"f32"}
    assert {r["hint"] for r in int8.runner.values()} == {"default"}
    assert {r["inference_precision"] for r in int8.runner.values()} == {default}


def _ov_default() -> str:
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def test_generate_and_bench_record_the_runtime_configuration(openvino_tiny_sd, tmp_path):
    from diffprism import manifest
    from diffprism.e2e_jobs import bench_job, generate_job

    out = openvino_tiny_sd
    int8 = resolve(out, Placement("openvino", "int8"), {})["unet"]
    request = Request("a red cube", steps=2, height=32, width=32)
    info = generate_job(out, request, default=int8, image_path=tmp_path / "int8.png")
    assert {r["hint"] for r in info["runner"].values()} == {"default"}
    assert {r["inference_precision"] for r in info["runner"].values()} == {_ov_default()}
    assert info["load_seconds"] > 0  # every model compiled before the timed call
    assert manifest.load(out)["stages"]["generate"]["runner"] == info["runner"]
    recorded = json.loads((out / "report" / "generations.json").read_text())["generations"][0]
    assert recorded["runner"] == info["runner"]
    forced = generate_job(out, request, default=int8, image_path=tmp_path / "f32.png", runner_options={"hint": "f32"})
    assert {r["inference_precision"] for r in forced["runner"].values()} == {"f32"}  # an explicit option wins

    result = bench_job(out, [Placement("openvino", "fp32"), int8], size=(32, 32), steps=1, warmup=0, repeat=1,
                       image_runs=1, components=["unet"])
    comps = {e["target"]: e for e in result["components"]}
    assert comps["openvino-fp32"]["runner"]["inference_precision"] == "f32"
    assert comps[int8.key]["runner"]["inference_precision"] == _ov_default()
    images = {e["target"]: e for e in result["images"]}
    assert {r["inference_precision"] for r in images[int8.key]["runner"].values()} == {_ov_default()}
    assert {r["inference_precision"] for r in images["openvino-fp32"]["runner"].values()} == {"f32"}
    assert images["torch"]["runner"] == {} and images[int8.key]["load_seconds"] > 0


def test_generate_cli_writes_a_png_on_any_target(openvino_tiny_sd, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "cube.png"
    argv = ["--json", "generate", str(openvino_tiny_sd), "--target", "openvino", "--prompt", "a red cube", "--steps", "2",
            "--size", "32x64", "--seed", "5", "--negative-prompt", "blurry", "--guidance-scale", "4",
            "--component-target", "vae_decoder=onnxruntime", "--out", str(png)]
    assert main(argv) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["placements"] == {"text_encoder": "openvino-fp32", "unet": "openvino-fp32",
                                 "vae_decoder": "onnxruntime-fp32"}
    with Image.open(png) as image:
        assert image.size == (64, 32) and image.mode == "RGB"
    assert (openvino_tiny_sd / doc["report_image"]).is_file()
    # torch runs the recorded source pipeline; same seed and latents give (nearly) the same picture
    ref_png = tmp_path / "torch.png"
    assert main(["generate", str(openvino_tiny_sd), "--target", "torch", "--prompt", "a red cube", "--steps", "2",
                 "--size", "32x64", "--seed", "5", "--negative-prompt", "blurry", "--guidance-scale", "4",
                 "--out", str(ref_png)]) == EXIT_OK
    a = np.asarray(Image.open(png), dtype=np.int16)
    b = np.asarray(Image.open(ref_png), dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_generate_cli_errors_are_one_line(exported, tmp_path, capsys):
    out = exported("tiny-sd")
    assert main(["generate", str(out), "--target", "openvino", "--precision", "int4", "--prompt", "x",
                 "--out", str(tmp_path / "x.png")]) == 3  # not compiled: bad input
    assert "diffprism compile" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "x", "--size", "33", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["generate", str(out), "--prompt", "x", "--component-target", "unet", "--out",
                 str(tmp_path / "x.png")]) == 2
