"""diffprism publish: only verified, validated sets go out, and every file is checked after upload."""
import json
import uuid

import fsspec
import pytest

from diffprism import manifest
from diffprism.cli import main
from diffprism.publish import git_blob_sha1, parse_hub_url, publish
from exporters.errors import EXIT_INTEGRITY, EXIT_VALIDATION_FAILED, UsageError
from exporters.files import sha256_file


def _set_verdict(folder, passed):
    data = manifest.load(folder)
    for v in data["validation"].values():
        v["passed"] = passed
        for c in v["components"].values():
            c["status"] = "passed" if passed else "failed"
    (folder / manifest.MANIFEST).write_text(json.dumps(data))


def test_publish_to_local_path_and_read_back(built, tmp_path, capsys):
    dest = tmp_path / "release"
    assert main(["--json", "publish", str(built), str(dest)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and not out["skipped"]
    assert (dest / manifest.MANIFEST).read_bytes() == (built / manifest.MANIFEST).read_bytes()
    assert manifest.verify(dest) == []  # the published copy verifies like the original
    # Publishing the same set again is a no-op; a different set to the same URL is refused.
    assert publish(built, str(dest)).skipped


def test_publish_refuses_a_different_set_at_the_same_url(copy_built, built, tmp_path):
    dest = tmp_path / "release"
    publish(built, str(dest))
    other = copy_built()
    data = manifest.load(other)
    data["request"]["note"] = "another build"
    (other / manifest.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(Exception, match="already holds a different published set"):
        publish(other, str(dest))


def test_publish_to_memory_filesystem(built):
    url = f"memory://releases/{uuid.uuid4().hex}"
    result = publish(built, url)
    fs, root = fsspec.core.url_to_fs(url)
    files = manifest.load(built)["files"]
    assert result.files == len(files) and result.bytes == sum(e["size"] for e in files.values())
    for rel, entry in files.items():
        assert len(fs.cat_file(f"{root}/{rel}")) == entry["size"]
    assert fs.exists(f"{root}/{manifest.MANIFEST}")


def test_refuses_failed_or_missing_validation(copy_built, tmp_path, capsys):
    folder = copy_built()
    _set_verdict(folder, False)
    assert main(["publish", str(folder), str(tmp_path / "a")]) == EXIT_VALIDATION_FAILED
    assert "validation failed for onnxruntime-fp32" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    data = manifest.load(folder)
    data["validation"] = {}
    (folder / manifest.MANIFEST).write_text(json.dumps(data))
    assert main(["publish", str(folder), str(tmp_path / "b")]) == EXIT_INTEGRITY  # nothing proves the set
    assert "no validation verdict" in capsys.readouterr().err
    assert main(["publish", str(folder), str(tmp_path / "c"), "--force"]) == 0
    assert manifest.verify(tmp_path / "c") == []


@pytest.mark.parametrize("damage", ["tamper", "missing", "escape"])
def test_refuses_sets_that_do_not_match_their_manifest(copy_built, tmp_path, capsys, damage):
    folder = copy_built()
    if damage == "tamper":
        path = folder / "onnx" / "model_index.json"
        path.write_bytes(path.read_bytes().replace(b"{", b"[", 1))  # same size, other content
        expected = "sha256 mismatch: onnx/model_index.json"
    elif damage == "missing":
        (folder / "reference" / "vae_decoder.npz").unlink()
        expected = "missing: reference/vae_decoder.npz"
    else:
        data = manifest.load(folder)
        data["files"]["../outside.bin"] = {"sha256": "0" * 64, "size": 1}
        (folder / manifest.MANIFEST).write_text(json.dumps(data))
        expected = "manifest path '../outside.bin' escapes the artifact folder"
    dest = tmp_path / "dest"
    assert main(["publish", str(folder), str(dest)]) == EXIT_INTEGRITY
    assert expected in capsys.readouterr().err
    assert not dest.exists()


def test_hub_url_parsing():
    assert parse_hub_url("hf://org/repo") == ("org/repo", None, None)
    assert parse_hub_url("hf://org/repo@v1/builds/tiny") == ("org/repo", "v1", "builds/tiny")
    with pytest.raises(UsageError, match="not a Hub repo URL"):
        parse_hub_url("hf://just-a-name")


def test_git_blob_sha1_matches_git(tmp_path):
    # git hash-object of "hello\n" is a well-known id.
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    assert git_blob_sha1(path) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_hub_publish_fails_cleanly_offline(built, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception) as err:
        publish(built, "hf://diffprism-test/does-not-exist")
    assert "cannot publish to hf://diffprism-test/does-not-exist" in str(err.value)
    assert err.value.exit_code != 0


def test_checksums_are_the_manifest_ones(built):
    data = manifest.load(built)
    rel, entry = next(iter(data["files"].items()))
    assert sha256_file(built / rel) == entry["sha256"]


def test_destination_is_never_taken_from_the_manifest(copy_built, recipe_text, tmp_path, capsys):
    folder = copy_built()
    data = manifest.load(folder)
    data["request"]["recipe"]["publish"] = {"url": str(tmp_path / "from-manifest"), "force": False}
    (folder / manifest.MANIFEST).write_text(json.dumps(data))
    assert main(["publish", str(folder)]) == 2
    assert "no destination given" in capsys.readouterr().err
    assert not (tmp_path / "from-manifest").exists()
    recipe = tmp_path / "release.toml"
    recipe.write_text(recipe_text + f'\n[publish]\nurl = "{tmp_path / "from-recipe"}"\n')
    assert main(["publish", str(folder), "--recipe", str(recipe)]) == 0
    assert manifest.verify(tmp_path / "from-recipe") == []
