"""fp16 on T5: a planted overflow needs fp32 islands; relative-position index arithmetic stays fp32.

The planted T5 mimics T5-XXL's known fp16 overflow (feed-forward activations beyond 65504).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
import pytest
import torch

from exporters import reference
from exporters.export import export_pipeline
from exporters.onnx_writer import ONNX_NAME
from exporters.precision import graph, half, islands
from exporters.spec import ShapeRequest
from validation.compare import compare
from validation.policy import Policy

T5 = "text_encoder_2"  # Flux's T5 encoder
# Scales the last block's gated-FFN input projection: its output and the product reach ~1e5 (> fp16's 65504)
# inside the FFN, where no fused kernel computes in fp32; the final RMS norm keeps the outputs O(1).
PLANT = 3e5


@pytest.fixture(scope="module")
def planted(pipeline, tmp_path_factory):
    """tiny-flux's T5 with its last feed-forward output scaled, exported alone at a short sequence."""
    pipe = copy.copy(pipeline("tiny-flux"))  # shallow: only text_encoder_2 is replaced
    t5 = copy.deepcopy(pipe.text_encoder_2)
    with torch.no_grad():
        t5.encoder.block[-1].layer[-1].DenseReluDense.wi_1.weight.mul_(PLANT)
    pipe.text_encoder_2 = t5
    out = tmp_path_factory.mktemp("t5-planted")
    export_pipeline(pipe, out, components=[T5], shapes=ShapeRequest(t5_sequence=(32, 32, 32)))
    cases = reference.load(out / "reference" / f"{T5}.npz")
    return out, cases


def test_planted_overflow_is_non_finite_in_plain_fp16_and_finite_with_islands(planted, tmp_path):
    out, cases = planted
    src = out / "onnx" / T5
    feeds = [case["inputs"] for case in cases.values()]
    for case in cases.values():  # the fp32 model is finite and O(1): only fp16's range is exceeded
        assert all(np.isfinite(v).all() and np.abs(v).max() < 100 for v in case["outputs"].values())

    tol = Policy().tolerance("fp16", T5)
    graph.save(half.to_fp16(graph.load(src)), tmp_path / "plain")
    plain = graph.run(tmp_path / "plain" / ONNX_NAME, feeds)
    fp16_throughout = ReferenceEvaluator(onnx.load(str(tmp_path / "plain" / ONNX_NAME)))
    for case, run in zip(cases.values(), plain):
        # Computed in fp16 throughout (ONNX's reference kernels in numpy float16, as fp16 GPU kernels
        # compute), the FFN overflows to Inf and the RMS norm turns it into NaN: a black image.
        assert not np.isfinite(fp16_throughout.run(None, case["inputs"])[0]).all()
        # ONNX Runtime's CPU provider runs fp16 MatMuls without an fp16 kernel in fp32 (it inserts casts),
        # so there the Inf stays inside the FFN and the output comes out finite but far outside the bounds.
        out = run["last_hidden_state"]
        assert not np.isfinite(out).all() or islands.rel_error(out, case["outputs"]["last_hidden_state"]) > 10 * tol.rel_l2

    report = islands.fp16_with_islands(src, tmp_path / "islands", feeds, tmp_path / "work", rel_l2=5e-3)
    assert report.overflowing and report.kept_fp32 and report.clean
    assert report.first_round_rel_l2["last_hidden_state"] > 10 * tol.rel_l2  # the search saw plain fp16 fail
    assert {"MatMul", "Add", "Pow"} <= {op for op in _ops(src, report.kept_fp32)}  # the FFN, the residual, the norm
    with_islands = ReferenceEvaluator(onnx.load(str(tmp_path / "islands" / ONNX_NAME)))
    for (point, case), got in zip(cases.items(), graph.run(tmp_path / "islands" / ONNX_NAME, feeds)):
        assert np.isfinite(got["last_hidden_state"]).all()
        assert np.isfinite(with_islands.run(None, case["inputs"])[0]).all()  # finite in true fp16 arithmetic too
        result = compare(T5, point, case["dims"], case["outputs"], got, tol)
        assert result.passed, result.to_json()
    # fp16 but for the islands' weights
    assert graph.size_bytes(tmp_path / "plain") < graph.size_bytes(tmp_path / "islands") < graph.size_bytes(src)


def _ops(src, names):
    return [n.op_type for n in onnx.load(str(src / ONNX_NAME), load_external_data=False).graph.node if n.name in names]


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    info = onnx.ValueInfoProto()
    info.CopyFrom(next(v for v in model.graph.value_info if v.name == name))
    model.graph.output.append(info)
    return model


def test_relative_position_buckets_stay_exact_in_fp16(exported, tmp_path, monkeypatch):
    """Without the index rule fp16 moves positions to neighbouring buckets; with it they match fp32."""
    src = exported("tiny-flux") / "onnx" / T5
    structure = onnx.load(str(src / ONNX_NAME), load_external_data=False)
    kept = half.index_arithmetic(structure.graph)
    ops = {n.op_type for n in structure.graph.node if n.name in kept}
    assert {"Log", "Div", "Cast"} <= ops and not ops & {"MatMul", "Gather", "Softmax"}  # the buckets, nothing else
    bucket = next(n.output[0] for n in structure.graph.node if n.name in kept and n.op_type == "Cast"
                  and next(a.i for a in n.attribute if a.name == "to") == onnx.TensorProto.INT64)

    feeds = [case["inputs"] for case in reference.load(exported("tiny-flux") / "reference" / f"{T5}.npz").values()][:1]
    graph.save(_with_output(graph.load(src), bucket), tmp_path / "fp32")
    expected = graph.run(tmp_path / "fp32" / ONNX_NAME, feeds)[0][bucket]
    graph.save(half.to_fp16(_with_output(graph.load(src), bucket)), tmp_path / "fp16")
    assert (graph.run(tmp_path / "fp16" / ONNX_NAME, feeds)[0][bucket] == expected).all()

    monkeypatch.setattr(half, "index_arithmetic", lambda g: set())  # the converter on its own
    graph.save(half.to_fp16(_with_output(graph.load(src), bucket)), tmp_path / "naive")
    assert (graph.run(tmp_path / "naive" / ONNX_NAME, feeds)[0][bucket] != expected).any()
