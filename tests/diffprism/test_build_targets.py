"""One recipe builds every kind of variant through the same jobs as the CLI; content keys see every byte."""
from __future__ import annotations

import json

import pytest

from diffprism import manifest, publish
from diffprism.build import Keys, run_build
from diffprism.recipe import load, parse
from exporters import files
from targets.tensorrt_plan import SCRIPT_FILE

EVERY_TARGET = """\
components = ["unet"]
reference_points = "opt"

[source]
preset = "tiny-sd"

[shapes]
batch = "1:2:2"
size = "32:32:64"

[calibration]
prompts = ["a red bicycle"]
steps = 1

[[build]]
target = "coreml"
precision = "fp16"

[[build]]
target = "tensorrt"
precision = "int8"

[[build]]
target = "tensorrt"
precision = "int8"
options = { optimization_level = 5 }

[[build]]
target = "openvino"
precision = "int8"

[[build]]
target = "openvino"
precision = "int8"
options = { quantize_activations = [] }
"""


def _ready(*names: str) -> bool:
    from targets.base import get_target

    try:
        return all(get_target(n).build_availability().ok for n in names)
    except Exception:
        return False


@pytest.fixture(scope="module")
def every_target(tmp_path_factory):
    if not _ready("coreml", "openvino", "onnxruntime"):
        pytest.skip("coremltools, OpenVINO or ONNX Runtime is not installed")
    path = tmp_path_factory.mktemp("recipe") / "every.toml"
    path.write_text(EVERY_TARGET)
    out = tmp_path_factory.mktemp("every") / "set"
    return path, out, run_build(load(path), out)


def test_one_recipe_builds_every_target(every_target):
    # Core ML is the variant built from the source pipeline (the loader a build hands its stages); ONNX
    # Runtime's pruned and QAT variants take that path too, through the same compile_work that
    # tests/exporters/test_compress.py runs for each of them.
    _, out, report = every_target
    ov = [b.variant for b in parse(EVERY_TARGET).build if b.target == "openvino"]
    assert ov[0].key == "openvino-int8" and ov[1].key.startswith("openvino-int8-") and ov[0] != ov[1]
    trt = [b.variant for b in parse(EVERY_TARGET).build if b.target == "tensorrt"]
    status = {k: v["status"] for k, v in report.verdicts.items()}
    assert status == {"coreml-fp16": "structural", "tensorrt-int8": "structural", trt[1].key: "structural",
                      ov[0].key: "passed", ov[1].key: "passed"}
    assert report.passed  # structural verdicts are not failures
    actions = report.actions()
    # TensorRT int8 reads the ONNX Runtime int8 tree, which reads the calibration capture: both built first.
    assert actions["calibration"] == "built" and actions["compile-onnxruntime-int8"] == "built"
    data = manifest.load(out)
    targets = data["targets"]
    assert (out / "coreml-fp16" / "unet.mlpackage").is_dir()
    assert (out / targets["tensorrt-int8"]["dir"] / SCRIPT_FILE).is_file() and "build job" in targets["tensorrt-int8"]["note"]
    # Two TensorRT int8 variants that differ only in the builder optimization level: two build jobs, two stages.
    assert trt[1].key == f"tensorrt-int8-{trt[1].digest[:8]}"
    jobs = [targets[v.key]["dir"] for v in trt]
    assert jobs[1] == f"{jobs[0]}-{trt[1].digest[:8]}" and all((out / d / SCRIPT_FILE).is_file() for d in jobs)
    assert [json.loads((out / d / "plan.json").read_text())["builder"]["optimization_level"] for d in jobs] == [3, 5]
    keys = {s.name: s.key for s in report.stages}
    assert keys[f"compile-{trt[0].key}"] != keys[f"compile-{trt[1].key}"]
    # Two OpenVINO int8 variants side by side: activations quantized (calibrated) and weight-only.
    assert targets[ov[0].key]["details"]["unet"]["fake_quantize"] > 0
    assert targets[ov[1].key]["details"]["unet"]["fake_quantize"] == 0
    assert targets[ov[1].key]["dir"] != targets[ov[0].key]["dir"]
    assert data["validation"]["coreml-fp16"]["status"] == "structural"
    html = (out / "report" / "report.html").read_text()
    assert "structural (numerics need macOS)" in html and ">FAILED<" not in html
    assert publish.check_set(out)["validation"]["coreml-fp16"]["passed"] is None  # publish accepts it


def test_rerun_of_a_finished_build_reads_no_file_again(every_target):
    path, out, _ = every_target
    before = files.FILES_READ
    report = run_build(load(path), out)
    assert set(report.actions().values()) == {"skipped"}
    assert files.FILES_READ == before, "a rerun re-read files it had already hashed"


FOLDER = """\
components = ["text_encoder"]
reference_points = "opt"

[source]
path = "{path}"

[shapes]
batch = "1"

[[build]]
target = "onnxruntime"
"""


def test_one_flipped_byte_in_a_weight_file_rebuilds_the_export(pipeline, tmp_path):
    src = tmp_path / "model"
    pipeline("tiny-sd").save_pretrained(src)
    recipe = tmp_path / "folder.toml"
    recipe.write_text(FOLDER.format(path=src))
    out = tmp_path / "set"
    first = run_build(load(recipe), out)
    assert first.passed and first.actions()["export"] == "built"
    key = Keys(load(recipe)).export

    before = files.FILES_READ
    again = run_build(load(recipe), out)
    assert set(again.actions().values()) == {"skipped"} and files.FILES_READ == before

    weights = src / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the tensor data (same size, same header)
    weights.write_bytes(bytes(data))
    assert Keys(load(recipe)).export != key
    changed = run_build(load(recipe), out)
    assert changed.actions()["export"] == "built"
    assert json.loads((out / ".stages" / "export.json").read_text())["key"] == Keys(load(recipe)).export
