"""Compression as a source transform: `diffprism compress` writes a new export that any target compiles."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffprism import manifest, sources
from diffprism.cli import main
from exporters import reference
from exporters.compress import prune
from exporters.families import exporter_for
from exporters.tree import read_geometry, read_tree_info


@pytest.fixture(scope="module")
def pruned(exported, tmp_path_factory):
    base = tmp_path_factory.mktemp("transform") / "sd"
    shutil.copytree(exported("tiny-sd"), base)
    code = main(["--json", "compress", str(base), "--method", "pruned-structured", "--option", "sparsity=0.5",
                 "--option", "distill_steps=4", "--option", "distill_lr=1e-3"])
    return base, base.with_name("sd-pruned-structured"), code


def _bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_compressed_export_is_an_export_of_its_own(pruned):
    base, dst, code = pruned
    assert code == 0
    info, specs = read_tree_info(dst / "onnx")
    assert read_geometry(dst / "onnx") == read_geometry(base / "onnx")
    record = info["transform"]
    assert record["transform"] == "pruned-structured" and list(record["components"]) == ["unet"]
    unet = record["components"]["unet"]
    assert unet["parameters_after"] < unet["parameters_before"] and unet["structured"]["resnet_blocks"] > 0
    assert _bytes(dst / "onnx" / "unet") < _bytes(base / "onnx" / "unet")
    for name in ("text_encoder", "vae_decoder"):  # untouched components are the original's bytes
        assert (dst / "onnx" / name / "model.onnx_data").read_bytes() == \
            (base / "onnx" / name / "model.onnx_data").read_bytes()
    # The student's references sit at the original's shape points.
    want, got = reference.load(base / "reference" / "unet.npz"), reference.load(dst / "reference" / "unet.npz")
    assert {p: c["dims"] for p, c in got.items()} == {p: c["dims"] for p, c in want.items()}
    assert any(not np.array_equal(got[p]["outputs"]["out_sample"], want[p]["outputs"]["out_sample"]) for p in got)
    assert manifest.load(dst)["source"]["kind"] == "compressed"


def test_recorded_torch_source_is_the_student(pruned):
    _, dst, _ = pruned
    pipe = sources.load_recorded(manifest.load(dst)["source"]).pipeline
    assert prune.parameter_count(pipe.unet) == read_tree_info(dst / "onnx")[0]["transform"]["components"]["unet"][
        "parameters_after"]
    _, specs = read_tree_info(dst / "onnx")
    spec = specs["unet"]
    wrapper = exporter_for(pipe, "unet").wrap(pipe.unet, spec)
    for point, case in reference.load(dst / "reference" / "unet.npz").items():
        out = reference.torch_outputs(wrapper, spec, case["inputs"])["out_sample"]
        np.testing.assert_allclose(out, case["outputs"]["out_sample"], rtol=1e-5, atol=1e-5)


def test_structurally_pruned_unet_compiles_to_openvino_int8_and_validates(pruned):
    from diffprism.jobs import calibrate_job, compile_job, validate_job
    from targets.base import get_target

    if not get_target("openvino").availability().ok:
        pytest.skip("OpenVINO cannot run here")
    _, dst, _ = pruned
    calibrate_job(dst, num_prompts=2, steps=2)  # denoises with the pruned torch UNet
    result = compile_job(dst, target="openvino", precision="int8", components=["unet"])
    assert result.details["unet"]
    verdict = validate_job(dst, target="openvino", precision="int8", components=["unet"])
    assert verdict.passed, json.dumps(verdict.to_json())[:2000]


def test_unknown_method_is_a_usage_error(pruned, capsys):
    base, _, _ = pruned
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(base), "--method", "prune-everything"])
    assert exc.value.code == 2
