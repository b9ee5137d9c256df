"""AOTInductor target: plans and naming, packages of tiny-sd loaded in a fresh process, validated, and images.

AOTInductor compiles C++ for every package, so the packages are built once per session
(`aoti_sd`): fp32 for the components image generation needs, bf16 and int8 for the text
encoder only (the smallest component).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exporters.errors import UsageError
from exporters.tree import read_tree_info
from targets.base import get_target

PIPELINE = ["text_encoder", "unet", "vae_decoder"]  # what text-to-image needs
VERSION = torch.__version__.split("+")[0]
ROOT = Path(__file__).resolve().parents[2]


def _folder(precision: str) -> str:
    return f"aotinductor-{precision}-cpu-torch{VERSION}"


@pytest.fixture(scope="session")
def aoti_sd(exported, tmp_path_factory):
    """A copy of the tiny-sd export with AOTInductor packages: fp32 for PIPELINE, bf16 and int8 text encoders."""
    from diffprism.jobs import compile_job

    out = tmp_path_factory.mktemp("aoti") / "tiny-sd"
    shutil.copytree(exported("tiny-sd"), out)
    builds = {"fp32": compile_job(out, target="aotinductor", precision="fp32", components=PIPELINE)}
    for precision in ("bf16", "int8"):
        builds[precision] = compile_job(out, target="aotinductor", precision=precision, components=["text_encoder"])
    return out, builds


# --- plan and naming (pure) -------------------------------------------------------------------


def test_plan_names_device_and_torch_and_takes_the_spec_dims(exported):
    target = get_target("aotinductor")
    tree = exported("tiny-sd") / "onnx"
    _, specs = read_tree_info(tree)
    plan = target.plan(tree, specs, target.config(precision="bf16", device="cpu"))
    assert plan["dir"] == _folder("bf16") and plan["device"] == "cpu" and plan["torch_version"] == torch.__version__
    unet = plan["components"]["unet"]
    spec = specs["unet"]
    for dim in ("batch", "height", "width"):
        d = spec.dim(dim)
        assert unet["dynamic"][dim] == {"min": d.min, "max": d.max, "multiple_of": d.multiple_of}
    assert unet["static"] == {"sequence": spec.dim("sequence").min} and unet["package"] == "unet/model.pt2"
    # a package for another torch build or device kind lives in another folder
    other = target.plan(tree, specs, target.config(precision="fp32", device="cuda", torch_version="2.12.0+cu128"))
    assert other["dir"] == "aotinductor-fp32-cuda-torch2.12.0"


def test_bad_requests_are_usage_errors(exported, monkeypatch):
    target = get_target("aotinductor")
    with pytest.raises(UsageError, match="no precision 'fp16'.*fp32, bf16, int8"):
        target.config(precision="fp16")
    with pytest.raises(UsageError, match="unknown AOTInductor device 'tpu'"):
        target.plan(exported("tiny-sd") / "onnx", {}, target.config(device="tpu"))
    tree = exported("tiny-sd") / "onnx"
    _, specs = read_tree_info(tree)
    plan = target.plan(tree, {"text_encoder": specs["text_encoder"]}, target.config(torch_version="2.12.0"))
    with pytest.raises(UsageError, match="plan is for torch 2.12.0 but this machine has torch"):
        target.build(plan, exported("tiny-sd"), source=object())
    # no C++ compiler: building is unavailable (with the fix), loading packages is not
    import targets.aotinductor as aoti

    monkeypatch.setattr(aoti.shutil, "which", lambda name: None)
    here = target.build_availability()
    assert not here.ok and "C++ compiler" in here.reason and "g++" in here.fix
    assert target.availability().ok and target.runner_availability().ok


# --- packages ------------------------------------------------------------------------------------


def test_packages_and_manifest_name_device_and_torch(aoti_sd):
    out, builds = aoti_sd
    manifest = json.loads((out / "manifest.json").read_text())
    for precision, components in (("fp32", PIPELINE), ("bf16", ["text_encoder"]), ("int8", ["text_encoder"])):
        folder = out / _folder(precision)
        assert builds[precision].out_dir == folder
        entry = manifest["targets"][f"aotinductor-{precision}-cpu-torch{VERSION}"]
        assert entry["dir"] == folder.name and set(entry["details"]) == set(components)
        for name in components:
            facts = json.loads((folder / name / "package.json").read_text())
            assert facts == {"component": name, "precision": precision, "device": "cpu",
                             "torch_version": torch.__version__}
            assert entry["details"][name]["torch_version"] == torch.__version__
            assert entry["details"][name]["bytes"] == (folder / name / "model.pt2").stat().st_size > 0
            assert f"{folder.name}/{name}/model.pt2" in manifest["files"]
    # the build measured each package against the PyTorch reference: fp32 is the same math, bf16 and int8 are not
    te = {p: manifest["targets"][f"aotinductor-{p}-cpu-torch{VERSION}"]["details"]["text_encoder"]["package_rel_l2"]
          for p in ("fp32", "bf16", "int8")}
    assert te["fp32"] < 1e-4 < te["bf16"] < 3e-2 and 1e-3 < te["int8"] < 0.2, te


def test_fresh_process_validates_and_generates_images_matching_pytorch(aoti_sd):
    """`diffprism validate --e2e` in a new process: every fp32 package loads there, matches its references,
    and the image made with the packages matches PyTorch's from the same latents."""
    out, _ = aoti_sd
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "diffprism.cli", "--json", "validate", str(out), "--target", "aotinductor",
         "--precision", "fp32", "--components", ",".join(PIPELINE), "--e2e", "--e2e-steps", "2", "--e2e-size", "32",
         "--e2e-prompt", "a red cube on a blue table"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["ok"] and doc["passed"], doc
    assert {r["backend"] for r in doc["runner"].values()} == {"aotinductor"}
    assert {c["component"] for c in doc["comparisons"]} == set(PIPELINE)
    assert max(o["metrics"]["rel_l2"] for c in doc["comparisons"] for o in c["outputs"]) < 1e-4  # same math
    [image] = doc["e2e"]
    assert image["passed"] and image["checks"][0]["metrics"]["latent_rel_l2"] < 1e-3, image
    assert {r["backend"] for r in image["runner"].values()} == {"aotinductor"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"][f"aotinductor-fp32-cpu-torch{VERSION}"]["passed"]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_validate_within_their_bounds(aoti_sd, precision):
    from diffprism.jobs import validate_job

    out, _ = aoti_sd
    result = validate_job(out, target="aotinductor", precision=precision, components=["text_encoder"])
    assert result.passed, [c.error for c in result.comparisons if not c.passed]
    worst = max(c.worst("rel_l2") for c in result.comparisons)
    assert worst > 1e-4  # really computed in reduced precision, not the fp32 program
    assert result.runner["text_encoder"]["precision"] == precision


def test_a_package_of_another_torch_build_is_refused_before_loading(aoti_sd, tmp_path):
    from runtimes.aoti_runner import AotiRunner

    out, _ = aoti_sd
    _, specs = read_tree_info(out / "onnx")
    copy = tmp_path / "text_encoder"
    shutil.copytree(out / _folder("fp32") / "text_encoder", copy)
    facts = json.loads((copy / "package.json").read_text())
    (copy / "package.json").write_text(json.dumps({**facts, "torch_version": "2.12.0+cpu"}))
    runner = AotiRunner(specs["text_encoder"], copy / "model.pt2")
    with pytest.raises(UsageError, match=r"built with torch 2\.12\.0\+cpu and this process runs torch") as err:
        runner.activate()
    assert "rebuild it here" in err.value.fix
    with pytest.raises(UsageError, match="compiled for cpu, not cuda"):
        AotiRunner(specs["text_encoder"], out / _folder("fp32") / "text_encoder" / "model.pt2", device="cuda").activate()
