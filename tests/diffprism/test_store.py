"""The content-addressed store: push/pull round trips (local path, memory://) and a CI-style flow."""
import uuid

import pytest

from diffprism import manifest
from diffprism.build import run_build
from diffprism.recipe import load
from diffprism.store import Store
from exporters.errors import IntegrityError, SourceError
from exporters.files import sha256_file


def _files(folder, rels):
    return {r: {"sha256": sha256_file(folder / r), "size": (folder / r).stat().st_size} for r in rels}


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_round_trip(built, tmp_path, kind):
    url = str(tmp_path / "store") if kind == "local" else f"memory://store-{uuid.uuid4().hex}"
    store = Store(url)
    files = _files(built, ["onnx/text_encoder/model.onnx", "onnx/text_encoder/model.onnx_data",
                           "reference/text_encoder.npz"])
    assert not store.has("k1")
    store.push("export", "k1", built, files, {"family": "sd"})
    assert store.has("k1") and store.index("k1")["record"] == {"family": "sd"}
    # Objects are stored once by hash: pushing again under another key sends nothing new.
    assert store.push("export", "k2", built, files, {}) == 0
    dest = tmp_path / "pulled"
    dest.mkdir()
    doc = store.pull("k1", dest)
    assert doc["files"] == files
    for rel, entry in files.items():
        assert sha256_file(dest / rel) == entry["sha256"]


def test_corrupt_object_is_refused(built, tmp_path):
    store = Store(str(tmp_path / "store"))
    files = _files(built, ["reference/vae_decoder.npz"])
    store.push("export", "k", built, files, {})
    sha = files["reference/vae_decoder.npz"]["sha256"]
    (tmp_path / "store" / "objects" / sha[:2] / sha).write_bytes(b"rotten")
    dest = tmp_path / "pulled"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="does not match its hash"):
        store.pull("k", dest)
    assert not (dest / "reference").exists()  # nothing half-pulled was moved into place


def test_ci_flow_export_target_merge(copy_built, built, recipe_file, tmp_path):
    """Export job pushes; a target job pulls by hash (no re-export); the merge job writes the final manifest."""
    url = f"memory://ci-{uuid.uuid4().hex}"
    recipe = load(recipe_file)
    export_job = run_build(recipe, copy_built("export-job"), store_url=url, export_only=True)
    assert export_job.actions() == {"export": "skipped"}  # built before, pushed now
    target_out = tmp_path / "target-job"
    target = run_build(recipe, target_out, only=["onnxruntime:fp32"], store_url=url)
    assert target.actions()["export"] == "pulled"
    assert target.passed
    merged_out = tmp_path / "merged"
    merged = run_build(recipe, merged_out, store_url=url, merge=True)
    assert set(merged.actions().values()) == {"pulled"}
    assert manifest.verify(merged_out) == []
    files = {k: v for k, v in manifest.load(merged_out)["files"].items() if k != "report/report.html"}  # dated
    assert files == {k: v for k, v in manifest.load(built)["files"].items() if k != "report/report.html"}
    assert manifest.load(merged_out)["validation"]["onnxruntime-fp32"]["passed"]


def test_merge_names_the_missing_stage(recipe_file, tmp_path):
    with pytest.raises(SourceError, match="stage export .* is not in the store"):
        run_build(load(recipe_file), tmp_path / "m", store_url=str(tmp_path / "empty"), merge=True)
