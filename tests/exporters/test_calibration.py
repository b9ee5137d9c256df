"""Calibration capture: real component inputs, named and typed by the spec, counted, deterministic."""
from __future__ import annotations

import json

import numpy as np
import pytest

from exporters import calibration
from exporters.errors import SourceError, UsageError
from exporters.tree import read_tree_info

PROMPTS = ["a red cube on a table", "a lighthouse at dusk"]
STEPS = 2


def _specs(exported, name):
    return read_tree_info(exported(name) / "onnx")[1]


@pytest.fixture(scope="module")
def sd_capture(pipeline, exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib-sd")
    folder = calibration.capture(pipeline("tiny-sd"), out, prompts=PROMPTS, steps=STEPS, seed=3,
                                 specs=_specs(exported, "tiny-sd"))
    return folder


def test_feeds_match_the_specs(sd_capture, exported):
    specs = _specs(exported, "tiny-sd")
    for name, spec in specs.items():
        feeds = calibration.load_feeds(sd_capture, name)
        assert feeds, name
        for feed in feeds:
            assert sorted(feed) == sorted(spec.input_names)
            for t in spec.inputs:
                assert feed[t.name].dtype == np.dtype(t.dtype), (name, t.name)
            spec.check_feed(feed)  # names, dtypes, ranks and dim ranges


def test_counts_are_prompts_times_steps(sd_capture):
    info = calibration.info(sd_capture)
    n = len(PROMPTS)
    # UNet: one call per step per prompt, each with the CFG batch (uncond + cond).
    assert info["counts"]["unet"] == n * STEPS
    unet = calibration.load_feeds(sd_capture, "unet")
    assert all(f["sample"].shape[0] == 2 for f in unet)
    # SD encodes the prompt and the empty negative prompt separately; VAE decodes once per prompt.
    assert info["counts"]["text_encoder"] == 2 * n
    assert info["counts"]["vae_decoder"] == n
    assert info["counts"]["vae_encoder"] == n
    assert info["prompts"] == PROMPTS and info["seeds"] == [3, 4] and info["steps"] == STEPS
    assert (info["height"], info["width"]) == (64, 64)  # the export's opt size
    # The recorded timesteps are the scheduler's, decreasing within each prompt's run.
    steps = [float(f["timestep"][0]) for f in unet[:STEPS]]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
    # The VAE decoder saw the final latents of the run, not noise: they differ from the first UNet sample.
    latents = calibration.load_feeds(sd_capture, "vae_decoder")[0]["latent_sample"]
    assert not np.allclose(latents, unet[0]["sample"][:1])


def test_same_seed_same_bytes(sd_capture, pipeline, exported, tmp_path):
    again = calibration.capture(pipeline("tiny-sd"), tmp_path, prompts=PROMPTS, steps=STEPS, seed=3,
                                specs=_specs(exported, "tiny-sd"))
    for name in ("unet", "text_encoder", "vae_decoder"):
        assert (again / f"{name}.npz").read_bytes() == (sd_capture / f"{name}.npz").read_bytes(), name


def test_other_seed_other_latents(sd_capture, pipeline, exported, tmp_path):
    specs = {"unet": _specs(exported, "tiny-sd")["unet"]}
    other = calibration.capture(pipeline("tiny-sd"), tmp_path, prompts=PROMPTS[:1], steps=1, seed=99, specs=specs)
    assert not np.array_equal(calibration.load_feeds(other, "unet")[0]["sample"],
                              calibration.load_feeds(sd_capture, "unet")[0]["sample"])
    assert sorted(p.name for p in other.iterdir()) == ["info.json", "unet.npz"]  # only what was asked


def test_sdxl_records_added_conditioning(pipeline, exported, tmp_path):
    specs = _specs(exported, "tiny-sdxl")
    folder = calibration.capture(pipeline("tiny-sdxl"), tmp_path, prompts=PROMPTS[:1], steps=2, specs=specs)
    info = calibration.info(folder)
    assert info["counts"]["unet"] == 2
    assert info["counts"]["text_encoder_2"] >= 1
    for feed in calibration.load_feeds(folder, "unet"):
        specs["unet"].check_feed(feed)
        assert feed["time_ids"].shape == (2, 6) and feed["text_embeds"].shape[0] == 2
        # time_ids hold (original size, crop, target size): the run's 64x64 pixels
        np.testing.assert_array_equal(feed["time_ids"][0], [64, 64, 0, 0, 64, 64])


def test_missing_capture_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="diffprism calibrate"):
        calibration.load_feeds(tmp_path / "calibration", "unet")
    with pytest.raises(SourceError, match="diffprism calibrate"):
        calibration.info(tmp_path / "calibration")


def test_prompt_file_and_count(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\nfirst prompt\n\nsecond prompt\n")
    assert calibration.read_prompts(path) == ["first prompt", "second prompt"]
    assert calibration.pick_prompts(["a", "b"], 3) == ["a", "b", "a"]
    assert calibration.pick_prompts(None, 2) == calibration.DEFAULT_PROMPTS[:2]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(SourceError, match="no prompts"):
        calibration.read_prompts(empty)
    with pytest.raises(SourceError, match="does not exist"):
        calibration.read_prompts(tmp_path / "nope.txt")
    with pytest.raises(UsageError):
        calibration.pick_prompts(None, 0)


def test_cli_calibrate(copy_export, tmp_path, capsys):
    from diffprism import manifest
    from diffprism.cli import main

    out = copy_export("tiny-sd")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a blue bird\na green frog\n")
    code = main(["--json", "calibrate", str(out), "--prompts", str(prompts), "--num-prompts", "3", "--steps", "1",
                 "--seed", "5"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["counts"]["unet"] == 3 and doc["prompts"] == ["a blue bird", "a green frog", "a blue bird"]
    data = manifest.load(out)
    assert data["stages"]["calibrate"]["counts"]["unet"] == 3 and data["stages"]["calibrate"]["seeds"] == [5, 6, 7]
    assert "calibration/unet.npz" in data["files"] and manifest.verify(out) == []


def test_cli_calibrate_without_export(tmp_path, capsys):
    from diffprism.cli import main

    assert main(["calibrate", str(tmp_path)]) == SourceError.exit_code


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_capture_through_the_exported_graph_matches_pytorch(sd_capture, copy_export, runtime):
    """The denoising loop on the exported fp32 graph records what PyTorch's does (to fp32 kernel noise), and says
    which runtime ran."""
    from diffprism import manifest
    from diffprism.jobs import calibrate_job
    from validation.metrics import rel_l2

    if runtime == "openvino":
        pytest.importorskip("openvino")
    out = copy_export("tiny-sd")
    info = calibrate_job(out, prompts=PROMPTS, steps=STEPS, seed=3, runtime=runtime)
    assert info["runtime"]["name"] == runtime
    assert {r["backend"] for r in info["runtime"]["runner"].values()} == {runtime}
    assert set(info["runtime"]["runner"]) == {"text_encoder", "unet", "vae_decoder"}
    if runtime == "openvino":
        assert {r["inference_precision"] for r in info["runtime"]["runner"].values()} == {"f32"}
    assert manifest.load(out)["stages"]["calibrate"]["runtime"] == runtime
    assert info["counts"] == calibration.info(sd_capture)["counts"]
    for name in ("unet", "vae_decoder", "vae_encoder", "text_encoder"):
        mine, torch_feeds = calibration.load_feeds(out / "calibration", name), calibration.load_feeds(sd_capture, name)
        for a, b in zip(mine, torch_feeds):
            for key in b:
                if b[key].dtype.kind == "f":  # fp32 kernel noise over the loop: the fp32 row's relative L2 bound
                    assert a[key].shape == b[key].shape and rel_l2(b[key], a[key]) < 1e-4, (name, key)
                else:
                    np.testing.assert_array_equal(a[key], b[key])
    assert calibration.info(sd_capture)["runtime"] == {"name": "torch"}


def test_capture_runtime_auto_and_unknown():
    from diffprism.jobs import capture_runtime

    assert capture_runtime("auto") in ("openvino", "onnxruntime", "torch")
    assert capture_runtime("torch") == "torch"
    with pytest.raises(UsageError, match="capture runtime"):
        capture_runtime("tensorrt")
