"""LoRA: fused exports, refits without re-tracing, and the adapter files diffusers reads."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("peft", reason="LoRA needs peft (pip install '.[lora]')")

from diffprism import manifest, presets  # noqa: E402
from diffprism.jobs import calibrate_job, compile_job, export_job, validate_job  # noqa: E402
from diffprism.transform_jobs import refit_job  # noqa: E402
from exporters import lora, reference  # noqa: E402
from exporters.errors import SourceError, UsageError  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _make_lora(folder, *, text_encoder: bool, seed: int = 1, rank: int = 4):
    """A rank-`rank` LoRA for tiny-sd in PEFT's layout with non-zero B (random deltas), saved as diffusers does."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = presets.build("tiny-sd")
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS, init_lora_weights=False))
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(str(folder), safe_serialization=True, **layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return _make_lora(tmp_path_factory.mktemp("lora"), text_encoder=True)


@pytest.fixture(scope="module")
def fused(lora_file, tmp_path_factory):
    """tiny-sd's UNet exported with the LoRA fused at scale 0.7 (one reference point)."""
    out = tmp_path_factory.mktemp("fused") / "tiny-sd-lora"
    export_job("tiny-sd", out, components=["unet"], adapters=lora.from_specs([f"{lora_file}:0.7"]),
               reference_points="opt")
    return out


@pytest.fixture(scope="module")
def base(exported, tmp_path_factory):
    """The tiny-sd export with a calibration capture and a refittable TensorRT fp32 plan (job only)."""
    out = tmp_path_factory.mktemp("base") / "tiny-sd"
    shutil.copytree(exported("tiny-sd"), out)
    calibrate_job(out, prompts=["a red cube"], steps=1)
    compile_job(out, target="tensorrt", precision="fp32", options={"refit": True})
    return out


@pytest.fixture(scope="module")
def refit(base, lora_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("refit") / "tiny-sd-refit"
    record = refit_job(base, out, adapters=lora.from_specs([f"{lora_file}:0.7"]))
    return out, record


def _bytes(folder, component, name):
    return (folder / "onnx" / component / name).read_bytes()


def test_fused_export_matches_pytorch_with_lora_and_differs_from_base(fused, exported, lora_file):
    result = validate_job(fused, target="onnxruntime", precision="fp32")
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]
    recorded = manifest.load(fused)["source"]["adapters"]
    assert recorded == [lora.adapter(lora_file, 0.7).to_json()]
    ours, base = (reference.load(d / "reference" / "unet.npz") for d in (fused, exported("tiny-sd")))
    point = next(iter(ours))
    out = next(iter(ours[point]["outputs"]))
    assert not np.allclose(ours[point]["outputs"][out], base[point]["outputs"][out], atol=1e-4)


def test_refit_keeps_graphs_rewrites_weights_and_validates(refit, fused, exported):
    out, record = refit
    base = exported("tiny-sd")
    for name in ("unet", "text_encoder", "vae_decoder"):
        assert _bytes(out, name, "model.onnx") == _bytes(base, name, "model.onnx"), name
    assert record["components"]["unet"]["changed"] > 0 and record["components"]["text_encoder"]["changed"] > 0
    assert record["components"]["vae_decoder"]["changed"] == 0
    # Same graph, same fused weights: the refit's data is the fused export's, byte for byte.
    assert _bytes(out, "unet", "model.onnx_data") == _bytes(fused, "unet", "model.onnx_data")
    for name in ("unet", "text_encoder"):
        assert _bytes(out, name, "model.onnx_data") != _bytes(base, name, "model.onnx_data"), name
    result = validate_job(out, target="onnxruntime", precision="fp32")
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]
    data = manifest.load(out)
    assert data["source"]["kind"] == "refit" and data["source"]["adapters"][0]["scale"] == 0.7
    assert data["source"]["adapters"][0]["sha256"] == record["adapters"][0]["sha256"]
    assert data["validation"]["onnxruntime-fp32"]["passed"]


def test_refit_back_to_no_adapters_is_byte_identical_to_the_base(refit, exported, tmp_path):
    out, _ = refit
    back = tmp_path / "back"
    record = refit_job(out, back, adapters=[])  # a refit of the refit: the base adapters are undone
    base = exported("tiny-sd")
    for name in record["components"]:
        for f in ("model.onnx", "model.onnx_data"):
            assert _bytes(back, name, f) == _bytes(base, name, f), (name, f)
        assert (back / "reference" / f"{name}.npz").read_bytes() == (base / "reference" / f"{name}.npz").read_bytes()


def test_refit_recalibrates_and_writes_the_tensorrt_refit_job(refit, base, caplog):
    out, record = refit
    from exporters.calibration import CALIBRATION_DIR, info
    from targets.tensorrt_refit import REFIT_SCRIPT, refit_script

    assert record["recalibrated"] == {"prompts": 1, "steps": 1, "runtime": "torch"}
    assert info(out / CALIBRATION_DIR)["prompts"] == ["a red cube"]
    assert manifest.load(out)["stages"]["calibrate"]["prompts"] == 1
    # The text encoder's LoRA changes what the UNet sees: the capture is re-taken, not copied.
    assert (out / CALIBRATION_DIR / "unet.npz").read_bytes() != (base / CALIBRATION_DIR / "unet.npz").read_bytes()
    # int8 of the LoRA'd model requantizes from that capture (no default capture is taken).
    with caplog.at_level("WARNING", logger="diffprism.jobs"):
        built = compile_job(out, target="onnxruntime", precision="int8", components=["unet"])
    assert not [r for r in caplog.records if "needs a calibration capture" in r.getMessage()]
    assert (built.out_dir / "unet" / "model.onnx").is_file()
    [folder] = record["tensorrt_refit"]
    assert (out / folder / "plan.json").read_bytes() == (base / folder / "plan.json").read_bytes()
    script = (out / folder / REFIT_SCRIPT).read_text()
    assert script == refit_script()
    for call in ("trt.Refitter(", "OnnxParserRefitter(", "refit_from_file(", "get_missing_weights()",
                 "refit_cuda_engine()"):
        assert call in script, call
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        run = subprocess.run([sys.executable, str(out / folder / REFIT_SCRIPT), "--base", str(base / folder)],
                             capture_output=True, text=True)
        assert run.returncode != 0 and "tensorrt Python package is not installed" in run.stderr
        pytest.skip("refitting engines needs the tensorrt package and an NVIDIA GPU (not here)")
    pytest.skip("refitting engines needs engines built on an NVIDIA GPU by the base's build job")


def test_kohya_file_fuses_like_the_diffusers_file(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_file = _make_lora(tmp_path, text_encoder=False, seed=2)
    kohya = tmp_path / "kohya.safetensors"
    save_file(lora.kohya_keys(load_file(str(peft_file))), str(kohya))
    weights = []
    for f in (peft_file, kohya):
        pipe = presets.build("tiny-sd")
        touched = lora.fuse(pipe, [lora.adapter(f, 0.5)])
        assert touched["unet"]
        weights.append(pipe.unet.state_dict())
    base = presets.build("tiny-sd").unet.state_dict()
    key = next(k for k in base if k.endswith("attn1.to_q.weight"))
    assert not np.allclose(weights[0][key].numpy(), base[key].numpy())
    for k in base:
        np.testing.assert_allclose(weights[1][k].numpy(), weights[0][k].numpy(), atol=1e-6, err_msg=k)


def test_adapter_arguments_and_bad_files(tmp_path, lora_file):
    assert lora.parse("a.safetensors:0.5") == (lora.Path("a.safetensors"), 0.5)
    assert lora.parse("dir:x/a.safetensors") == (lora.Path("dir:x/a.safetensors"), 1.0)
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"\0" * 16)
    with pytest.raises(SourceError, match="not safetensors"):
        lora.adapter(pickle)
    with pytest.raises(SourceError, match="does not exist"):
        lora.adapter(tmp_path / "missing.safetensors")
    with pytest.raises(UsageError, match="finite"):
        lora.adapter(lora_file, float("nan"))
    with pytest.raises(SourceError, match="changed since"):
        lora.from_record([{**lora.adapter(lora_file).to_json(), "sha256": "0" * 64}])


def test_cli_parses_lora_arguments(tmp_path, lora_file):
    from diffprism.cli import build_parser, main

    args = build_parser().parse_args(["refit", str(tmp_path), "--lora", f"{lora_file}:0.5",
                                      "--out", str(tmp_path / "n")])
    assert args.lora == [f"{lora_file}:0.5"] and args.recalibrate
    args = build_parser().parse_args(["export", "tiny-sd", "--out", "x", "--lora", "a.safetensors",
                                      "--lora", "b.safetensors:2"])
    assert args.lora == ["a.safetensors", "b.safetensors:2"]
    # A pickled adapter is refused before anything loads (SourceError's exit code, one line).
    bad = tmp_path / "a.ckpt"
    bad.write_bytes(b"x")
    assert main(["-q", "export", "tiny-sd", "--out", str(tmp_path / "o"), "--lora", str(bad)]) != 0
    assert not (tmp_path / "o" / "onnx").exists()
