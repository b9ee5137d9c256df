"""diffprism build: content-keyed stages, reruns that do nothing, resume after SIGKILL, one build per folder."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffprism import manifest
from diffprism.build import Keys, run_build
from diffprism.cli import main
from diffprism.recipe import load, parse
from exporters.errors import EXIT_LOCKED, EXIT_VALIDATION_FAILED, UsageError

# report.html shows when it was written; every other file must be byte-identical across builds.
TIMESTAMPED = {"report/report.html"}


def _hashes(folder: Path) -> dict:
    return {k: v for k, v in manifest.load(folder)["files"].items() if k not in TIMESTAMPED}


def test_build_writes_a_verified_set(built):
    data = manifest.load(built)
    assert manifest.verify(built) == []
    assert data["validation"]["onnxruntime-fp32"]["passed"]
    assert data["source"] == {"kind": "preset", "preset": "tiny-sd", "seed": 0}
    assert {"onnx/text_encoder/model.onnx", "onnx/vae_decoder/model.onnx_data", "reference/vae_decoder.npz",
            "report/validation.json"} <= set(data["files"])
    assert not any(rel.startswith(".stages") for rel in data["files"])  # bookkeeping is not part of the set


def test_rerun_does_nothing_and_is_fast(copy_built, recipe_file):
    folder = copy_built()
    before = (folder / manifest.MANIFEST).read_bytes()
    start = time.perf_counter()
    report = run_build(load(recipe_file), folder)
    elapsed = time.perf_counter() - start
    assert set(report.actions().values()) == {"skipped"}
    assert (folder / manifest.MANIFEST).read_bytes() == before
    assert elapsed < 10, f"an up-to-date rerun took {elapsed:.1f}s"


def test_changed_tolerance_reruns_only_validation_and_fails_with_exit_1(copy_built, tmp_path, capsys, recipe_text):
    folder = copy_built()
    recipe = tmp_path / "strict.toml"
    # A cosine above 1 cannot hold: the verdict must fail, and only validation may run again.
    recipe.write_text(recipe_text + "\n[validation.tolerances.fp32.text_encoder]\ncosine = 1.5\n")
    assert main(["--json", "build", str(recipe), "--out", str(folder)]) == EXIT_VALIDATION_FAILED
    out = json.loads(capsys.readouterr().out)
    assert {k: v["action"] for k, v in out["stages"].items()} == {
        "export": "skipped", "compile-onnxruntime-fp32": "skipped", "validate-onnxruntime-fp32": "built"}
    assert not out["ok"] and not manifest.load(folder)["validation"]["onnxruntime-fp32"]["passed"]


def test_changing_one_precision_changes_only_that_builds_keys(recipe_text):
    two = recipe_text + '\n[[build]]\ntarget = "openvino"\nprecision = "fp32"\n'
    a, b = parse(two), parse(two.replace('precision = "fp32"\n', 'precision = "fp16"\n', 2)
                             .replace('target = "onnxruntime"\nprecision = "fp16"', 'target = "onnxruntime"\nprecision = "fp32"'))
    ka, kb = Keys(a), Keys(b)
    assert [x.variant.id for x in b.build] == ["onnxruntime:fp32", "openvino:fp16"]
    assert ka.export == kb.export
    assert ka.compile(a.build[0].variant) == kb.compile(b.build[0].variant) and ka.validate(a.build[0].variant) == kb.validate(b.build[0].variant)
    assert ka.compile(a.build[1].variant) != kb.compile(b.build[1].variant)
    # Keys follow content: a different seed is a different export.
    assert Keys(parse(recipe_text.replace('preset = "tiny-sd"', 'preset = "tiny-sd"\nseed = 1'))).export != ka.export


def _openvino_ready() -> bool:
    from targets.base import get_target

    try:
        return get_target("openvino").availability().ok
    except Exception:
        return False


@pytest.mark.skipif(not _openvino_ready(), reason="the openvino target is not available in this build")
def test_changing_one_precision_rebuilds_only_that_target(copy_built, tmp_path, recipe_text):
    folder = copy_built()
    first = tmp_path / "ov32.toml"
    first.write_text(recipe_text + '\n[[build]]\ntarget = "openvino"\nprecision = "fp32"\n')
    run_build(load(first), folder)
    second = tmp_path / "ov16.toml"
    second.write_text(recipe_text + '\n[[build]]\ntarget = "openvino"\nprecision = "fp16"\n')
    report = run_build(load(second), folder)
    assert report.actions() == {"export": "skipped", "compile-onnxruntime-fp32": "skipped",
                                "validate-onnxruntime-fp32": "skipped", "compile-openvino-fp16": "built",
                                "validate-openvino-fp16": "built"}


def test_second_build_on_a_folder_gets_exit_7(copy_built, recipe_file):
    folder = copy_built()
    before = manifest.load(folder)["files"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom diffprism.lock import folder_lock\n"
         "with folder_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["build", str(recipe_file), "--out", str(folder)]) == EXIT_LOCKED
    finally:
        holder.kill()
        holder.wait()
    assert manifest.verify(folder) == [] and manifest.load(folder)["files"] == before


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another set order than the in-process build
    return subprocess.Popen([sys.executable, "-m", "diffprism.cli", "-q", "--json", "build", str(recipe), "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the build finished before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_several_points_resumes_to_the_same_hashes(built, recipe_file, tmp_path):
    out = tmp_path / "killed"
    stages = out / ".stages"
    points = [
        lambda: any((out / ".staging").glob("onnx.*/text_encoder/model.onnx")),  # mid export
        # between stages: export and compile recorded, validation not started (resumes at the next stage)
        lambda: (stages / "compile-onnxruntime-fp32.json").is_file(),
    ]
    for ready in points:
        _kill_when(_start(recipe_file, out), ready)
        assert not (out / manifest.MANIFEST).exists()  # an interrupted build never looks finished
    final = _start(recipe_file, out)
    stdout, _ = final.communicate(timeout=900)
    assert final.returncode == 0
    actions = {k: v["action"] for k, v in json.loads(stdout)["stages"].items()}
    assert actions == {"export": "skipped", "compile-onnxruntime-fp32": "skipped", "validate-onnxruntime-fp32": "built"}
    assert manifest.verify(out) == []
    assert _hashes(out) == _hashes(built)  # byte-identical to the uninterrupted build
    assert not any((out / ".staging").glob("*"))


def test_export_is_byte_identical_across_processes(exported, tmp_path):
    """Same input, same bytes: hashes in manifests mean something across machines and reruns.

    The SIGKILL test already compares text encoder and VAE decoder across processes; this one
    covers the VAE encoder (the tiny-sd component no other test exports in another process)
    against the shared session export, in one child process."""
    first = exported("tiny-sd")
    second = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "777"}  # set iteration order differs from this process
    subprocess.run([sys.executable, "-m", "diffprism.cli", "-q", "export", "tiny-sd", "--components", "vae_encoder",
                    "--out", str(second)], check=True, env=env, stderr=subprocess.DEVNULL)
    ours = {k: v for k, v in manifest.load(second)["files"].items() if "vae_encoder" in k}
    theirs = {k: v for k, v in manifest.load(first)["files"].items() if "vae_encoder" in k}
    assert len(ours) == 4 and ours == theirs  # model.onnx, model.onnx_data, config.json, reference npz


def test_a_capture_in_the_folder_is_in_the_keys_of_the_variants_that_may_read_it(recipe_text, tmp_path):
    """ONNX Runtime fp16's island search reads a capture when there is one, whoever made it: its key sees the bytes."""
    recipe = parse(recipe_text + '\n[[build]]\ntarget = "onnxruntime"\nprecision = "fp16"\n')
    fp32, fp16 = (b.variant for b in recipe.build)
    out = tmp_path / "set"
    keys = Keys(recipe, out=out)  # a key is of the folder as it is when asked
    bare = keys.compile(fp16), keys.validate(fp16), keys.compile(fp32)
    capture = out / "calibration"
    capture.mkdir(parents=True)
    (capture / "info.json").write_text("{}")
    (capture / "text_encoder.npz").write_bytes(b"captured once")
    once = keys.compile(fp16), keys.validate(fp16), keys.compile(fp32)
    (capture / "text_encoder.npz").write_bytes(b"captured again")
    again = keys.compile(fp16), keys.validate(fp16), keys.compile(fp32)
    assert len({bare[0], once[0], again[0]}) == 3 and len({bare[1], once[1], again[1]}) == 3
    assert bare[2] == once[2] == again[2]  # fp32 reads no capture


def test_a_capture_left_by_calibrate_rebuilds_the_fp16_variant_that_reads_it(copy_built, tmp_path, recipe_text):
    from diffprism.jobs import calibrate_job

    folder = copy_built()
    recipe = tmp_path / "fp16.toml"
    recipe.write_text(recipe_text + '\n[[build]]\ntarget = "onnxruntime"\nprecision = "fp16"\n')
    first = run_build(load(recipe), folder)
    details = manifest.load(folder)["targets"]["onnxruntime-fp16"]["details"]
    assert first.actions()["compile-onnxruntime-fp16"] == "built" and details["text_encoder"]["island_inputs"] == "reference"
    calibrate_job(folder, prompts=["a red cube"], steps=1)
    again = run_build(load(recipe), folder)
    assert again.actions()["compile-onnxruntime-fp16"] == "built" and again.actions()["export"] == "skipped"
    details = manifest.load(folder)["targets"]["onnxruntime-fp16"]["details"]
    assert details["text_encoder"]["island_inputs"] == "capture+reference"
    assert set(run_build(load(recipe), folder).actions().values()) == {"skipped"}


PROMPTED = """\
components = ["text_encoder", "unet", "vae_decoder"]
reference_points = "opt"

[source]
preset = "tiny-sd"

[shapes]
batch = "1"
size = "32"

[[build]]
target = "onnxruntime"

[validation]
prompts = ["a red cube"]
steps = 2
"""


def test_validation_prompts_are_the_images_the_build_generates_and_compares(tmp_path, capsys):
    recipe = tmp_path / "prompted.toml"
    recipe.write_text(PROMPTED)
    out = tmp_path / "set"
    assert main(["--json", "build", str(recipe), "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stages"]["e2e-onnxruntime-fp32"]["action"] == "built" and doc["images"]["onnxruntime-fp32"]["passed"]
    section = json.loads((out / "report" / "validation.json").read_text())["e2e"]
    assert [r["prompt"] for r in section["requests"]] == ["a red cube"] and section["requests"][0]["steps"] == 2
    check = section["results"]["onnxruntime-fp32"]["checks"][0]
    assert check["passed"] and (out / check["image"]).is_file() and (out / section["reference"]["images"][0]).is_file()
    data = manifest.load(out)
    assert data["validation"]["e2e:onnxruntime-fp32"] == {"passed": True, "precision": "fp32", "images": 1,
                                                         "failed": 0, "error": None}
    assert manifest.verify(out) == [] and "a red cube" in (out / "report" / "report.html").read_text()

    # Other prompts: only the image check runs again, and it judges those prompts.
    recipe.write_text(PROMPTED.replace('["a red cube"]', '["a blue ball", "a green tree"]'))
    assert main(["--json", "build", str(recipe), "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {k: v["action"] for k, v in doc["stages"].items()} == {
        "export": "skipped", "compile-onnxruntime-fp32": "skipped", "validate-onnxruntime-fp32": "skipped",
        "e2e-onnxruntime-fp32": "built"}
    section = json.loads((out / "report" / "validation.json").read_text())["e2e"]
    assert [r["prompt"] for r in section["requests"]] == ["a blue ball", "a green tree"]
    assert manifest.load(out)["validation"]["e2e:onnxruntime-fp32"]["images"] == 2


def test_validation_prompts_need_the_components_generation_needs(tmp_path):
    recipe = parse(PROMPTED.replace('["text_encoder", "unet", "vae_decoder"]', '["text_encoder"]'))
    with pytest.raises(UsageError, match=r"need image generation, which needs unet, vae_decoder"):
        run_build(recipe, tmp_path / "set")


def test_validate_key_follows_the_runtime_configuration_the_variant_is_judged_at(recipe_text, monkeypatch):
    from targets.base import get_target

    recipe = parse(recipe_text + '\n[[build]]\ntarget = "openvino"\nprecision = "fp16"\n')
    variant = recipe.build[-1].variant
    keys = Keys(recipe)
    before, e2e_before, compiled = keys.validate(variant), keys.e2e(variant), keys.compile(variant)
    # The same artifact judged at another compute precision is another verdict: only validation reruns.
    monkeypatch.setattr(type(get_target("openvino")), "runtime_options", lambda self, config: {"hint": "f16"})
    assert keys.compile(variant) == compiled
    assert keys.validate(variant) != before and keys.e2e(variant) != e2e_before


def test_calibration_runtime_is_in_the_capture_key_and_reaches_the_capture(copy_built, recipe_text, monkeypatch):
    from diffprism import jobs

    plain = parse(recipe_text)
    graph = parse(recipe_text + '\n[calibration]\nruntime = "openvino"\n')
    assert graph.calibration.runtime == "openvino" and plain.calibration.runtime == "torch"
    assert Keys(graph).export == Keys(plain).export and Keys(graph).calibration != Keys(plain).calibration
    # 'auto' is keyed by the runtime it picks on this machine, not by the word.
    monkeypatch.setattr(jobs, "capture_runtime", lambda runtime: "onnxruntime" if runtime == "auto" else runtime)
    auto = parse(recipe_text + '\n[calibration]\nruntime = "auto"\n')
    one = Keys(auto).calibration
    monkeypatch.setattr(jobs, "capture_runtime", lambda runtime: "openvino" if runtime == "auto" else runtime)
    assert Keys(auto).calibration != one
    with pytest.raises(Exception, match="runtime"):
        parse(recipe_text + '\n[calibration]\nruntime = "tensorrt"\n')

    seen = []

    def capture(out, source, **kwargs):
        seen.append(kwargs["runtime"])
        raise UsageError("capture stopped by the test", "none")

    monkeypatch.setattr(jobs, "calibrate_work", capture)
    int8 = recipe_text + '\n[calibration]\nruntime = "onnxruntime"\n\n[[build]]\ntarget = "onnxruntime"\nprecision = "int8"\n'
    with pytest.raises(UsageError, match="stopped by the test"):
        run_build(parse(int8), copy_built())
    assert seen == ["onnxruntime"]
