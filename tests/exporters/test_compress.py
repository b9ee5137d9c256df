"""Pruning, distillation and QAT of the tiny-sd UNet (exporters.compress), through the ONNX Runtime target.

Each variant is built once per module through the CLI (`diffprism compile`), on a copy of
the session export with a small calibration capture; tests then read the trees, the
manifest facts and run the graphs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffprism import manifest
from diffprism.cli import main
from diffprism.jobs import calibrate_job
from exporters import calibration
from exporters.compress import prune
from exporters.errors import EXIT_OK, EXIT_USAGE, UsageError
from exporters.tree import read_tree_info

STEPS = "distill_steps=6"
VARIANTS = {  # name -> compile options (options beyond the defaults add a digest to the folder: see DIRS)
    "onnx-pruned": ["--precision", "pruned", "--option", "sparsity=0.5", "--option", "structured=false",
                    "--option", STEPS, "--option", "distill_lr=1e-3"],
    # QAT starts close to the teacher (only rounding noise): small, careful steps.
    "onnx-qat": ["--precision", "qat", "--option", "distill_steps=20", "--option", "distill_lr=3e-6"],
    "onnx-pruned-structured": ["--precision", "pruned", "--option", "sparsity=0.5", "--option", "structured=true",
                               "--option", STEPS, "--option", "distill_lr=1e-3"],
}


def _cli(*argv: str) -> tuple[int, dict]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--json", *argv])
    text = buf.getvalue()
    return code, (json.loads(text[text.index("{"):]) if "{" in text else {})


@pytest.fixture(scope="module")
def built(exported, pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "sd"
    shutil.copytree(exported("tiny-sd"), out)
    calibrate_job(out, prompts=["a red cube", "a blue ball"], steps=4)  # recorded in the manifest
    docs = {name: _cli("compile", str(out), "--target", "onnxruntime", *argv) for name, argv in VARIANTS.items()}
    DIRS.update({name: Path(doc["dir"]).name for name, (_, doc) in docs.items()})
    return out, {name: code for name, (code, _) in docs.items()}


DIRS: dict[str, str] = {}  # name -> the variant's folder, from the compile output


def _unet(out, tree):
    return read_tree_info(out / DIRS[tree])[0]["variant"]["unet"]


def test_cli_builds_every_variant(built):
    out, codes = built
    assert codes == {name: EXIT_OK for name in VARIANTS}
    targets = manifest.load(out)["targets"]
    assert {f"onnxruntime-{DIRS[n].removeprefix('onnx-')}" for n in VARIANTS} <= set(targets)
    assert DIRS["onnx-pruned-structured"].startswith("onnx-pruned-structured-")  # named option, then the digest
    for name in VARIANTS:
        tree = DIRS[name]
        info, specs = read_tree_info(out / tree)
        for item in (out / "onnx").iterdir():
            assert (out / tree / item.name).exists(), (tree, item.name)
        assert info["variant"]["text_encoder"]["method"] == "fp32"  # only the UNet is compressed by default


def test_unstructured_pruning_reaches_sparsity(built):
    out, _ = built
    facts = _unet(out, "onnx-pruned")
    assert facts["weights"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # Measured again on the exported weights: Conv/MatMul/Gemm initializers of rank >= 2.
    model = onnx.load(str(out / DIRS["onnx-pruned"] / "unet" / "model.onnx"))
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros >= 0.45 * facts["weights"]["prunable_weights"]


def test_distillation_lowers_held_out_error(built):
    out, _ = built
    for tree in ("onnx-pruned", "onnx-pruned-structured"):
        d = _unet(out, tree)["distillation"]
        assert d["held_out_batches"] >= 1 and d["train_batches"] >= 1
        assert d["error_after"] < d["error_before"], (tree, d)
    assert _unet(out, "onnx-pruned")["feeds"] == "capture"


def test_qat_fine_tune_is_measured_and_does_no_harm(built):
    """The QAT student starts next to its teacher (int8 rounding only); on a tiny random UNet the
    short fine-tune moves the held-out error by well under 1%, in either direction from run to run,
    so this checks that it is measured and does not damage the student."""
    out, _ = built
    d = _unet(out, "onnx-qat")["distillation"]
    assert d["held_out_batches"] >= 1 and d["train_batches"] >= 1
    assert 0 < d["error_before"] < 0.1
    assert d["error_after"] <= d["error_before"] * 1.02, d


def test_structured_model_is_smaller_and_runs(built, pipeline):
    out, _ = built
    facts = _unet(out, "onnx-pruned-structured")
    assert facts["parameters_after"] < 0.9 * facts["parameters_before"]
    assert facts["structured"]["resnet_blocks"] > 0 and facts["structured"]["feed_forwards"] > 0
    assert facts["structured"]["attention_blocks"] > 0
    tree = out / DIRS["onnx-pruned-structured"] / "unet"
    assert (tree / "model.onnx_data").stat().st_size < (out / "onnx" / "unet" / "model.onnx_data").stat().st_size
    session = ort.InferenceSession(str(tree / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = calibration.load_feeds(out / "calibration", "unet")[0]
    (got,) = session.run(None, feed)
    assert got.shape == feed["sample"].shape and np.isfinite(got).all()
    assert facts["export_rel_l2"] < 1e-4  # the ONNX graph computes what the pruned torch model computes


def test_qat_exports_qdq_that_runs(built):
    out, _ = built
    facts = _unet(out, "onnx-qat")
    ops = [n.op_type for n in onnx.load(str(out / DIRS["onnx-qat"] / "unet" / "model.onnx"),
                                        load_external_data=False).graph.node]
    # One DequantizeLinear per int8 weight, plus activation Q/DQ pairs (layers reading one tensor with
    # one range share theirs).
    assert ops.count("QuantizeLinear") > 0
    assert ops.count("DequantizeLinear") == facts["fake_quantized_layers"] + ops.count("QuantizeLinear")
    assert facts["qdq"]["QuantizeLinear"] == ops.count("QuantizeLinear")
    # Weights are int8 initializers with constant scales (what TensorRT requires), not fp32 weights
    # quantized at run time: every weight-layer input comes from a DequantizeLinear of an int8 constant.
    model = onnx.load(str(out / DIRS["onnx-qat"] / "unet" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == facts["int8_weights"] == facts["fake_quantized_layers"]
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 and n.input[1] in inits for n in weight_dq)
    assert not any(n.op_type == "ReduceMax" for n in model.graph.node)  # no scale computed in the graph
    assert facts["bytes"] < 0.7 * facts["fp32_bytes"]
    assert facts["export_rel_l2"] < 0.05  # ORT's int8 kernels vs torch's fake quant: rounding differences only


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cli_validate_passes(built, name):
    out, _ = built
    # The options pick the variant; --e2e also judges its images against PyTorch's (pruned and qat rows).
    code, report = _cli("validate", str(out), "--target", "onnxruntime", *VARIANTS[name], "--e2e", "--e2e-steps", "2",
                        "--e2e-prompt", "a red cube")
    assert code == EXIT_OK, report
    assert report["e2e"][0]["passed"] and report["e2e"][0]["precision"] == VARIANTS[name][1]
    assert manifest.load(out)["validation"][f"onnxruntime-{DIRS[name].removeprefix('onnx-')}"]["passed"]


def test_bad_sparsity_is_a_usage_error(built):
    out, _ = built
    code, report = _cli("compile", str(out), "--target", "onnxruntime", "--precision", "pruned",
                        "--option", "sparsity=1.5")
    assert code == EXIT_USAGE and "sparsity" in report["error"]
    assert "\n" not in report["error"]


def test_build_without_source_and_misplaced_method(exported):
    from targets.base import get_target

    tgt = get_target("onnxruntime")
    tree = exported("tiny-sd") / "onnx"
    _, specs = read_tree_info(tree)
    assert tgt.needs_source(tgt.config(precision="qat")) and not tgt.needs_source(tgt.config(precision="int8"))
    with pytest.raises(UsageError, match="own precision"):
        tgt.plan(tree, specs, tgt.config(precision="fp16", policy={"unet": "qat"}))
    plan = tgt.plan(tree, specs, tgt.config(precision="pruned"))
    with pytest.raises(UsageError, match="source pipeline"):
        tgt.build(plan, exported("tiny-sd"))


def test_unstructured_layer_scope_and_permanence():
    layers = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Conv2d(4, 8, 3))
    prune.prune_unstructured(layers, 0.25, "layer")
    prune.make_permanent(layers)
    report = prune.sparsity_report(layers)
    assert report["layer_sparsity_min"] == pytest.approx(0.25, abs=0.01)
    assert report["layer_sparsity_max"] == pytest.approx(0.25, abs=0.01)
    assert not hasattr(layers[0], "weight_orig") and isinstance(layers[0].weight, torch.nn.Parameter)
    with pytest.raises(UsageError, match="sparsity"):
        prune.prune_unstructured(layers, 1.5)


def test_head_pruning_keeps_the_remaining_heads_exact(pipeline):
    """Dropping heads equals zeroing their share of the output projection in the original block."""
    import copy

    unet = pipeline("tiny-sd").unet
    attn = next(m for m in unet.modules() if type(m).__name__ == "Attention" and m.heads > 1)
    heads, width = attn.heads, attn.to_q.out_features
    pruned = copy.deepcopy(attn)
    assert prune._prune_heads(pruned, 0.5)
    assert pruned.heads == heads // 2 and pruned.to_q.out_features == width // 2
    assert pruned.to_out[0].in_features == width // 2
    head_dim = width // heads
    kept = {int(i) // head_dim for i in range(width)
            if any(torch.equal(attn.to_q.weight[i], row) for row in pruned.to_q.weight)}
    assert len(kept) == heads // 2
    masked = copy.deepcopy(attn)
    with torch.no_grad():
        for h in set(range(heads)) - kept:
            masked.to_out[0].weight[:, h * head_dim:(h + 1) * head_dim] = 0
    x = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 7, attn.to_k.in_features, generator=torch.Generator().manual_seed(1))
    kwargs = {"encoder_hidden_states": context} if attn.is_cross_attention else {}
    with torch.no_grad():
        assert torch.allclose(pruned(x, **kwargs), masked(x, **kwargs), atol=1e-5)
        assert not torch.allclose(pruned(x, **kwargs), attn(x, **kwargs), atol=1e-3)  # the heads did contribute


def test_global_threshold_prunes_the_smallest_magnitudes_over_all_layers():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    with torch.no_grad():
        layers[1].weight.uniform_(10, 20)  # the second layer's weights are all large: the global threshold spares them
    every = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    prune.prune_unstructured(layers, 0.5, "global")
    prune.make_permanent(layers)
    report = prune.sparsity_report(layers)
    assert report["zero_weights"] == int(0.5 * every.numel())
    assert int((layers[1].weight == 0).sum()) == 0  # every zero is in the small-magnitude layer
    kept = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    assert kept[kept > 0].min() >= every.sort().values[int(0.5 * every.numel()) - 1]
    prune.prune_unstructured(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.0)  # nothing to prune: no error


def test_global_masks_are_boolean_and_fold_in():
    layers = torch.nn.Sequential(torch.nn.Linear(16, 16))
    prune.prune_unstructured(layers, 0.5, "global")
    assert layers[0].weight_mask.dtype == torch.bool
    masked = layers[0].weight.detach().clone()
    prune.make_permanent(layers)
    assert torch.equal(layers[0].weight.detach(), masked) and not hasattr(layers[0], "weight_mask")
