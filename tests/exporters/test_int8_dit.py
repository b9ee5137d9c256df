"""Precision on the transformer families: static int8 of the transformers, calibrated on real denoising."""
from __future__ import annotations

import shutil

import pytest


@pytest.mark.parametrize("preset", ("tiny-sd3", "tiny-flux"))
def test_static_int8_transformer_validates_within_int8_bounds(exported, tmp_path, preset):
    """Calibrated on transformer inputs captured from real flow-matching denoising runs."""
    from diffprism.jobs import calibrate_job, compile_job, validate_job
    from exporters import calibration

    out = tmp_path / preset
    shutil.copytree(exported(preset), out)
    calibrate_job(out, prompts=["a red cube"], steps=2)  # recorded in the manifest, as compile requires
    feeds = calibration.load_feeds(out / "calibration", "transformer")
    assert len(feeds) == 2  # one per step (SD3's guidance batch is inside each feed)
    assert feeds[0]["hidden_states"].shape[0] == (2 if preset == "tiny-sd3" else 1)
    compile_job(out, target="onnxruntime", precision="int8", components=["transformer"])
    result = validate_job(out, target="onnxruntime", precision="int8", components=["transformer"])
    assert result.passed, [c.to_json() for c in result.comparisons if not c.passed]
    worst = max(c.worst("rel_l2") for c in result.comparisons)
    assert worst > 1e-4  # really quantized, not the fp32 graph
