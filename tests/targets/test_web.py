"""Web target: the bundle of tiny-sd, its JS tokenizer and schedulers against transformers and diffusers
(in Node), the browser limits, and the page itself in headless Chromium against PyTorch."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from exporters.errors import UsageError
from exporters.tree import read_tree_info
from runtimes.browser import find_chromium
from targets import web_runtime
from targets.base import get_target
from targets.web import PAGE, SCHEDULERS

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (apt-get install -y nodejs)")
_no_chromium = pytest.mark.skipif(find_chromium() is None,
                                  reason="chromium is not installed (apt-get update && apt-get install -y chromium)")


def needs_chromium(test):
    return pytest.mark.browser(_no_chromium(test))


@pytest.fixture(scope="module")
def bundle_out(exported, tmp_path_factory):
    """A copy of the tiny-sd export with web-fp32 built (tests may add report files; the bundle stays read-only)."""
    from diffprism.jobs import compile_job

    if shutil.which("npm") is None and not web_runtime.cached():
        pytest.skip("npm is not installed and onnxruntime-web is not cached (apt-get install -y npm)")
    out = tmp_path_factory.mktemp("web") / "tiny-sd"
    shutil.copytree(exported("tiny-sd"), out)
    compile_job(out, target="web", precision="fp32")
    return out


# --- plan and bundle -------------------------------------------------------------------------


def test_plan_needs_the_text_to_image_components_and_knows_its_methods(exported):
    tree = exported("tiny-sd") / "onnx"
    specs = read_tree_info(tree)[1]
    target = get_target("web")
    plan = target.plan(tree, specs, target.config(precision="int8"))
    assert {n: c["method"] for n, c in plan["components"].items()} == {
        "text_encoder": "int8-dynamic", "unet": "int8-dynamic", "vae_decoder": "fp16"}
    without = {n: s for n, s in specs.items() if n != "text_encoder"}
    with pytest.raises(UsageError, match="text_encoder"):
        target.plan(tree, without, target.config(precision="fp32"))
    with pytest.raises(UsageError, match="no precision 'int4'"):
        target.config(precision="int4")


def test_bundle_is_self_contained(bundle_out):
    bundle = bundle_out / "web-fp32"
    info = json.loads((bundle / "bundle.json").read_text())
    assert set(info["components"]) == {"text_encoder", "unet", "vae_decoder"}
    for name, c in info["components"].items():
        for f in [c["model"], *c["external_data"]]:
            assert (bundle / name / f).is_file()
        assert c["external_data"] == ["model.onnx_data"]  # weights outside the protobuf, as ORT Web loads them
    for f in web_runtime.FILES:
        assert (bundle / "ort" / f).stat().st_size > 0
    assert info["onnxruntime_web"] == web_runtime.locked_version()
    assert {p.name for p in PAGE.iterdir()} <= {p.name for p in bundle.iterdir()}
    for page in bundle.glob("*.*js"):  # no CDN: the page loads only what the bundle holds
        assert "https://" not in page.read_text() and "http://" not in page.read_text()
    assert (bundle / "tokenizer" / "tokenizer.json").is_file() and (bundle / "scheduler").is_dir()
    assert info["geometry"] == {"vae_scale": 2, "latent_channels": 4, "latent_multiple": 16, "default_height": 64,
                                "default_width": 64, "max_sequence": 77, "scaling_factor": 0.18215,
                                "shift_factor": 0.0}


def test_a_component_over_the_browser_limit_is_a_clear_error(copy_export):
    from diffprism.jobs import compile_job

    out = copy_export("tiny-sd")
    with pytest.raises(UsageError, match="WebAssembly memory") as err:
        compile_job(out, target="web", precision="fp32", options={"max_component_bytes": 100_000})
    assert "fp16 or int8" in str(err.value)
    assert not (out / "web-fp32").exists()  # nothing half-built left behind


# --- the page's JS, in Node, against transformers and diffusers --------------------------------


def _node(script: str, *args: str) -> object:
    done = subprocess.run([NODE, "--input-type=module", "-e", script, *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_node
def test_js_tokenizer_matches_transformers(exported):
    from transformers import AutoTokenizer

    tree = exported("tiny-sd") / "onnx" / "tokenizer"
    prompts = ["a photograph of an astronaut riding a horse", "Hello,   WORLD!!  it's 2024\tcafé <|endoftext|>",
               "", "a " * 100]
    script = f"""
        import {{ readFileSync }} from "node:fs";
        const {{ ClipTokenizer }} = await import("{(PAGE / 'tokenizer.mjs').as_uri()}");
        const read = (f) => JSON.parse(readFileSync("{tree}/" + f));
        const tok = new ClipTokenizer(read("tokenizer.json"), read("tokenizer_config.json"));
        console.log(JSON.stringify(JSON.parse(process.argv[1]).map((p) => tok.encode(p))));
    """
    ours = _node(script, json.dumps(prompts))
    theirs = AutoTokenizer.from_pretrained(tree)
    assert ours == [theirs(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]


SCHEDULE_CASES = [
    ("DDIMScheduler", {}),  # clip_sample on, as DDIMScheduler's default
    ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),  # the tiny presets'
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("DDIMScheduler", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
]


@needs_node
@pytest.mark.parametrize("cls,extra", SCHEDULE_CASES)
def test_js_scheduler_matches_diffusers(cls, extra):
    import diffusers
    import torch

    assert cls in SCHEDULERS
    scheduler = getattr(diffusers, cls)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, **extra)
    steps = 5
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(16).astype(np.float32) * float(scheduler.init_noise_sigma)
    outputs = rng.standard_normal((steps, 16)).astype(np.float32)
    expected = []
    x = torch.from_numpy(sample.copy())
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t)
        x = scheduler.step(torch.from_numpy(outputs[i]), t, x).prev_sample
        expected.append((scaled.numpy().tolist(), x.numpy().tolist()))
    script = f"""
        const {{ makeScheduler }} = await import("{(PAGE / 'scheduler.mjs').as_uri()}");
        const [config, sample, outputs] = JSON.parse(process.argv[1]);
        const s = makeScheduler(config, outputs.length);
        let x = Float32Array.from(sample);
        const steps = outputs.map((o, i) => {{
            const scaled = s.scaleModelInput(x, i);
            x = s.step(Float32Array.from(o), i, x);
            return [Array.from(scaled), Array.from(x)];
        }});
        console.log(JSON.stringify({{timesteps: s.timesteps, sigma: s.initNoiseSigma, steps}}));
    """
    config = {"_class_name": cls, **dict(scheduler.config)}
    got = _node(script, json.dumps([config, sample.tolist(), outputs.tolist()]))
    np.testing.assert_allclose(got["timesteps"], scheduler.timesteps.numpy(), rtol=1e-6)
    assert got["sigma"] == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)
    for (scaled, x), (ref_scaled, ref_x) in zip(got["steps"], expected):
        np.testing.assert_allclose(scaled, ref_scaled, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x, ref_x, rtol=1e-5, atol=1e-5)


# --- the page in headless Chromium ------------------------------------------------------------


def _requests(size: int = 64, steps: int = 4, guidance: float = 7.5):
    from validation.e2e import requests_for

    return requests_for(["a red cube on a blue table, studio light"], size=(size, size), steps=steps,
                        guidance_scale=guidance)


@needs_chromium
def test_browser_image_matches_pytorch_on_wasm(bundle_out):
    from diffprism.bundle_jobs import pipeline_e2e_job
    from validation.report import write_report

    result = pipeline_e2e_job(bundle_out, target="web", precision="fp32", requests=_requests())
    assert result.error is None
    assert result.runner["pipeline"]["provider"] == "wasm" and result.label == "web-fp32-wasm"
    assert result.passed, result.checks[0].violations
    check = result.checks[0]
    assert check.metrics["latent_rel_l2"] < 1e-4 and check.metrics["psnr"] > 45  # fp32 bounds, with room
    assert (bundle_out / check.image).is_file() and (bundle_out / check.screenshot).stat().st_size > 0
    assert len(check.timings["steps"]) == 4 and check.timings["total"] > 0
    html = write_report(bundle_out).read_text()
    assert "web-fp32" in html and "page screenshot" in html  # beside the other targets' images


@needs_chromium
@pytest.mark.slow
def test_browser_webgpu_when_chromium_exposes_it(bundle_out):
    from diffprism.bundle_jobs import pipeline_e2e_job

    # backend=auto takes WebGPU when the browser has an adapter (here Chromium's software one, slow):
    # the smallest image, one step, no guidance (UNet batch 1).
    result = pipeline_e2e_job(bundle_out, target="web", precision="fp32", requests=_requests(32, 1, 1.0),
                              runner_options={"backend": "auto"})
    runner = result.runner["pipeline"]
    if runner["provider"] != "webgpu":
        pytest.skip(f"headless Chromium exposes no WebGPU adapter here ({runner['webgpu']}); the WASM test ran")
    assert result.passed, result.error or result.checks[0].violations


@needs_chromium
def test_validate_cli_fails_a_bundle_with_broken_weights(bundle_out, tmp_path, capsys):
    from diffprism.cli import main
    from exporters.errors import EXIT_VALIDATION_FAILED
    from exporters.files import sha256_file

    out = tmp_path / "broken"
    shutil.copytree(bundle_out, out)
    data = out / "web-fp32" / "unet" / "model.onnx_data"
    weights = np.fromfile(data, dtype=np.float32)
    np.random.default_rng(0).shuffle(weights)  # same size and dtype, wrong values: the page still loads it
    weights.tofile(data)
    # As if the build had written these bytes: validate refuses a set changed behind its manifest.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][data.relative_to(out).as_posix()] = {"sha256": sha256_file(data), "size": data.stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest))
    code = main(["--json", "validate", str(out), "--target", "web", "--e2e-steps", "2",
                 "--e2e-prompt", "a red cube on a blue table, studio light"])
    assert code == EXIT_VALIDATION_FAILED
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["e2e"][0]["checks"][0]["violations"]
