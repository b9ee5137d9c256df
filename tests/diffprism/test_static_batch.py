"""A static export at one image serves the pipeline it came from: `--batch` counts images."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from diffprism.cli import main
from exporters.tree import read_tree_info


def test_static_batch_1_calibrates_and_generates_with_guidance(tmp_path, capsys):
    out = tmp_path / "static"
    assert main(["export", "tiny-sd", "--out", str(out), "--batch", "1", "--size", "64",
                 "--reference-points", "opt"]) == 0
    _, specs = read_tree_info(out / "onnx")
    batch = {name: (s.dim("batch").min, s.dim("batch").max) for name, s in specs.items()}
    # Text encoders and VAE per prompt/image; the UNet sees the unconditional and conditional latents.
    assert batch == {"text_encoder": (1, 1), "unet": (2, 2), "vae_encoder": (1, 1), "vae_decoder": (1, 1)}
    capsys.readouterr()
    assert main(["--json", "calibrate", str(out), "--num-prompts", "1", "--steps", "2"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["unet"] == 2 and counts["text_encoder"] == 2  # prompt + negative prompt, one each
    image = tmp_path / "guided.png"
    assert main(["generate", str(out), "--prompt", "a red cube", "--steps", "2", "--guidance-scale", "7.5",
                 "--out", str(image)]) == 0
    pixels = np.asarray(Image.open(image))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1
