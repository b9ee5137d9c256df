"""The front door: CLI export/validate/inspect, exit codes, and every bad input of the spine."""
import json
import shutil

import pytest

from diffprism import manifest
from diffprism.cli import main
from exporters import reference
from exporters.errors import (EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE, EXIT_VALIDATION_FAILED)
from exporters.files import sha256_file


@pytest.fixture(scope="session")
def saved_folder(tmp_path_factory, pipeline):
    """tiny-sd saved as a diffusers folder (safetensors), read-only for tests."""
    path = tmp_path_factory.mktemp("saved") / "tiny-sd"
    pipeline("tiny-sd").save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def folder_copy(saved_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(saved_folder, dst)
    return dst


def run_json(capsys, *argv):
    code = main(["--json", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def assert_nothing_written(out):
    assert not (out / "onnx").exists()
    assert not (out / "manifest.json").exists()


def test_export_from_folder_validate_and_inspect(saved_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, data = run_json(capsys, "export", str(saved_folder), "--out", str(out),
                          "--components", "text_encoder,vae_decoder", "--size", "32:64:96")
    assert code == EXIT_OK and data["ok"]
    assert set(data["components"]) == {"text_encoder", "vae_decoder"}
    m = manifest.load(out)
    assert m["source"]["kind"] == "folder" and len(m["source"]["weights_sha256"]) == 64
    assert manifest.verify(out) == []

    code, data = run_json(capsys, "validate", str(out))
    assert code == EXIT_OK and data["passed"] and data["status"] == "numeric"
    points = {(c["component"], c["point"]) for c in data["comparisons"]}
    # The standard reference points: min, opt and a small off-square shape.
    assert {p for c, p in points if c == "vae_decoder"} == {"min", "opt", "small"}
    assert m["stages"]["export"]["streamed"] is True  # a folder source streams by default
    assert manifest.load(out)["validation"]["onnxruntime-fp32"]["passed"] is True
    assert manifest.verify(out) == []  # the manifest was rewritten after the report

    code, data = run_json(capsys, "inspect", str(out))
    assert code == EXIT_OK and set(data["manifest"]["stages"]["export"]["components"]) == {"text_encoder", "vae_decoder"}


def test_reference_points_opt_only(tmp_path, capsys):
    out = tmp_path / "out"
    code, _ = run_json(capsys, "export", "tiny-sd", "--out", str(out), "--components", "text_encoder",
                       "--reference-points", "opt")
    assert code == EXIT_OK
    assert list(reference.load(out / "reference" / "text_encoder.npz")) == ["opt"]
    assert manifest.load(out)["stages"]["export"]["reference_points"] == "opt"
    code, data = run_json(capsys, "validate", str(out))
    assert code == EXIT_OK and [c["point"] for c in data["comparisons"]] == ["opt"]


def test_manifest_lists_every_file_with_checksums(exported):
    out = exported("tiny-sd")
    m = manifest.load(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
               and p.relative_to(out).parts[0] not in manifest.IGNORED}
    assert set(m["files"]) == on_disk
    assert "onnx/unet/model.onnx_data" in m["files"]
    for name in ("torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        assert name in m["versions"]
    assert m["hardware"]["cpu_count"] >= 1


def test_validation_failure_exits_nonzero(copy_export, capsys):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = copy_export("tiny-sd")
    path = out / "onnx" / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    biggest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(biggest) * 1.5, biggest.name))
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx_data")
    # Recorded as if the export had written these bytes: otherwise validate refuses a tampered set (exit 6).
    data = json.loads((out / manifest.MANIFEST).read_text())
    for rel in ("onnx/vae_decoder/model.onnx", "onnx/vae_decoder/model.onnx_data"):
        data["files"][rel] = {"sha256": sha256_file(out / rel), "size": (out / rel).stat().st_size}
    (out / manifest.MANIFEST).write_text(json.dumps(data))
    code, data = run_json(capsys, "validate", str(out), "--components", "vae_decoder")
    assert code == EXIT_VALIDATION_FAILED and data["passed"] is False
    assert manifest.load(out)["validation"]["onnxruntime-fp32"]["passed"] is False


# --- bad input: one line naming cause and fix, non-zero exit, nothing half-written ---------------


def test_missing_folder(tmp_path, capsys):
    code, data = run_json(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "does not exist" in data["error"] and data["fix"]
    assert_nothing_written(tmp_path / "o")


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, data = run_json(capsys, "export", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "empty" in data["error"]


def test_not_a_diffusers_folder(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"x")
    code, data = run_json(capsys, "export", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "model_index.json" in data["error"]


def test_unsupported_pipeline_class(folder_copy, tmp_path, capsys):
    index = json.loads((folder_copy / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder_copy / "model_index.json").write_text(json.dumps(index))
    code, data = run_json(capsys, "export", str(folder_copy), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "KandinskyPipeline" in data["error"] and "StableDiffusionPipeline" in data["fix"]
    assert_nothing_written(tmp_path / "o")


def test_component_missing_from_pipeline(folder_copy, tmp_path, capsys):
    shutil.rmtree(folder_copy / "unet")
    code, data = run_json(capsys, "export", str(folder_copy), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "'unet'" in data["error"]
    assert_nothing_written(tmp_path / "o")


def test_unknown_component_requested(tmp_path, capsys):
    code, data = run_json(capsys, "export", "tiny-sd", "--out", str(tmp_path / "o"), "--components", "text_encoder_2")
    assert code == EXIT_USAGE and "text_encoder_2" in data["error"]
    assert_nothing_written(tmp_path / "o")


def test_corrupt_safetensors(folder_copy, tmp_path, capsys):
    weights = next((folder_copy / "unet").glob("*.safetensors"))
    data_bytes = weights.read_bytes()
    weights.write_bytes(data_bytes[: len(data_bytes) // 2])
    code, data = run_json(capsys, "export", str(folder_copy), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "corrupt safetensors" in data["error"]
    assert_nothing_written(tmp_path / "o")


def test_pickle_only_weights_are_refused_without_flag(folder_copy, tmp_path, capsys):
    weights = next((folder_copy / "vae").glob("*.safetensors"))
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    code, data = run_json(capsys, "export", str(folder_copy), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "pickled" in data["error"] and "--allow-pickle" in data["fix"]
    assert_nothing_written(tmp_path / "o")


def test_shape_request_outside_the_spec(tmp_path, capsys):
    code, data = run_json(capsys, "export", "tiny-sd", "--out", str(tmp_path / "o"), "--size", "40:64:128")
    assert code == EXIT_USAGE and "multiple of 16" in data["error"]
    assert_nothing_written(tmp_path / "o")


def test_output_folder_holding_something_else(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    code, data = run_json(capsys, "export", "tiny-sd", "--out", str(out))
    assert code == EXIT_BAD_INPUT and "holds other files" in data["error"]
    assert (out / "thesis.docx").read_text() == "precious"
    assert_nothing_written(out)


def test_hub_id_offline_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, data = run_json(capsys, "export", "some-org/some-model", "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "Hub" in data["error"] and "local folder" in data["fix"]


def test_failed_export_leaves_no_tree(tmp_path, monkeypatch, capsys):
    """An export that dies midway leaves neither onnx/ nor a manifest, only nothing or staging debris."""
    import exporters.export as export_mod

    calls = {"n": 0}
    real = export_mod.export_component

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "export_component", flaky)
    out = tmp_path / "o"
    code = main(["export", "tiny-sd", "--out", str(out), "--components", "text_encoder,vae_decoder"])
    assert code == 130
    assert_nothing_written(out)
    assert not (out / "reference").exists()


def test_validate_without_export(tmp_path, capsys):
    code, data = run_json(capsys, "validate", str(tmp_path))
    assert code == EXIT_BAD_INPUT and "diffprism export" in data["fix"]


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export"])
    assert exc.value.code == EXIT_USAGE
