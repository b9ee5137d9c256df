"""Flux-size in bounded memory: the sharded random writer, --dtype exports, memory budgets, full-size presets."""
from __future__ import annotations

import filecmp
import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

from diffprism import presets, preset_cache
from exporters import materialize, memory, weights_dtype
from exporters.errors import SourceError
from exporters.spec import ShapeRequest

SHARD = 64_000  # bytes: forces several shards out of the tiny models
SMALL = ShapeRequest(t5_sequence=(32, 32, 32))  # Flux's 512 T5 tokens only slow the tiny references down


def _folder(root: Path, dtype: torch.dtype) -> tuple[Path, dict]:
    pipe = preset_cache.empty_build(presets.tiny_flux, 0)
    folder = root / str(dtype).split(".")[-1]
    return folder, preset_cache.save_random_pipeline(pipe, folder, seed=0, dtype=dtype, shard_bytes=SHARD)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-folders")
    return {name: _folder(root, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_writer_shards_in_library_layout_one_tensor_at_a_time(folders, tmp_path):
    folder, stats = folders["bf16"]
    t = stats["transformer"]
    assert len(t.files) > 1 and t.files[0] == f"diffusion_pytorch_model-00001-of-{len(t.files):05d}.safetensors"
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(t.files) and index["metadata"]["total_size"] == t.bytes
    # transformers' names for the T5 encoder; its tied embedding is saved once
    t5 = stats["text_encoder_2"]
    assert t5.files[0].startswith("model-00001-of-") and (folder / "text_encoder_2" / "model.safetensors.index.json").is_file()
    tensors = _tensors(folder / "transformer")
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    # never more than one tensor alive: the peak is the largest tensor itself
    assert t.peak_live_bytes == t.largest_tensor_bytes == max(v.numel() * 2 for v in tensors.values())
    # values depend on (seed, component, name) only: one unsharded file holds the same tensors
    empty = preset_cache.empty_build(presets.tiny_flux, 0).transformer
    single = materialize.write_module(empty, tmp_path / "one", materialize.DIFFUSERS, seed=0, component="transformer")
    assert single.files == ["diffusion_pytorch_model.safetensors"]
    again = _tensors(tmp_path / "one")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    name = "transformer_blocks.0.attn.to_q.weight"
    expected = materialize.random_tensor(tuple(tensors[name].shape), torch.bfloat16, name, 0, "transformer")
    assert torch.equal(tensors[name], expected) and 0.5 < float(expected.float().std() * np.sqrt(expected.shape[1])) < 1.5


def test_writer_counts_a_tensor_kept_alive(tmp_path, monkeypatch):
    kept = []
    real = materialize.random_tensor
    monkeypatch.setattr(materialize, "random_tensor", lambda *a: kept.append(real(*a)) or kept[-1])
    empty = preset_cache.empty_build(presets.tiny_flux, 0).transformer
    stats = materialize.write_module(empty, tmp_path, materialize.DIFFUSERS, seed=0, component="transformer")
    assert stats.peak_live_bytes > 2 * stats.largest_tensor_bytes  # the check sees leaks, not just sizes


FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _initializer_types(path: Path) -> set[int]:
    """Types of the floating-point weights in the data file (integer tables keep their type)."""
    model = onnx.load(str(path), load_external_data=False)
    return {t.data_type for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL and t.data_type in FLOATS}


def test_bf16_export_of_a_sharded_folder_holds_bf16_and_validates(folders, tmp_path):
    from diffprism.jobs import compile_job, export_job, validate_job

    folder, _ = folders["bf16"]
    out = tmp_path / "out"
    export_job(str(folder), out, components=["transformer", "text_encoder_2"], dtype="bf16", reference_points="opt",
               shapes=SMALL)
    info = json.loads((out / "onnx" / "diffprism.json").read_text())
    assert info["weights_dtype"] == "bf16"
    for name in ("transformer", "text_encoder_2"):
        assert _initializer_types(out / "onnx" / name / "model.onnx") == {onnx.TensorProto.BFLOAT16}
    result = validate_job(out, target="onnxruntime", precision="fp32")
    assert result.passed and set(result.rows.values()) == {"bf16"}, [c.to_json() for c in result.comparisons]
    # OpenVINO reads the bf16 weights as compressed constants: int8 weight-only and fp16 from the streamed tree
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'diffprism[openvino]')")
    for precision in ("int8", "fp16"):
        compile_job(out, target="openvino", precision=precision, components=["transformer"],
                    options={"quantize_activations": []} if precision == "int8" else None)
        # f32 compute: the weights judged alike on every CPU (bf16 compute: see tests/targets/test_dit_variants.py)
        verdict = validate_job(out, target="openvino", precision=precision, components=["transformer"],
                               runner_options={"hint": "f32"})
        assert verdict.passed, [c.to_json() for c in verdict.comparisons if not c.passed]
    # ONNX Runtime's precision variants convert from fp32 weights: a bf16 tree is refused, saying why
    with pytest.raises(SourceError, match="needs the fp32 export tree; this tree stores bf16"):
        compile_job(out, target="onnxruntime", precision="fp16")


def test_streamed_fp16_is_byte_identical_to_plain_export_converted_afterwards(folders, tmp_path):
    from diffusers import DiffusionPipeline

    from exporters.export import export_pipeline
    from exporters.streaming import empty_pipeline

    folder, _ = folders["fp32"]
    name = "text_encoder_2"  # T5 (tied embedding); the bf16 test above streams the transformer too
    streamed = export_pipeline(empty_pipeline(folder), tmp_path / "s", components=[name], streaming=True,
                               dtype="fp16", reference_points="opt", shapes=SMALL)
    assert _initializer_types(streamed.tree / name / "model.onnx") == {onnx.TensorProto.FLOAT16}
    plain = export_pipeline(DiffusionPipeline.from_pretrained(str(folder), local_files_only=True), tmp_path / "p",
                            components=[name], streaming=False, reference_points="opt", shapes=SMALL)
    weights_dtype.convert_file(plain.tree / name, tmp_path / "converted", "fp16")
    for f in ("model.onnx", "model.onnx_data"):
        assert filecmp.cmp(streamed.tree / name / f, tmp_path / "converted" / f, shallow=False), f
    # and it computes what the references (fp32 weights) say, within fp16's row
    from runtimes.onnxruntime_runner import OnnxRuntimeRunner
    from exporters import reference
    from validation.compare import compare
    from validation.policy import row

    runner = OnnxRuntimeRunner(streamed.specs[name], streamed.tree / name / "model.onnx")
    with runner:
        for point, case in reference.load(streamed.references[name]).items():
            comp = compare(name, point, case["dims"], case["outputs"], runner.infer(case["inputs"]), row("fp16").component)
            assert comp.passed, comp.to_json()


def test_a_step_over_its_memory_budget_stops_before_writing(folders, tmp_path, monkeypatch):
    from diffprism.jobs import export_job

    folder, _ = folders["bf16"]
    out = tmp_path / "out"
    with pytest.raises(memory.MemoryBudgetError, match=r"streamed export needs about .* more than the .* of "
                       r"--memory-budget \(raise --memory-budget"):
        export_job(str(folder), out, components=["transformer"], memory_budget="1M")
    assert not (out / "onnx").exists()
    assert not (out / ".staging").exists() or not list((out / ".staging").iterdir())
    monkeypatch.setenv(memory.ENV, "2M")
    with pytest.raises(memory.MemoryBudgetError, match=memory.ENV):
        memory.check("openvino compile", 10 << 30, fix="x")
    assert memory.parse_bytes("1.5G") == 3 << 29 and memory.parse_bytes("512m") == 512 << 20


def test_materialise_refuses_a_disk_it_cannot_fill(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, 0, 1000))
    with pytest.raises(Exception, match="materialising tiny-flux needs .* GB of disk"):
        preset_cache.materialised("tiny-flux", presets.tiny_flux, 0, root=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("tiny-flux-*"))


def test_materialised_preset_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setattr(materialize, "DEFAULT_SHARD_BYTES", SHARD)
    first = preset_cache.materialised("tiny-flux", presets.tiny_flux, 0, root=tmp_path, dtype=torch.float32)
    again = preset_cache.materialised("tiny-flux", presets.tiny_flux, 0, root=tmp_path, dtype=torch.float32)
    other = preset_cache.empty_build(presets.tiny_flux, 1)
    assert first == again and first.name.startswith("tiny-flux-") and (first / "model_index.json").is_file()
    assert preset_cache.digest("tiny-flux", 1, torch.float32, other) not in first.name


def test_materialised_folder_is_the_same_in_every_process():
    """The digest must not depend on the process: an export in a new process finds the folder the
    materialise step wrote instead of writing a second copy (34 GB for flux-random)."""
    import os
    import subprocess
    import sys

    code = ("import torch; from diffprism import presets, preset_cache; "
            "print(preset_cache.digest('tiny-flux', 0, torch.bfloat16, "
            "preset_cache.empty_build(presets.tiny_flux, 0)))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
               for seed in (1, 2, 3)}
    assert len(digests) == 1 and len(next(iter(digests))) == 16, digests


@functools.lru_cache(maxsize=None)
def _meta_pipeline(name: str):
    return preset_cache.empty_build(presets.PRESETS[name].build, 0)


@pytest.mark.parametrize("name,part,params", [
    ("flux-random", "transformer", 11.90e9), ("flux-random", "text_encoder_2", 4.76e9),
    ("sd35-medium-random", "transformer", 2.243e9), ("sd35-medium-random", "text_encoder_2", 0.69e9),
])
def test_full_size_presets_have_the_real_architectures(name, part, params):
    preset = presets.PRESETS[name]
    assert preset.materialised and not preset.tiny
    pipe = _meta_pipeline(name)
    module = getattr(pipe, part)
    assert all(p.is_meta for p in module.parameters())
    count = sum(p.numel() for p in module.parameters())
    assert abs(count - params) / params < 0.01, count
    if name == "sd35-medium-random" and part == "transformer":
        assert list(module.config.dual_attention_layers) == list(range(13)) and module.config.qk_norm == "rms_norm"
