"""Torch-TensorRT target: plan, naming, the saved programs and the build job; on a CUDA GPU, the compiled programs.

torch_tensorrt needs CUDA, so here the build writes plan.json, build_trt.py and each component's
program.pt2; the GPU test carries the `gpu` and `torch_tensorrt` markers and skips with its reason.
Golden files live in tests/targets/golden/ (DIFFPRISM_UPDATE_GOLDEN=1 rewrites them; review by hand).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import reference
from exporters.errors import UsageError
from exporters.tree import read_tree_info
from targets.base import get_target
from targets.torch_tensorrt_job import build_script, plan_text

GOLDEN = Path(__file__).parent / "golden"
VERSION = torch.__version__.split("+")[0]


def _missing() -> str:
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "needs the torch_tensorrt package (CUDA wheels) and a CUDA GPU"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch_tensorrt is installed but torch sees no GPU)"
    return ""


def _plan(out: Path, components=None, **options) -> dict:
    target = get_target("torch_tensorrt")
    _, specs = read_tree_info(out / "onnx")
    if components:
        specs = {n: s for n, s in specs.items() if n in components}
    options.setdefault("gpu", "sm89")
    options.setdefault("torch_version", "2.13.0+cpu")
    return target.plan(out / "onnx", specs, target.config(**options))


def _assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DIFFPRISM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path} (DIFFPRISM_UPDATE_GOLDEN=1 writes it; review it by hand)"
    assert text == path.read_text(), f"{name} differs from its golden file"


@pytest.fixture(scope="module")
def job(exported, tmp_path_factory):
    """`compile --target torch_tensorrt --precision fp16` of the tiny-sd text encoder, on this GPU-less machine."""
    import shutil

    from diffprism.jobs import compile_job

    out = tmp_path_factory.mktemp("torch-trt") / "sd"
    shutil.copytree(exported("tiny-sd"), out)
    result = compile_job(out, target="torch_tensorrt", precision="fp16", components=["text_encoder"])
    return out, result


def test_golden_plan_and_job_tiny_sd_fp16(exported):
    plan = _plan(exported("tiny-sd"), precision="fp16")
    _assert_golden("torch_tensorrt_tiny-sd_fp16_sm89.plan.json", plan_text({**plan, "components": {
        n: {k: v for k, v in c.items() if k != "spec"} for n, c in plan["components"].items()}}))
    _assert_golden("torch_tensorrt.build_trt.py", build_script(plan))
    compile(build_script(plan), "build_trt.py", "exec")  # valid Python


def test_plan_inputs_are_the_spec_profile_and_names_gpu_and_torch(exported):
    plan = _plan(exported("tiny-sd"), precision="bf16", gpu="8.6", optimization_level=5, workspace_mb=512)
    assert plan["dir"] == "torch_tensorrt-bf16-sm86-torch2.13.0" and plan["dir_pattern"] == "torch_tensorrt-bf16-{gpu}-torch2.13.0"
    _, specs = read_tree_info(exported("tiny-sd") / "onnx")
    unet = plan["components"]["unet"]
    profile = specs["unet"].profile()
    assert [i["name"] for i in unet["inputs"]] == specs["unet"].input_names
    for i in unet["inputs"]:
        assert (tuple(i["min"]), tuple(i["opt"]), tuple(i["max"])) == tuple(profile[i["name"]][p] for p in ("min", "opt", "max"))
    assert plan["settings"] == {"optimization_level": 5, "min_block_size": 5, "workspace_size": 512 * 2**20}
    assert plan["enabled_precisions"] == ["bfloat16", "float32"]


def test_bad_requests_are_usage_errors(exported):
    target = get_target("torch_tensorrt")
    with pytest.raises(UsageError, match="no precision 'int8'"):
        target.config(precision="int8")
    with pytest.raises(UsageError, match=r"bf16 needs compute capability >= 8\.0, not sm75"):
        _plan(exported("tiny-sd"), precision="bf16", gpu="sm75")
    plan = _plan(exported("tiny-sd"), components=["text_encoder"], torch_version="2.12.0")
    with pytest.raises(UsageError, match="plan is for torch 2.12.0 but this machine has torch"):
        target.build(plan, exported("tiny-sd"), source=object())


def test_compile_here_saves_programs_and_the_job(job):
    out, result = job
    folder = out / f"torch_tensorrt-fp16-smunknown-torch{VERSION}"  # no GPU here: the job names it
    assert result.out_dir == folder and "GPU machine" in result.note and "build_trt.py" in result.note
    assert {p.relative_to(folder).as_posix() for p in result.files} == {"plan.json", "build_trt.py",
                                                                        "text_encoder/program.pt2"}
    assert os.access(folder / "build_trt.py", os.X_OK)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["targets"][f"torch_tensorrt-fp16-smunknown-torch{VERSION}"]
    assert entry["details"]["text_encoder"]["built"] is False and entry["details"]["text_encoder"]["gpu"] == "smunknown"
    assert f"{folder.name}/text_encoder/program.pt2" in manifest["files"]


def test_the_saved_program_is_the_component_in_fp16(job):
    """What the GPU job compiles: the traced text encoder in fp16 with float32 inputs and outputs."""
    out, _ = job
    program = torch.export.load(str(out / f"torch_tensorrt-fp16-smunknown-torch{VERSION}" / "text_encoder" / "program.pt2"))
    dtypes = {str(p.dtype) for p in program.state_dict.values()}
    assert dtypes == {"torch.float16"}, dtypes
    case = next(iter(reference.load(out / "reference" / "text_encoder.npz").values()))
    with torch.no_grad():
        got = program.module()(torch.from_numpy(case["inputs"]["input_ids"]))
    ref = case["outputs"]["last_hidden_state"]
    assert got[0].dtype == torch.float32
    rel = np.linalg.norm(got[0].numpy() - ref) / np.linalg.norm(ref)
    assert 1e-5 < rel < 1e-2, rel


def test_validate_here_is_structural_with_the_reason(job):
    from diffprism.jobs import validate_job

    out, _ = job
    result = validate_job(out, target="torch_tensorrt", precision="fp16", components=["text_encoder"])
    assert result.status == "structural" and "torch_tensorrt" in result.numerics_skipped
    assert result.structure["text_encoder"]["ok"] and not result.structure["text_encoder"]["built"]


def test_build_job_refuses_machines_it_cannot_build_on(job, tmp_path):
    out, _ = job
    folder = out / f"torch_tensorrt-fp16-smunknown-torch{VERSION}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    missing = subprocess.run([sys.executable, str(folder / "build_trt.py")], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "install torch" in missing.stderr and "torch_tensorrt" in missing.stderr
    # With a torch_tensorrt importable, a machine without a CUDA GPU is refused before anything is compiled.
    (tmp_path / "torch_tensorrt.py").write_text("__version__ = '0'\n")
    nogpu = subprocess.run([sys.executable, str(folder / "build_trt.py")], capture_output=True, text=True,
                           env={**env, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert nogpu.returncode == 1 and "no CUDA GPU is visible" in nogpu.stderr
    assert not (folder / "text_encoder" / "model.ep").exists() and not (folder / "engines.json").exists()


@pytest.mark.gpu
@pytest.mark.torch_tensorrt
def test_gpu_job_builds_programs_that_match_pytorch(exported, tmp_path):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    import shutil

    from diffprism.jobs import compile_job, validate_job

    out = tmp_path / "sd"
    shutil.copytree(exported("tiny-sd"), out)
    result = compile_job(out, target="torch_tensorrt", precision="fp16", components=["text_encoder", "unet"])
    assert all(d["built"] for d in result.details.values()), result.details
    verdict = validate_job(out, target="torch_tensorrt", precision="fp16", components=["text_encoder", "unet"])
    assert verdict.passed, [c.error for c in verdict.comparisons if not c.passed]
