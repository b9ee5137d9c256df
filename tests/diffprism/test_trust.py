"""Trust: a verdict is bound to the bytes it checked, and nothing read from a file escapes the folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from diffprism import manifest
from diffprism.cli import main
from diffprism.publish import publish
from diffprism.store import Store
from exporters import files as files_module
from exporters.errors import (EXIT_BAD_INPUT, EXIT_INTEGRITY, EXIT_INTERNAL, EXIT_USAGE, IntegrityError)
from exporters.files import sha256_file


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _edit_manifest(folder: Path, change) -> None:
    data = json.loads((folder / manifest.MANIFEST).read_text())
    change(data)
    (folder / manifest.MANIFEST).write_text(json.dumps(data))


# --- a verdict outlives nothing ---------------------------------------------------------------


def test_verdict_names_the_bytes_it_checked(built):
    data = manifest.load(built)
    verdict = data["validation"]["onnxruntime-fp32"]
    assert verdict["complete"] and set(verdict["components"]) == {"text_encoder", "vae_decoder"}
    checked = verdict["components"]["text_encoder"]["files"]
    for rel in ("onnx/text_encoder/model.onnx", "onnx/text_encoder/model.onnx_data", "reference/text_encoder.npz"):
        assert checked[rel] == data["files"][rel]["sha256"]
    assert not any(rel.startswith("onnx/vae_decoder/") for rel in checked)


@pytest.mark.parametrize("command", [
    ["report"],
    ["validate"],
    ["compile", "--target", "onnxruntime", "--precision", "fp16"],
])
@pytest.mark.parametrize("damage", ["tamper", "stray"])
def test_tampered_set_is_refused_and_its_manifest_kept(copy_built, capsys, command, damage):
    folder = copy_built()
    if damage == "tamper":
        _flip(folder / "onnx" / "text_encoder" / "model.onnx_data")
        expected = "sha256 mismatch: onnx/text_encoder/model.onnx_data"
    else:
        (folder / "onnx" / "text_encoder" / "extra.bin").write_bytes(b"not validated")
        expected = "not in manifest: onnx/text_encoder/extra.bin"
    before = (folder / manifest.MANIFEST).read_bytes()
    assert main([command[0], str(folder), *command[1:]]) == EXIT_INTEGRITY
    assert expected in capsys.readouterr().err
    assert (folder / manifest.MANIFEST).read_bytes() == before
    assert main(["verify", str(folder)]) == EXIT_INTEGRITY


def test_partial_validation_does_not_make_a_set_publishable(copy_built, tmp_path, capsys):
    folder = copy_built()
    _edit_manifest(folder, lambda d: d.__setitem__("validation", {}))
    assert main(["validate", str(folder), "--components", "text_encoder"]) == 0
    verdict = manifest.load(folder)["validation"]["onnxruntime-fp32"]
    assert verdict["status"] == "passed" and not verdict["complete"] and list(verdict["components"]) == ["text_encoder"]
    assert main(["publish", str(folder), str(tmp_path / "a")]) == EXIT_INTEGRITY
    assert "partial validation, vae_decoder not validated" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # The other component's run merges per component: now the whole export is covered.
    assert main(["validate", str(folder), "--components", "vae_decoder"]) == 0
    verdict = manifest.load(folder)["validation"]["onnxruntime-fp32"]
    assert verdict["passed"] and verdict["complete"] and set(verdict["components"]) == {"text_encoder", "vae_decoder"}
    assert main(["publish", str(folder), str(tmp_path / "b")]) == 0


def test_a_partial_rerun_keeps_the_full_verdict(copy_built):
    folder = copy_built()
    full = manifest.load(folder)["validation"]["onnxruntime-fp32"]
    assert main(["validate", str(folder), "--components", "text_encoder"]) == 0
    after = manifest.load(folder)["validation"]["onnxruntime-fp32"]
    assert after["comparisons"] == full["comparisons"] and after["passed"]


def test_a_verdict_for_other_bytes_is_not_publishable(copy_built, tmp_path, capsys):
    folder = copy_built()

    def stale(d):
        d["validation"]["onnxruntime-fp32"]["components"]["vae_decoder"]["files"]["onnx/vae_decoder/model.onnx"] = "0" * 64

    _edit_manifest(folder, stale)
    assert main(["publish", str(folder), str(tmp_path / "dest")]) == EXIT_INTEGRITY
    assert "onnx/vae_decoder/model.onnx changed since vae_decoder was validated" in capsys.readouterr().err


def test_one_manifest_write_from_cached_hashes(copy_built, monkeypatch):
    folder = copy_built()
    assert main(["report", str(folder)]) == 0  # a copy has new inodes: this run fills the hash cache
    writes = []
    real = manifest.write_json_atomic
    monkeypatch.setattr(manifest, "write_json_atomic",
                        lambda path, data: (writes.append(path.name), real(path, data))[1])
    read_before = files_module.FILES_READ
    assert main(["validate", str(folder)]) == 0  # validation, report/validation.json, report.html, manifest
    assert writes.count(manifest.MANIFEST) == 1
    reread = files_module.FILES_READ - read_before
    report_files = len([r for r in manifest.load(folder)["files"] if r.startswith("report/")])
    assert reread <= report_files, reread  # only what validate rewrote is read again


# --- report embeds only PNGs under report/ ----------------------------------------------------


@pytest.mark.parametrize("image", ["SECRET", "../SECRET", "onnx/model_index.json", "report/../onnx/x.png"])
def test_report_refuses_images_outside_report(copy_built, tmp_path, capsys, image):
    folder = copy_built()
    secret = tmp_path / "SECRET"
    secret.write_text("do not publish me")
    rel = str(secret) if image == "SECRET" else image
    (folder / "report" / "generations.json").write_text(json.dumps(
        {"generations": [{"label": "x", "report_image": rel, "request": {}}]}))
    assert main(["report", str(folder)]) == EXIT_INTEGRITY
    assert "report image" in capsys.readouterr().err
    html = (folder / "report" / "report.html").read_text()
    assert "ZG8gbm90IHB1Ymxpc2ggbWU" not in html  # base64 of the secret


def test_report_embeds_a_png_under_report(copy_built):
    from PIL import Image

    folder = copy_built()
    (folder / "report" / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "red").save(folder / "report" / "images" / "a.png")
    (folder / "report" / "generations.json").write_text(json.dumps(
        {"generations": [{"label": "x", "report_image": "report/images/a.png", "request": {}}]}))
    assert main(["report", str(folder)]) == 0
    assert "data:image/png;base64," in (folder / "report" / "report.html").read_text()


# --- names and the TensorRT build job ---------------------------------------------------------


def test_hostile_component_name_is_rejected_on_load(copy_built, capsys):
    folder = copy_built()
    info_path = folder / "onnx" / "diffprism.json"
    info = json.loads(info_path.read_text())
    info["components"][0]["name"] = "text_encoder$(touch PWNED)"
    info_path.write_text(json.dumps(info))
    from exporters.tree import read_tree_info

    with pytest.raises(IntegrityError, match="component name"):
        read_tree_info(folder / "onnx")
    assert main(["compile", str(folder), "--target", "tensorrt", "--precision", "fp16"]) == EXIT_INTEGRITY


def _stub_tools(bin_dir: Path, engine: str = "engine") -> None:
    """nvidia-smi and trtexec stand-ins; engine=None writes no engine, "" an empty one (both exit 0)."""
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho '8.9'\n")
    save = f"for a in \"$@\"; do case \"$a\" in --saveEngine=*) printf '{engine}' > \"${{a#--saveEngine=}}\";; esac; done\n"
    (bin_dir / "trtexec").write_text(
        "#!/bin/sh\n"
        "case \"$*\" in *--help*) echo '[TensorRT v100800]'; exit 0;; esac\n" + (save if engine is not None else ""))
    for tool in ("nvidia-smi", "trtexec"):
        (bin_dir / tool).chmod(0o755)


def _job(built, tmp_path: Path, rename: dict[str, str] | None = None) -> Path:
    from exporters.tree import read_tree_info
    from targets.base import get_target
    from targets.tensorrt_job import build_script

    src = built
    target = get_target("tensorrt")
    _, specs = read_tree_info(src / "onnx")
    specs = {n: s for n, s in specs.items() if n == "vae_decoder"}
    plan = target.plan(src / "onnx", specs, target.config(precision="fp16", gpu="sm89", trt_version="10.8.0"))
    for old, new in (rename or {}).items():
        plan["components"][new] = plan["components"].pop(old)
    job = tmp_path / "set" / plan["dir"]
    job.mkdir(parents=True)
    (job / "build_engines.sh").write_text(build_script(plan))
    return job


def _run(script: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=str(script.parent))


def test_a_hostile_name_forced_into_a_plan_is_quoted(built, tmp_path):
    hostile = "vae$(touch PWNED)`touch PWNED2`"
    job = _job(built, tmp_path, {"vae_decoder": hostile})
    _stub_tools(tmp_path / "bin")
    result = _run(job / "build_engines.sh", tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    found = [p.name for p in (tmp_path / "set").rglob("*")]
    assert "PWNED" not in found and "PWNED2" not in found and hostile in found


@pytest.mark.parametrize("engine", [None, ""])
def test_the_build_job_fails_when_an_engine_is_missing(built, tmp_path, engine):
    job = _job(built, tmp_path)
    _stub_tools(tmp_path / "bin", engine)
    result = _run(job / "build_engines.sh", tmp_path / "bin")
    assert result.returncode == 1 and "vae_decoder: trtexec succeeded but wrote no engine" in result.stderr
    assert "done:" not in result.stdout and not list((tmp_path / "set").rglob("engines.json"))


# --- publish ----------------------------------------------------------------------------------


def test_publish_refuses_a_foreign_destination(built, tmp_path, capsys):
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / ".bashrc").write_text("mine")
    assert main(["publish", str(built), str(dest)]) == EXIT_BAD_INPUT
    assert "holds files that are not this set's (not part of this set: .bashrc)" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == [".bashrc"]
    assert main(["publish", str(built), str(dest), "--overwrite"]) == 0
    assert (dest / ".bashrc").read_text() == "mine"  # replaced only this set's paths


def test_already_published_rechecks_the_destination(built, tmp_path):
    dest = tmp_path / "release"
    publish(built, str(dest))
    rel = "onnx/text_encoder/model.onnx_data"
    _flip(dest / rel)
    again = publish(built, str(dest))
    assert not again.skipped  # the damaged copy was uploaded again, not called "already published"
    assert sha256_file(dest / rel) == sha256_file(built / rel)
    assert publish(built, str(dest)).skipped


def test_publish_holds_the_folder_lock(built, tmp_path):
    from filelock import FileLock

    lock = FileLock(str(built / manifest.LOCK))
    lock.acquire()
    try:
        assert main(["publish", str(built), str(tmp_path / "dest")]) == 7
        assert main(["verify", str(built)]) == 7
    finally:
        lock.release()
    assert not (tmp_path / "dest").exists()


# --- symlinks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["folder", "manifest"])
def test_symlinks_are_refused_by_verify_and_publish(copy_built, tmp_path, capsys, what):
    folder = copy_built()
    if what == "folder":
        outside = tmp_path / "outside"
        shutil.move(folder / "onnx" / "text_encoder", outside)
        (folder / "onnx" / "text_encoder").symlink_to(outside, target_is_directory=True)
        expected = "goes through a symlink"
    else:
        shutil.move(folder / manifest.MANIFEST, tmp_path / "m.json")
        (folder / manifest.MANIFEST).symlink_to(tmp_path / "m.json")
        expected = "is not a regular file"
    assert main(["verify", str(folder)]) == EXIT_INTEGRITY
    assert expected in capsys.readouterr().err
    assert main(["publish", str(folder), str(tmp_path / "dest")]) == EXIT_INTEGRITY
    assert not (tmp_path / "dest").exists()


# --- the store --------------------------------------------------------------------------------


def _forged_store(tmp_path: Path, files: dict) -> Store:
    store = Store(str(tmp_path / "store"))
    (tmp_path / "store" / "index").mkdir(parents=True)
    (tmp_path / "store" / "index" / "k.json").write_text(json.dumps(
        {"stage": "export", "key": "k", "files": files, "record": {}}))
    return store


@pytest.mark.parametrize("forgery", ["object-name", "manifest", "stages", "missing", "not-json", "list"])
def test_forged_store_entries_are_refused_and_staging_is_clean(tmp_path, forgery):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret")
    good = {"sha256": "a" * 64, "size": 1}
    files = {
        "object-name": {"reference/x.npz": {"sha256": "../outside/secret.txt", "size": 6}},
        "manifest": {"manifest.json": good},
        "stages": {".stages/export.json": good},
        "missing": {"reference/x.npz": good},
        "not-json": None,
        "list": None,
    }[forgery]
    store = _forged_store(tmp_path, files or {})
    if forgery == "not-json":
        (tmp_path / "store" / "index" / "k.json").write_bytes(b"\xff{")
    elif forgery == "list":
        (tmp_path / "store" / "index" / "k.json").write_text("[]")
    with pytest.raises(IntegrityError):
        store.pull("k", out)
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())
    assert sorted(p.name for p in out.iterdir()) in ([], [".staging"])


# --- --allow-pickle ---------------------------------------------------------------------------


def test_allow_pickle_prefers_safetensors_where_they_exist(pipeline, tmp_path):
    import torch

    from diffprism import sources

    folder = tmp_path / "sd"
    pipeline("tiny-sd").save_pretrained(folder)
    state = {k: torch.zeros_like(v) for k, v in pipeline("tiny-sd").unet.state_dict().items()}
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")  # a pickle beside the safetensors
    src = sources.load(str(folder), allow_pickle=True)
    loaded = src.pipeline.unet.state_dict()
    original = pipeline("tiny-sd").unet.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert any(v.abs().sum() > 0 for v in loaded.values())


# --- exit codes for malformed inputs ----------------------------------------------------------


MANIFEST_DAMAGE = {
    "list": lambda p: p.write_text("[]"),
    "string-entry": lambda p: _rewrite(p, lambda d: d["files"].__setitem__("onnx/model_index.json", "abc")),
    "no-size": lambda p: _rewrite(p, lambda d: d["files"]["onnx/model_index.json"].pop("size")),
    "not-utf8": lambda p: p.write_bytes(b"\xff\xfe{}"),
    "dot-entry": lambda p: _rewrite(p, lambda d: d["files"].__setitem__(".", {"sha256": "0" * 64, "size": 1})),
    "variant-name": lambda p: _rewrite(p, lambda d: d["validation"].__setitem__("x [red]/../y", {})),
}


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_malformed_manifests_exit_6_without_traceback(copy_built, capsys, damage):
    folder = copy_built()
    MANIFEST_DAMAGE[damage](folder / manifest.MANIFEST)
    for argv in (["verify", str(folder)], ["report", str(folder)],
                 ["--json", "publish", str(folder), str(folder.parent / "dest")]):
        assert main(argv) == EXIT_INTEGRITY, argv
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and "error:" in captured.err
    out = json.loads(captured.out)
    assert out["exit_code"] == EXIT_INTEGRITY and out["error"] and out["fix"]
    assert not (folder.parent / "dest").exists()


def test_malformed_inputs_get_their_exit_codes(copy_built, tmp_path, capsys):
    folder = copy_built()
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(b'name = "\xff"\n')
    assert main(["plan", str(recipe)]) == EXIT_USAGE
    assert "not UTF-8" in capsys.readouterr().err

    source = tmp_path / "src"
    source.mkdir()
    (source / "model_index.json").write_text("[1, 2]")
    assert main(["export", str(source), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "not a pipeline index" in capsys.readouterr().err

    ref = folder / "reference" / "text_encoder.npz"
    np.savez(ref, __cases__=np.array([{"a": 1}], dtype=object))
    _flip_manifest_entry(folder, "reference/text_encoder.npz")
    assert main(["validate", str(folder), "--components", "text_encoder"]) == EXIT_INTEGRITY
    err = capsys.readouterr().err
    assert "reference file" in err and "damaged" in err and "Traceback" not in err

    (folder / "onnx" / "diffprism.json").write_text("{not json")
    _flip_manifest_entry(folder, "onnx/diffprism.json")
    assert main(["validate", str(folder)]) == EXIT_INTEGRITY
    assert "diffprism.json is not valid UTF-8 JSON" in capsys.readouterr().err


def _flip_manifest_entry(folder: Path, rel: str) -> None:
    """Record a damaged file in the manifest, as if it had been written that way (so only the parse fails)."""
    _edit_manifest(folder, lambda d: d["files"].__setitem__(
        rel, {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}))


def test_an_unexpected_error_has_its_own_exit_code(built, monkeypatch, capsys):
    import diffprism.commands.verify as verify_command

    def boom(*args, **kwargs):
        raise RuntimeError("something nobody planned for")

    monkeypatch.setattr(verify_command.manifest, "verify", boom)
    assert main(["--json", "verify", str(built)]) == EXIT_INTERNAL
    captured = capsys.readouterr()
    assert "unexpected error: RuntimeError: something nobody planned for" in captured.err and "-vv" in captured.err
    assert "Traceback" not in captured.err
    out = json.loads(captured.out)
    assert out["exit_code"] == EXIT_INTERNAL and out["error"] and out["fix"]


# --- export refuses bad sources ---------------------------------------------------------------


def test_export_to_an_existing_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["export", "tiny-sd", "--out", str(target)]) == EXIT_BAD_INPUT
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_a_folder_without_its_tokenizer_is_refused(pipeline, tmp_path, capsys):
    from diffprism import sources

    folder = tmp_path / "sd"
    pipeline("tiny-sd").save_pretrained(folder)
    shutil.rmtree(folder / "tokenizer")
    assert main(["export", str(folder), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "has text_encoder/ but no tokenizer/" in capsys.readouterr().err
    assert not (tmp_path / "o" / "onnx").exists()
    assert sources.check_folder(folder, False, ["unet", "vae_decoder"])["_class_name"] == "StableDiffusionPipeline"


# --- output is not markup ---------------------------------------------------------------------


def test_markup_and_control_characters_print_literally(built, tmp_path, capsys):
    folder = tmp_path / "a[/]b[green]"
    shutil.copytree(built, folder)
    assert main(["verify", str(folder)]) == 0
    assert f"{folder}/manifest.json" in capsys.readouterr().out.replace("\n", "")
    assert main(["--json", "verify", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    (folder / "[green]OK[reverse] x").write_text("stray")
    (folder / "evil\x1b[2Jname").write_text("stray")
    assert main(["--json", "verify", str(folder)]) == EXIT_INTEGRITY
    captured = capsys.readouterr()
    assert "not in manifest: [green]OK[reverse] x" in captured.err
    assert "evil\\x1b[2Jname" in captured.err and "\x1b" not in captured.err
    out = json.loads(captured.out)
    assert out["error"] and out["fix"] and not out["ok"]


def test_manifest_sha256_pins_the_manifest(built, capsys):
    digest = manifest.sha256_of(built)
    assert main(["verify", str(built), "--manifest-sha256", digest]) == 0
    capsys.readouterr()
    assert main(["verify", str(built), "--manifest-sha256", "0" * 64]) == EXIT_INTEGRITY
    assert "is not the pinned one" in capsys.readouterr().err
    assert main(["verify", str(built), "--manifest-sha256", "nope"]) == EXIT_USAGE
