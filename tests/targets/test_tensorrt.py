"""TensorRT target: plans, profiles, flags, naming, the build job, and (on a GPU) engines vs PyTorch.

Everything that needs no GPU runs here. Tests that need TensorRT and a CUDA GPU carry the
`tensorrt` and `gpu` markers and skip with the reason. Golden files live in tests/targets/golden/
(regenerate with DIFFPRISM_UPDATE_GOLDEN=1 and review the diff by hand).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import onnx
import pytest

from exporters.errors import BackendUnavailable, ExportError, ShapeError, SourceError, UsageError
from exporters.tree import read_geometry
from exporters.tree import read_tree_info
from runtimes.tensorrt_runner import TensorRtRunner, onnxruntime_tensorrt_providers, select_profile, torch_dtype_name
from targets.base import get_target
from targets.tensorrt_job import build_script, trtexec_args
from targets.tensorrt_plan import (
    TensorRtConfig, engine_dir_name, engine_ranges, parse_gpu, parse_trt_version, profile_specs, trt_target,
)

GOLDEN = Path(__file__).parent / "golden"
TINY = ("tiny-sd", "tiny-sd2", "tiny-sdxl")


def _have_tensorrt_gpu() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "needs the tensorrt Python package (NVIDIA's index) and a CUDA GPU"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (tensorrt is installed but torch sees no GPU)"
    return ""


def _plan(out: Path, components=None, **options) -> dict:
    target = get_target("tensorrt")
    _, specs = read_tree_info(out / "onnx")
    if components:
        specs = {n: s for n, s in specs.items() if n in components}
    options.setdefault("gpu", "sm89")
    options.setdefault("trt_version", "10.8.0")
    return target.plan(out / "onnx", specs, target.config(**options))


@pytest.fixture(scope="module")
def fp16_tree(exported, tmp_path_factory):
    """A copy of the tiny-sd export with its fp16-with-islands variant onnx-fp16/ (TensorRT 11's fp16 source)."""
    from diffprism.jobs import compile_job

    out = tmp_path_factory.mktemp("trt-fp16") / "sd"
    shutil.copytree(exported("tiny-sd"), out)
    compile_job(out, target="onnxruntime", precision="fp16")
    return out


def _assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DIFFPRISM_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path} (DIFFPRISM_UPDATE_GOLDEN=1 writes it; review it by hand)"
    assert text == path.read_text(), f"{name} differs from its golden file"


# --- tags and naming ------------------------------------------------------------------------


@pytest.mark.parametrize("text,cc", [("sm89", 89), ("sm_86", 86), ("8.9", 89), ("89", 89), ("10.0", 100),
                                     ("sm120", 120), ("7.5", 75)])
def test_parse_gpu(text, cc):
    assert parse_gpu(text) == cc


@pytest.mark.parametrize("text", ["ada", "8", "sm8.9.1", ""])
def test_parse_gpu_rejects_non_capabilities(text):
    with pytest.raises(UsageError, match="compute capability"):
        parse_gpu(text)


def test_trt_version_is_tagged_by_major_minor_patch():
    assert parse_trt_version("10.8") == "10.8.0"
    assert parse_trt_version("10.8.0.43") == "10.8.0"
    assert parse_trt_version("11") == "11"  # a major alone: the job fills in the rest
    with pytest.raises(UsageError):
        parse_trt_version("ten")


@pytest.mark.parametrize("version,target", [("10.8.0", (10, "10.8.0")), ("11.2", (11, "11.2.0")), ("11", (11, "unknown")),
                                            (None, (11, "unknown"))])
def test_trt_target_major_and_version(version, target):
    assert trt_target(version, None) == target
    assert trt_target(None, "10.10.0") == (10, "10.10.0")  # the installed TensorRT when the option is absent


@pytest.mark.parametrize("version", ["10.7.0", "8.6.1", "12.0", "9"])
def test_unsupported_tensorrt_versions_are_usage_errors(version):
    with pytest.raises(UsageError, match="10.8 to 11.x") as err:
        trt_target(version, None)
    assert err.value.fix


def test_engine_folder_names_gpu_tensorrt_and_build_path(exported, fp16_tree):
    plan = _plan(exported("tiny-sd"), precision="fp16")
    assert plan["dir"] == engine_dir_name("fp16", "sm89", "10.8.0", False) == "tensorrt-fp16-sm89-trt10.8.0-flags"
    assert plan["components"]["unet"]["engine"] == "unet/model.plan"
    assert plan["compute_capability"] == "8.9" and plan["trt_version"] == "10.8.0" and plan["trt_major"] == 10
    portable = _plan(exported("tiny-sd"), precision="fp16", hardware_compatibility="ampere_plus")
    assert portable["dir"] == "tensorrt-fp16-sm80plus-trt10.8.0-flags"
    typed = _plan(fp16_tree, precision="fp16", trt_version="11.0.0")
    assert typed["dir"] == "tensorrt-fp16-sm89-trt11.0.0-typed" and typed["trt_major"] == 11


def test_variants_that_differ_only_in_options_get_their_own_engine_folders(exported, monkeypatch):
    """The folder ends with the label's options digest; the build job builds into that folder on the GPU, and
    the runner there looks in it."""
    import targets.tensorrt as trt_target
    from diffprism.variant import Variant

    out = exported("tiny-sd")
    default = Variant.of("tensorrt", "fp16", {"gpu": "sm89", "trt_version": "10.8.0"})
    tuned = Variant.of("tensorrt", "fp16", {"gpu": "sm89", "trt_version": "10.8.0", "optimization_level": 5})
    samecc = Variant.of("tensorrt", "fp16", {"gpu": "sm89", "trt_version": "10.10.0",
                                             "hardware_compatibility": "same_compute_capability"})
    assert default.key == "tensorrt-fp16-sm89-trt10.8.0" and default.folder(out).name == "tensorrt-fp16-sm89-trt10.8.0-flags"
    assert tuned.key == f"tensorrt-fp16-sm89-trt10.8.0-{tuned.digest[:8]}"
    assert tuned.folder(out).name == f"tensorrt-fp16-sm89-trt10.8.0-flags-{tuned.digest[:8]}"
    assert samecc.folder(out).name == "tensorrt-fp16-sm89-trt10.10.0-flags-samecc"
    plans = [_plan(out, precision="fp16", **v.options) for v in (default, tuned, samecc)]
    assert [p["dir"] for p in plans] == [v.folder(out).name for v in (default, tuned, samecc)]
    assert 'DEST="tensorrt-${PRECISION}-${GPU_TAG}-trt${TRT_VERSION}-flags${OPTIONS_TAG}"' in build_script(plans[1])
    assert f"OPTIONS_TAG=-{tuned.digest[:8]}" in build_script(plans[1])
    # On the GPU machine (no gpu/trt_version given, both detected) the runner's folder carries the same suffix.
    monkeypatch.setattr(trt_target, "detect_cc", lambda: 89)
    monkeypatch.setattr(trt_target, "detect_trt_version", lambda: "11.0.0")
    here = Variant.of("tensorrt", "fp16", {"workspace_mb": 512})
    assert here.folder(out).name == f"tensorrt-fp16-sm89-trt11.0.0-typed-{here.digest[:8]}"


def test_unknown_gpu_and_version_plan_for_tensorrt_11(fp16_tree, monkeypatch):
    import targets.tensorrt as trt_target

    monkeypatch.setattr(trt_target, "detect_cc", lambda: None)
    monkeypatch.setattr(trt_target, "detect_trt_version", lambda: None)
    plan = _plan(fp16_tree, precision="fp16", gpu=None, trt_version=None)
    assert plan["gpu"] == "smunknown" and plan["trt_version"] == "unknown" and plan["trt_major"] == 11
    assert plan["dir"] == "tensorrt-fp16-smunknown-trt11-typed"
    target = get_target("tensorrt")
    assert target.output_dir(fp16_tree, target.config(precision="fp16")) == fp16_tree / plan["dir"]


# --- profiles ---------------------------------------------------------------------------------


def _onnx_inputs(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


@pytest.mark.parametrize("preset", TINY)
def test_profiles_match_onnx_dynamic_dims(exported, preset):
    """Every profile shape fits the exported graph: static axes equal, dynamic axes follow their dim (k*name)."""
    out = exported(preset)
    _, specs = read_tree_info(out / "onnx")
    geometry = read_geometry(out / "onnx")
    scale = geometry.vae_scale_factor
    step = 8 * scale  # pixels per latent multiple of 8
    sizes = [f"{2 * step}:{4 * step}:{6 * step}", f"{6 * step}:{8 * step}:{8 * step}"]
    plan = _plan(out, precision="fp16", sizes=sizes)
    for name, component in plan["components"].items():
        graph = _onnx_inputs(out / component["onnx"])
        dynamic = {n for n, dims in graph.items() if any(isinstance(d, str) for d in dims)}
        narrowed = profile_specs(specs[name], TensorRtConfig(precision="fp16", sizes=sizes), scale,
                                 geometry.batch_factor(name))
        assert len(component["profiles"]) == len(narrowed) >= 1
        for shapes, spec in zip(component["profiles"], narrowed):
            assert set(shapes) == dynamic, f"{name}: profiles must cover exactly the dynamic inputs"
            for point in ("min", "opt", "max"):
                values = spec.dim_values(point)
                for tensor in shapes:
                    got, dims = shapes[tensor][point], graph[tensor]
                    assert len(got) == len(dims)
                    for size, dim in zip(got, dims):
                        if isinstance(dim, int):
                            assert size == dim
                            continue
                        factor, _, dim_name = dim.rpartition("*")
                        k = int(factor) if factor else 1
                        assert size == k * values[dim_name], f"{name}.{tensor} {dim} at {point}"
                        if dim_name in ("height", "width"):
                            assert (size // k) % 8 == 0, "latent sizes are multiples of 8"
                for dim in spec.dims:  # every profile stays inside the exported range
                    exported_dim = specs[name].dim(dim.name)
                    assert exported_dim.min <= values[dim.name] <= exported_dim.max


def test_sizes_give_one_profile_each_and_text_encoders_one(exported):
    out = exported("tiny-sd")
    scale = read_geometry(out / "onnx").vae_scale_factor  # 2 for the tiny VAE
    plan = _plan(out, precision="fp16", sizes=[f"{16 * scale}:{32 * scale}:{48 * scale}", f"{48 * scale}:{64 * scale}:{64 * scale}"])
    unet = plan["components"]["unet"]["profiles"]
    assert [p["sample"]["min"][2:] for p in unet] == [[16, 16], [48, 48]]
    assert [p["sample"]["opt"][2:] for p in unet] == [[32, 32], [64, 64]]
    assert [p["sample"]["max"][2:] for p in unet] == [[48, 48], [64, 64]]
    assert unet[0]["encoder_hidden_states"]["max"][0] == 4  # 2 images x 2 under guidance (the export's range)
    assert len(plan["components"]["text_encoder"]["profiles"]) == 1
    decoder = plan["components"]["vae_decoder"]["profiles"]
    assert decoder[1]["latent_sample"]["max"] == [2, 4, 64, 64]  # the VAE decodes per image


def test_batch_and_static_options(exported):
    plan = _plan(exported("tiny-sd"), precision="fp16", batch="1:1:2", static=True)
    (profile,) = plan["components"]["unet"]["profiles"]
    # batch counts images: the UNet runs 2 latents per image under guidance, the text encoder one prompt
    assert profile["sample"]["min"] == profile["sample"]["opt"] == profile["sample"]["max"] == [2, 4, 32, 32]
    plan = _plan(exported("tiny-sd"), precision="fp16", batch="1:1:2")
    (profile,) = plan["components"]["unet"]["profiles"]
    assert profile["timestep"] == {"min": [2], "opt": [2], "max": [4]}
    (text,) = plan["components"]["text_encoder"]["profiles"]
    assert text["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [2, 77]}


@pytest.mark.parametrize("options,match", [
    ({"batch": "4:2:1"}, "MIN:OPT:MAX"),  # max < min
    ({"batch": "1:2:64"}, "outside the exported range"),  # wider than the export
    ({"sizes": ["32:64:1024"]}, "outside the exported range"),
    ({"sizes": ["30:64:96"]}, "not a multiple of 16"),
])
def test_impossible_shape_requests_are_clear_errors(exported, options, match):
    with pytest.raises(ShapeError, match=match) as err:
        _plan(exported("tiny-sd"), precision="fp16", **options)
    assert err.value.fix


# --- precisions and flags ---------------------------------------------------------------------


@pytest.mark.parametrize("precision,flags,typed,args", [
    ("fp32", [], False, ["--noTF32"]),
    ("fp16", ["FP16"], False, ["--fp16"]),
    ("bf16", ["BF16"], False, ["--bf16"]),
])
def test_tensorrt_10_flags_per_precision(exported, precision, flags, typed, args):
    plan = _plan(exported("tiny-sd"), precision=precision)
    assert plan["builder"]["precision_flags"] == flags
    assert plan["network"]["strongly_typed"] is typed
    assert plan["source"] == "onnx"
    built = trtexec_args(plan, "unet", "e.plan", "t.cache")
    for a in args:
        assert a in built
    assert "--stronglyTyped" not in built
    others = {"--fp16", "--bf16", "--int8", "--fp8", "--noTF32"} - set(args)
    assert not others & set(built)


WEAK_FLAGS = {"--fp16", "--bf16", "--int8", "--fp8", "--best"}


def test_tensorrt_11_fp16_builds_strongly_typed_from_the_islands_variant(fp16_tree):
    """TensorRT 11 has no --fp16: the fp16 graphs with fp32 islands (onnx-fp16/) are built --stronglyTyped."""
    plan = _plan(fp16_tree, precision="fp16", trt_version="11.0.0")
    assert plan["network"]["strongly_typed"] is True and plan["builder"]["precision_flags"] == []
    assert plan["source"] == "onnx-fp16"
    info, _ = read_tree_info(fp16_tree / "onnx-fp16")
    for name, component in plan["components"].items():
        assert component["onnx"] == f"onnx-fp16/{name}/model.onnx" and (fp16_tree / component["onnx"]).is_file()
        assert info["variant"][name]["method"] == "fp16" and "islands" in info["variant"][name]
        built = trtexec_args(plan, name, "e.plan", "t.cache")
        assert "--stronglyTyped" in built and not WEAK_FLAGS & set(built)
        assert f"--onnx=onnx-fp16/{name}/model.onnx" in built
    trt_options = onnxruntime_tensorrt_providers(plan, "unet", fp16_tree / "ort-cache")[0][1]
    assert trt_options["trt_fp16_enable"] is False  # ORT's TensorRT EP reads the fp16 graph, no weak-typing flag


def test_tensorrt_11_fp32_is_strongly_typed_from_the_export(exported):
    plan = _plan(exported("tiny-sd"), precision="fp32", trt_version="11")
    assert plan["source"] == "onnx" and plan["network"]["strongly_typed"] is True
    built = trtexec_args(plan, "unet", "e.plan", "t.cache")
    assert "--stronglyTyped" in built and "--noTF32" in built and not WEAK_FLAGS & set(built)


def test_tensorrt_11_fp16_without_the_variant_names_the_command(copy_export):
    out = copy_export("tiny-sd")
    with pytest.raises(SourceError) as err:
        _plan(out, precision="fp16", trt_version="11.0.0")
    assert "onnx-fp16" in str(err.value) and "--target onnxruntime --precision fp16" in err.value.fix
    assert "trt_version=10" in err.value.fix


def test_tensorrt_11_fp16_refuses_a_variant_that_is_not_fp16(copy_export):
    from diffprism.jobs import compile_job

    out = copy_export("tiny-sd")
    result = compile_job(out, target="onnxruntime", precision="fp16", components=["text_encoder", "unet"],
                         options={"policy": {"unet": "int8-dynamic"}})
    # That variant has its own folder (options digest); put it where TensorRT 11 reads the fp16 graphs.
    result.out_dir.rename(out / "onnx-fp16")
    with pytest.raises(SourceError, match="needs fp16 graphs") as err:
        _plan(out, components=["text_encoder", "unet"], precision="fp16", trt_version="11.0.0")
    assert "'unet': 'int8-dynamic'" in str(err.value)


def test_tensorrt_11_bf16_is_refused_with_the_way_out(exported):
    with pytest.raises(UsageError, match="computes in fp32") as err:
        _plan(exported("tiny-sd"), precision="bf16", trt_version="11.0.0")
    assert "fp16" in err.value.fix and "trt_version=10" in err.value.fix


def _with_qdq_tree(tmp_path: Path, exported_dir: Path, precision: str) -> Path:
    """An artifact folder whose onnx/ is the session export and whose onnx-<precision>/ has a unet graph file."""
    out = tmp_path / "set"
    out.mkdir()
    (out / "onnx").symlink_to(exported_dir / "onnx", target_is_directory=True)
    (out / f"onnx-{precision}" / "unet").mkdir(parents=True)
    shutil.copy(exported_dir / "onnx" / "unet" / "model.onnx", out / f"onnx-{precision}" / "unet" / "model.onnx")
    return out


@pytest.mark.parametrize("version", ["10.8.0", "11.0.0"])
@pytest.mark.parametrize("precision,gpu", [("int8", "sm86"), ("fp8", "sm89")])
def test_qdq_precisions_build_strongly_typed_from_their_tree(exported, tmp_path, precision, gpu, version):
    out = _with_qdq_tree(tmp_path, exported("tiny-sd"), precision)
    plan = _plan(out, components=["unet"], precision=precision, gpu=gpu, trt_version=version)
    assert plan["dir"].endswith("-typed")
    assert plan["network"]["strongly_typed"] is True
    assert plan["builder"]["precision_flags"] == []
    assert plan["components"]["unet"]["onnx"] == f"onnx-{precision}/unet/model.onnx"
    built = trtexec_args(plan, "unet", "e.plan", "t.cache")
    assert "--stronglyTyped" in built and "--int8" not in built and "--fp8" not in built


def test_int8_without_qdq_tree_names_the_commands(exported):
    with pytest.raises(SourceError) as err:
        _plan(exported("tiny-sd"), precision="int8")
    assert "onnx-int8" in str(err.value)
    assert "diffprism calibrate" in err.value.fix
    assert "--target onnxruntime --precision int8" in err.value.fix


@pytest.mark.parametrize("precision,gpu,match", [
    ("fp8", "sm86", "compute capability >= 8.9"),
    ("fp8", "8.0", "compute capability >= 8.9"),
    ("bf16", "sm75", "compute capability >= 8.0"),
])
def test_precision_needs_a_capable_gpu(exported, precision, gpu, match):
    with pytest.raises(UsageError, match=match):
        _plan(exported("tiny-sd"), precision=precision, gpu=gpu)


def test_fp8_cannot_be_ampere_compatible(exported):
    with pytest.raises(UsageError, match="Ampere"):
        _plan(exported("tiny-sd"), precision="fp8", hardware_compatibility="ampere_plus")


def test_unknown_precision_and_options_are_usage_errors():
    target = get_target("tensorrt")
    with pytest.raises(UsageError, match="int4"):
        target.config(precision="int4")
    with pytest.raises(UsageError, match="optimization_level"):
        target.config(precision="fp16", optimization_level=9)
    with pytest.raises(UsageError, match="hardware_compatibility"):
        target.config(precision="fp16", hardware_compatibility="turing")


def test_same_compute_capability_needs_tensorrt_10_10(exported):
    with pytest.raises(UsageError, match="needs TensorRT >= 10.10") as err:
        _plan(exported("tiny-sd"), precision="fp16", hardware_compatibility="same_compute_capability")
    assert "ampere_plus" in err.value.fix
    plan = _plan(exported("tiny-sd"), precision="fp16", hardware_compatibility="same_compute_capability",
                 trt_version="10.10.0")
    assert plan["min_trt"] == [10, 10]
    assert "--hardwareCompatibilityLevel=sameComputeCapability" in trtexec_args(plan, "unet", "e", "t")
    # A major alone cannot be checked here: the job checks the version it finds (test below).
    assert _plan(exported("tiny-sd"), precision="fp16", hardware_compatibility="same_compute_capability",
                 trt_version="10")["min_trt"] == [10, 10]
    assert _plan(exported("tiny-sd"), precision="fp16")["min_trt"] == [10, 8]


def test_builder_options_reach_trtexec(exported):
    plan = _plan(exported("tiny-sd"), precision="fp16", optimization_level=5, workspace_mb=2048, refit=True,
                 strip_weights=True, version_compatible=True, hardware_compatibility="same_compute_capability",
                 timing_cache="caches/sd.cache", trt_version="10.10.0")
    b = plan["builder"]
    assert b["workspace_bytes"] == 2048 * 2**20 and b["timing_cache"] == "caches/sd.cache"
    built = trtexec_args(plan, "unet", "e.plan", plan["builder"]["timing_cache"])
    for a in ("--builderOptimizationLevel=5", "--memPoolSize=workspace:2048M", "--refit", "--stripWeights",
              "--versionCompatible", "--hardwareCompatibilityLevel=sameComputeCapability",
              "--timingCacheFile=caches/sd.cache", "--skipInference", "--onnx=onnx/unet/model.onnx", "--device=0"):
        assert a in built
    script = build_script(plan)
    assert "TIMING_CACHE=caches/sd.cache" in script
    assert '--device="$GPU_INDEX"' in script and "export CUDA_DEVICE_ORDER=PCI_BUS_ID" in script


# --- golden plan and build job ----------------------------------------------------------------


def test_golden_plan_and_script_tiny_sd_fp16(exported):
    """TensorRT 10.x: fp16 as a builder flag on the fp32 graph."""
    plan = _plan(exported("tiny-sd"), precision="fp16", sizes=["32:64:96", "96:128:128"])
    _assert_golden("tensorrt_tiny-sd_fp16_sm89.plan.json", json.dumps(plan, indent=2, sort_keys=True) + "\n")
    _assert_golden("tensorrt_tiny-sd_fp16_sm89.build_engines.sh", build_script(plan))


def test_golden_plan_and_script_tiny_sd_fp16_tensorrt_11(fp16_tree):
    """TensorRT 11.x: fp16 strongly typed from the fp16-with-islands graphs."""
    plan = _plan(fp16_tree, precision="fp16", sizes=["32:64:96", "96:128:128"], trt_version="11.0.0")
    _assert_golden("tensorrt11_tiny-sd_fp16_sm89.plan.json", json.dumps(plan, indent=2, sort_keys=True) + "\n")
    script = build_script(plan)
    _assert_golden("tensorrt11_tiny-sd_fp16_sm89.build_engines.sh", script)
    assert "--stronglyTyped" in script and "--fp16" not in script


def test_golden_script_tiny_sdxl_unknown_gpu_portable(exported, monkeypatch):
    import targets.tensorrt as trt_target

    monkeypatch.setattr(trt_target, "detect_cc", lambda: None)
    monkeypatch.setattr(trt_target, "detect_trt_version", lambda: None)
    plan = _plan(exported("tiny-sdxl"), components=["unet"], precision="bf16", gpu=None, trt_version="10",
                 hardware_compatibility="ampere_plus", workspace_mb=4096, refit=True, strip_weights=True,
                 version_compatible=True, optimization_level=5, batch="1:1:2")
    assert plan["min_compute_capability"] == 80 and plan["trt_version"] == "unknown" and plan["trt_major"] == 10
    _assert_golden("tensorrt_tiny-sdxl_bf16_portable.build_engines.sh", build_script(plan))


def test_build_script_is_valid_bash(exported):
    plan = _plan(exported("tiny-sdxl"), precision="fp16")
    result = subprocess.run(["bash", "-n"], input=build_script(plan), text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


def _stub_tools(bin_dir: Path, cc: str, banner: str) -> Path:
    """Stand-ins for nvidia-smi and trtexec that only exercise the script's own logic (no TensorRT here).
    trtexec logs its arguments and CUDA_DEVICE_ORDER; nvidia-smi logs its own to nvidia-smi.calls."""
    bin_dir.mkdir()
    log = bin_dir / "trtexec.calls"
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho \"$*\" >> {bin_dir / 'nvidia-smi.calls'}\necho '{cc}'\n")
    (bin_dir / "trtexec").write_text(
        "#!/bin/sh\n"
        f"echo \"order=$CUDA_DEVICE_ORDER $*\" >> {log}\n"
        f"case \"$*\" in *--help*) echo '&&&& RUNNING TensorRT.trtexec [TensorRT {banner}] [b43] # trtexec --help'; exit 0;; esac\n"
        "for a in \"$@\"; do case \"$a\" in --saveEngine=*) printf 'engine for %s' \"$*\" > \"${a#--saveEngine=}\";; esac; done\n"
    )
    for tool in ("nvidia-smi", "trtexec"):
        (bin_dir / tool).chmod(0o755)
    return log


def _run_job(script: Path, bin_dir: Path | None, **env_vars: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin" if bin_dir else "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           **env_vars}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd="/")


def test_compile_without_tensorrt_writes_a_runnable_build_job(copy_export, tmp_path, capsys, monkeypatch):
    """`diffprism compile --target tensorrt` here writes plan.json + build_engines.sh; the job fills in the GPU."""
    if not _have_tensorrt_gpu():
        pytest.skip("this machine can build engines itself; the job path is for machines without TensorRT")
    import targets.tensorrt as trt_target
    from diffprism.cli import main

    from diffprism.jobs import compile_job

    monkeypatch.setattr(trt_target, "detect_cc", lambda: None)
    out = copy_export("tiny-sd")
    compile_job(out, target="onnxruntime", precision="fp16", components=["unet", "vae_decoder"])
    code = main(["--json", "compile", str(out), "--target", "tensorrt", "--precision", "fp16",
                 "--components", "unet,vae_decoder", "--option", "sizes=[\"32:64:96\",\"96:128:128\"]"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"]
    from diffprism.variant import Variant

    variant = Variant.of("tensorrt", "fp16", {"sizes": ["32:64:96", "96:128:128"]})
    tag = variant.digest[:8]  # the sizes option: the label's options digest ends the folder name too
    job = out / f"tensorrt-fp16-smunknown-trt11-typed-{tag}"  # nothing detected: TensorRT 11, the version left to the job
    assert Path(report["dir"]) == job
    assert "GPU machine" in report["note"] and "build_engines.sh" in report["note"]
    script = job / "build_engines.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    plan = json.loads((job / "plan.json").read_text())
    assert set(plan["components"]) == {"unet", "vae_decoder"}
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["targets"][f"tensorrt-fp16-{tag}"]
    assert entry["details"]["unet"]["built"] is False and entry["details"]["unet"]["gpu"] == "smunknown"
    assert f"tensorrt-fp16-smunknown-trt11-typed-{tag}/build_engines.sh" in manifest["files"]

    # No trtexec on PATH: a clear message, not a half-built folder.
    missing = _run_job(script, None)
    assert missing.returncode != 0 and "trtexec not found on PATH" in missing.stderr

    # A TensorRT 10 trtexec cannot build what was planned the TensorRT 11 way.
    calls = _stub_tools(tmp_path / "bin", "8.9", "v100800")
    wrong = _run_job(script, tmp_path / "bin")
    assert wrong.returncode == 1 and "TensorRT 11 way" in wrong.stderr and "trt_version=10.8.0" in wrong.stderr
    assert not calls.exists() or "--onnx" not in calls.read_text()

    # On a GPU box with TensorRT 11.0.0 the job detects sm89 and builds into the matching folder, on GPU_INDEX.
    shutil.rmtree(tmp_path / "bin")
    calls = _stub_tools(tmp_path / "bin", "8.9", "v110000")
    done = _run_job(script, tmp_path / "bin", GPU_INDEX="1")
    assert done.returncode == 0, done.stderr
    engines = out / f"tensorrt-fp16-sm89-trt11.0.0-typed-{tag}"
    monkeypatch.setattr(trt_target, "detect_cc", lambda: 89)  # there, the runner looks in that folder
    monkeypatch.setattr(trt_target, "detect_trt_version", lambda: "11.0.0")
    assert variant.folder(out) == engines
    record = json.loads((engines / "engines.json").read_text())
    assert record["gpu"] == "sm89" and record["trt_version"] == "11.0.0" and record["compute_capability"] == "8.9"
    import hashlib

    for name in ("unet", "vae_decoder"):
        data = (engines / name / "model.plan").read_bytes()
        assert record["engines"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert not (engines / name / "model.plan.partial").exists()
    assert (engines / "plan.json").is_file()
    # 1 image: the UNet's 2 latents under guidance
    unet_call = next(line for line in calls.read_text().splitlines() if "unet/model.onnx" in line)
    assert "--profile=0 --minShapes=sample:2x4x16x16" in unet_call and "--profile=1" in unet_call
    assert "onnx-fp16/unet/model.onnx" in unet_call and "--stronglyTyped" in unet_call and "--fp16" not in unet_call
    assert f"--timingCacheFile={engines.name}/timing.cache" in unet_call
    # trtexec builds on the GPU whose compute capability was checked, numbered as nvidia-smi numbers it
    assert "--device=1" in unet_call and unet_call.startswith("order=PCI_BUS_ID ")
    assert "-i 1" in (tmp_path / "bin" / "nvidia-smi.calls").read_text()


def test_build_job_refuses_a_gpu_it_was_not_planned_for(exported, tmp_path):
    plan = _plan(exported("tiny-sd"), components=["unet"], precision="fp16", gpu="sm89")
    job = tmp_path / "set" / plan["dir"]
    job.mkdir(parents=True)
    (job / "build_engines.sh").write_text(build_script(plan))
    _stub_tools(tmp_path / "bin", "8.6", "v100800")
    result = _run_job(job / "build_engines.sh", tmp_path / "bin")
    assert result.returncode == 1 and "targets sm89 but GPU 0 is sm86" in result.stderr
    assert not (job / "unet").exists()


@pytest.mark.parametrize("version,banner,match", [
    ("10.8.0", "v110000", "TensorRT 10 way"),  # planned weakly typed, found 11 (no --fp16 there)
    ("10", "v100800", None),  # a major alone: any 10.x from 10.8 builds it
])
def test_build_job_refuses_another_tensorrt_major(exported, tmp_path, version, banner, match):
    plan = _plan(exported("tiny-sd"), components=["unet"], precision="fp16", trt_version=version)
    job = tmp_path / "set" / plan["dir"]
    job.mkdir(parents=True)
    (job / "build_engines.sh").write_text(build_script(plan))
    (job / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "set" / "onnx").symlink_to(exported("tiny-sd") / "onnx", target_is_directory=True)
    _stub_tools(tmp_path / "bin", "8.9", banner)
    result = _run_job(job / "build_engines.sh", tmp_path / "bin")
    if match is None:
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "set" / "tensorrt-fp16-sm89-trt10.8.0-flags" / "engines.json").is_file()
    else:
        assert result.returncode == 1 and match in result.stderr and "re-plan" in result.stderr


def test_build_job_checks_same_compute_capability_needs_10_10(exported, tmp_path):
    plan = _plan(exported("tiny-sd"), components=["unet"], precision="fp16", trt_version="10",
                 hardware_compatibility="same_compute_capability")
    job = tmp_path / "set" / plan["dir"]
    job.mkdir(parents=True)
    (job / "build_engines.sh").write_text(build_script(plan))
    _stub_tools(tmp_path / "bin", "8.9", "v100800")
    result = _run_job(job / "build_engines.sh", tmp_path / "bin")
    assert result.returncode == 1 and "needs TensorRT >= 10.10 but trtexec is 10.8.0" in result.stderr


def test_build_job_refuses_an_old_gpu_for_fp8(exported, tmp_path, monkeypatch):
    import targets.tensorrt as trt_target

    monkeypatch.setattr(trt_target, "detect_cc", lambda: None)
    out = _with_qdq_tree(tmp_path, exported("tiny-sd"), "fp8")
    plan = _plan(out, components=["unet"], precision="fp8", gpu=None)
    job = out / plan["dir"]
    job.mkdir()
    (job / "build_engines.sh").write_text(build_script(plan))
    _stub_tools(tmp_path / "bin", "8.6", "v100800")
    result = _run_job(job / "build_engines.sh", tmp_path / "bin")
    assert result.returncode == 1 and "compute capability >= 8.9" in result.stderr


# --- runtime pieces that run anywhere ------------------------------------------------------------


def test_select_profile_picks_the_range_that_holds_the_feed(exported):
    plan = _plan(exported("tiny-sd"), precision="fp16", sizes=["32:64:96", "96:128:128"])
    ranges = engine_ranges(plan["components"]["unet"])
    feed = {"sample": (2, 4, 32, 32), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    assert select_profile(ranges, feed) == 0
    feed["sample"] = (2, 4, 64, 56)
    assert select_profile(ranges, feed) == 1
    feed["sample"] = (2, 4, 72, 72)
    with pytest.raises(ShapeError, match="no optimization profile"):
        select_profile(ranges, feed, "unet")


def _fake_trt(set_timing_cache_ok: bool = True):
    """A stand-in for the tensorrt module that records what the Python-API build asks of it."""
    from unittest import mock

    trt = mock.MagicMock()
    builder = trt.Builder.return_value
    trt.OnnxParser.return_value.parse_from_file.return_value = True
    builder.build_serialized_network.return_value = b"engine"
    config = builder.create_builder_config.return_value
    config.set_timing_cache.return_value = set_timing_cache_ok
    config.get_timing_cache.return_value.serialize.return_value = b"cache"
    return trt, config


@pytest.mark.parametrize("version,flag", [("10.8.0", "FP16"), ("11.0.0", None)])
def test_python_api_build_sets_weak_flags_only_on_10(exported, fp16_tree, monkeypatch, version, flag):
    import targets.tensorrt_build as tensorrt_build

    trt, config = _fake_trt()
    monkeypatch.setattr(tensorrt_build, "_trt", lambda: trt)
    plan = _plan(fp16_tree, components=["unet"], precision="fp16", trt_version=version)
    component = plan["components"]["unet"]
    engine, cache = tensorrt_build.build_engine(plan, fp16_tree / component["onnx"], component["profiles"], b"")
    assert (engine, cache) == (b"engine", b"cache")
    flags = {call.args[0] for call in config.set_flag.call_args_list}
    assert (trt.BuilderFlag.FP16 in flags) is (flag == "FP16") and trt.BuilderFlag.BF16 not in flags
    trt.OnnxParser.return_value.parse_from_file.assert_called_once_with(str(fp16_tree / component["onnx"]))


def test_python_api_build_refuses_a_rejected_timing_cache(fp16_tree, monkeypatch):
    import targets.tensorrt_build as tensorrt_build

    trt, _ = _fake_trt(set_timing_cache_ok=False)  # TensorRT says False for a cache from another device
    monkeypatch.setattr(tensorrt_build, "_trt", lambda: trt)
    plan = _plan(fp16_tree, components=["unet"], precision="fp16", trt_version="11.0.0")
    component = plan["components"]["unet"]
    with pytest.raises(ExportError, match="rejected the timing cache") as err:
        tensorrt_build.build_engine(plan, fp16_tree / component["onnx"], component["profiles"], b"old")
    assert "delete that file" in err.value.fix
    trt.Builder.return_value.build_serialized_network.assert_not_called()


class _Context:
    """Stands in for an IExecutionContext: records profile switches."""

    def __init__(self):
        self.switches = []

    def set_optimization_profile_async(self, index, stream):
        self.switches.append(index)
        return True


def test_runner_switches_one_context_between_profiles(exported, tmp_path):
    """One execution context for every profile, switched only when a feed needs another profile."""
    plan = _plan(exported("tiny-sd"), precision="fp16", sizes=["32:64:96", "96:128:128"])
    _, specs = read_tree_info(exported("tiny-sd") / "onnx")
    runner = TensorRtRunner(specs["unet"], tmp_path / "model.plan")
    runner.ranges, runner.context = engine_ranges(plan["components"]["unet"]), _Context()
    runner.stream = type("Stream", (), {"cuda_stream": 0})()
    small = {"sample": (2, 4, 32, 32), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    large = {**small, "sample": (2, 4, 64, 64)}
    for shapes in (small, small, large, large, small):
        assert runner.use_profile(shapes) is runner.context
    assert runner.context.switches == [0, 1, 0]


def test_runner_dtype_table():
    assert torch_dtype_name("HALF", "x") == "float16" and torch_dtype_name("BF16", "x") == "bfloat16"
    import torch

    assert getattr(torch, torch_dtype_name("FP8", "x")) is torch.float8_e4m3fn
    for packed in ("INT4", "FP4"):
        with pytest.raises(ExportError, match="packed type"):
            torch_dtype_name(packed, "sample")
    with pytest.raises(ExportError, match="does not know"):
        torch_dtype_name("FP2", "sample")


def test_onnxruntime_tensorrt_provider_options(exported):
    plan = _plan(exported("tiny-sd"), precision="fp16", sizes=["32:64:96", "96:128:128"], workspace_mb=1024)
    (trt_name, trt), (cuda_name, _) = onnxruntime_tensorrt_providers(plan, "vae_decoder", Path("/tmp/c"))
    assert (trt_name, cuda_name) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert trt["trt_fp16_enable"] is True and trt["trt_int8_enable"] is False
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == "/tmp/c"
    assert trt["trt_timing_cache_enable"] and trt["trt_max_workspace_size"] == 1024 * 2**20
    # two profiles: the input is repeated once per profile, as ORT's TensorRT EP parses it
    assert trt["trt_profile_min_shapes"] == "latent_sample:1x4x16x16,latent_sample:1x4x48x48"
    # the VAE decodes per image: batch 1..2 (the export's default range)
    assert trt["trt_profile_opt_shapes"] == "latent_sample:1x4x32x32,latent_sample:1x4x64x64"
    assert trt["trt_profile_max_shapes"] == "latent_sample:2x4x48x48,latent_sample:2x4x64x64"


def test_runner_here_says_what_is_missing(copy_export, monkeypatch):
    import targets.tensorrt as trt_target

    if not _have_tensorrt_gpu():
        pytest.skip("TensorRT and a GPU are present; covered by the gpu tests")
    monkeypatch.setattr(trt_target, "detect_cc", lambda: None)
    out = copy_export("tiny-sd")
    from diffprism.jobs import compile_job

    compile_job(out, target="onnxruntime", precision="fp16", components=["unet"])
    result = compile_job(out, target="tensorrt", precision="fp16", components=["unet"])
    _, specs = read_tree_info(out / "onnx")
    target = get_target("tensorrt")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        target.runner(result.out_dir, specs["unet"])
    runner = target.runner(result.out_dir, specs["unet"], runtime="onnxruntime")
    assert runner.providers[0][0] == "TensorrtExecutionProvider"
    assert runner.model_path == out / "onnx-fp16" / "unet" / "model.onnx"  # TensorRT 11: the fp16 graph
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="did not start TensorrtExecutionProvider"):
            runner.activate()  # never quietly on CPU while claiming TensorRT


# --- on a GPU with TensorRT ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engines_match_pytorch_on_the_same_gpu(copy_export, pipeline):
    """Build fp16 engines with two profiles, run every reference point, compare with torch on the same GPU."""
    reason = _have_tensorrt_gpu()
    if reason:
        pytest.skip(reason)
    import torch

    from diffprism.jobs import compile_job, validate_job
    from exporters.families import exporter_for
    from exporters.inputs import make_feed
    from exporters.spec import iter_points
    from runtimes.torch_runner import TorchRunner
    from validation.compare import compare
    from validation.policy import Policy

    out = copy_export("tiny-sd")
    result = compile_job(out, target="tensorrt", precision="fp16",
                         options={"sizes": ["32:64:96", "96:128:128"]})
    assert all(d["built"] for d in result.details.values())
    _, specs = read_tree_info(out / "onnx")
    target = get_target("tensorrt")
    pipe = pipeline("tiny-sd")
    tolerance = Policy().tolerance("fp16", "unet")
    for name, spec in specs.items():
        exporter = exporter_for(pipe, name)
        wrapper = exporter.wrap(exporter.module(pipe), spec)
        with TorchRunner(spec, wrapper, device="cuda") as ref, target.runner(result.out_dir, spec) as trt_runner:
            for i, (point, values) in enumerate(iter_points(spec)):
                feed = make_feed(spec, values, seed=i)
                comp = compare(name, point, values, ref.infer(feed), trt_runner.infer(feed), tolerance)
                assert comp.passed, comp.to_json()
        wrapper.to("cpu")
    torch.cuda.empty_cache()
    verdict = validate_job(out, target="tensorrt", precision="fp16")
    assert verdict.passed, verdict.to_json()


def test_flux_plan_profiles_follow_packed_tokens_and_the_t5_sequence(exported, pipeline):
    """Packed tokens = latent h/2 * w/2 at every profile point; T5 tokens range on their own."""
    from exporters.export import plan_export
    from exporters.spec import ShapeRequest
    from targets.tensorrt_plan import make_plan

    _, geometry, specs = plan_export(pipeline("tiny-flux"), ["text_encoder_2", "transformer"],
                                     ShapeRequest(batch=(1, 2, 4), t5_sequence=(128, 256, 512)))
    tree = exported("tiny-flux") / "onnx"
    plan = make_plan(tree, specs, TensorRtConfig(precision="fp16", sizes=["32:64:96"], gpu="sm89",
                                                 trt_version="10.8.0"), geometry=geometry)
    [profile] = plan["components"]["transformer"]["profiles"]
    # 32/64/96 px at VAE scale 2 -> latents 16/32/48 -> (8*8, 16*16, 24*24) packed tokens; batch x1 (no CFG batch)
    assert profile == {
        "hidden_states": {"min": [1, 64, 64], "opt": [2, 256, 64], "max": [4, 576, 64]},
        "encoder_hidden_states": {"min": [1, 128, 64], "opt": [2, 256, 64], "max": [4, 512, 64]},
        "pooled_projections": {"min": [1, 32], "opt": [2, 32], "max": [4, 32]},
        "timestep": {"min": [1], "opt": [2], "max": [4]},
        "img_ids": {"min": [64, 3], "opt": [256, 3], "max": [576, 3]},
        "txt_ids": {"min": [128, 3], "opt": [256, 3], "max": [512, 3]},
        "guidance": {"min": [1], "opt": [2], "max": [4]},
    }
    [t5] = plan["components"]["text_encoder_2"]["profiles"]
    assert t5 == {"input_ids": {"min": [1, 128], "opt": [2, 256], "max": [4, 512]}}
