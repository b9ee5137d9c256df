"""The optimum comparison scripts' own logic, without optimum: the venv side is a stand-in interpreter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _export(root: Path, with_openvino: bool) -> Path:
    (root / "onnx").mkdir(parents=True)
    geometry = {"default_latent": 32, "vae_scale_factor": 2}
    (root / "onnx" / "diffprism.json").write_text(json.dumps({"geometry": geometry, "components": []}))
    if with_openvino:
        (root / "openvino-fp32").mkdir()
    return root


def _fake_python(path: Path, row: dict) -> Path:
    path.write_text(f"#!/bin/sh\necho 'log line'\necho '{json.dumps(row)}'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def loaders(monkeypatch, load_bench):
    mod = load_bench("optimum_loaders")
    seen = []

    def torch_image(export, size, args, dest):
        seen.append(size)
        np.save(dest, np.zeros((1, *size, 3), np.float32))
        return {"loader": "diffusers (PyTorch source)"}

    monkeypatch.setattr(mod, "_torch_image", torch_image)
    mod.seen = seen
    return mod


def _args(mod, exports, tmp_path, **over):
    ns = dict(exports=exports, loader=None, ort_python=None, ov_python=None, size=None, steps=1, guidance=1.0,
              seed=0, timeout=60, json=tmp_path / "rows.json", ov_hint="f32")
    ns.update(over)
    return type("Args", (), ns)()


def test_loaders_report_rows_from_each_venv_and_pass_when_all_load(loaders, tmp_path):
    export = _export(tmp_path / "tiny", with_openvino=True)
    ok = {"loader": "X", "load_ok": True, "max_abs_diff_vs_torch": 1e-6}
    py = _fake_python(tmp_path / "python", ok)
    code = loaders.run(_args(loaders, [export], tmp_path, ort_python=str(py), ov_python=str(py)))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert code == 0
    assert loaders.seen == [(64, 64)]  # the tree's default size: default latent x VAE scale factor
    assert [r.get("max_abs_diff_vs_torch") for r in rows] == [None, 1e-6, 1e-6]


def test_loaders_fail_on_a_tree_that_does_not_load_or_is_missing(loaders, tmp_path):
    export = _export(tmp_path / "tiny", with_openvino=False)
    bad = _fake_python(tmp_path / "python", {"loader": "ORTDiffusionPipeline", "load_ok": False, "error": "TypeError"})
    code = loaders.run(_args(loaders, [export], tmp_path, ort_python=str(bad), ov_python=str(tmp_path / "none")))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert code == 1
    assert rows[1]["error"] == "TypeError"
    assert "--target openvino --precision fp32" in rows[2]["error"]  # says how to build the missing tree


def test_loaders_name_a_missing_interpreter(loaders, tmp_path):
    export = _export(tmp_path / "tiny", with_openvino=True)
    code = loaders.run(_args(loaders, [export], tmp_path, loader=["ort"], ort_python=str(tmp_path / "none")))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert code == 1 and "make optimum-venvs" in rows[1]["error"]


def test_vs_optimum_reads_reference_points_and_optimum_weight_warnings(tmp_path, load_bench):
    mod = load_bench("vs_optimum")
    (tmp_path / "reference").mkdir()
    manifest = {"stages": {"export": {"streamed": True, "reference_points": "standard"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cases = {"min": {"batch": 2}, "opt": {"batch": 2}, "small": {"batch": 3}}
    np.savez(tmp_path / "reference" / "unet.npz", __cases__=np.array(json.dumps(cases)))
    got = mod.reference_points(tmp_path)
    assert got == {"streamed": True, "reference_points": "standard", "points": {"unet": ["min", "opt", "small"]}}
    log = tmp_path / "optimum.log"
    log.write_text("Loading 40%\rSome weights of CLIPTextModel were not initialized from the model checkpoint\nok\n")
    assert mod.optimum_notes(log) == ["Some weights of CLIPTextModel were not initialized from the model checkpoint"]
