"""diffprism verify: a downloaded set against its manifest (exit 6, one line per problem)."""
import json

from diffprism import manifest
from diffprism.cli import main
from exporters.errors import EXIT_INTEGRITY


def _rewrite_manifest(folder, change):
    data = json.loads((folder / manifest.MANIFEST).read_text())
    change(data)
    (folder / manifest.MANIFEST).write_text(json.dumps(data))


def test_intact_set_verifies(built, capsys):
    assert main(["--json", "verify", str(built)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["files"] >= 10 and out["problems"] == []


def test_tampered_missing_and_extra_files(copy_built, capsys):
    folder = copy_built()
    data = manifest.load(folder)
    onnx_data = next(r for r in data["files"] if r.endswith("model.onnx_data"))
    with open(folder / onnx_data, "r+b") as f:  # same size, one byte flipped
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    (folder / "reference" / "text_encoder.npz").unlink()
    (folder / "onnx" / "stray.txt").write_text("not part of the set")
    assert main(["verify", str(folder)]) == EXIT_INTEGRITY
    err = capsys.readouterr().err
    assert f"sha256 mismatch: {onnx_data}" in err
    assert "missing: reference/text_encoder.npz" in err
    assert "not in manifest: onnx/stray.txt" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 3


def test_truncated_file_is_a_size_mismatch(copy_built):
    folder = copy_built()
    target = folder / "onnx" / "text_encoder" / "model.onnx"
    target.write_bytes(target.read_bytes()[:-10])
    assert any(p.startswith("size mismatch: onnx/text_encoder/model.onnx") for p in manifest.verify(folder))


def test_paths_escaping_the_folder_are_refused(copy_built, tmp_path, capsys):
    folder = copy_built()
    (tmp_path / "secret.txt").write_text("outside")
    _rewrite_manifest(folder, lambda d: d["files"].update({
        "../secret.txt": {"sha256": "0" * 64, "size": 7},
        "/etc/passwd": {"sha256": "0" * 64, "size": 1},
    }))
    assert main(["verify", str(folder)]) == EXIT_INTEGRITY
    err = capsys.readouterr().err
    assert "manifest path '../secret.txt' escapes the artifact folder" in err
    assert "manifest path '/etc/passwd' escapes the artifact folder" in err


def test_symlink_out_of_the_set_is_refused(copy_built, tmp_path):
    folder = copy_built()
    (tmp_path / "elsewhere.json").write_text((folder / "onnx" / "model_index.json").read_text())
    (folder / "onnx" / "model_index.json").unlink()
    (folder / "onnx" / "model_index.json").symlink_to(tmp_path / "elsewhere.json")
    assert "manifest path 'onnx/model_index.json' goes through a symlink (model_index.json)" in manifest.verify(folder)


def test_no_manifest(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == EXIT_INTEGRITY
    assert "has no manifest.json" in capsys.readouterr().err
