"""ONNX precision passes on the tiny-sd export: fp16, bf16 weights, automatic fp32 islands, int8, int4."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters import reference
from exporters.errors import ExportError
from exporters.precision import graph, half, int4, islands, quantize


def _cases(exported, name):
    cases = reference.load(exported("tiny-sd") / "reference" / f"{name}.npz")
    return [c["inputs"] for c in cases.values()], [c["outputs"] for c in cases.values()]


def _worst(path, feeds, refs):
    return max(islands.rel_error(got[k], ref[k]) for got, ref in zip(graph.run(path, feeds), refs) for k in ref)


def test_fp16_keeps_fp32_io_and_halves_weights(exported, tmp_path):
    src = exported("tiny-sd") / "onnx" / "unet"
    feeds, refs = _cases(exported, "unet")
    path = graph.save(half.to_fp16(graph.load(src)), tmp_path / "unet")
    model = onnx.load(str(path), load_external_data=False)
    assert {i.type.tensor_type.elem_type for i in model.graph.input if i.name != "timestep"} == {onnx.TensorProto.FLOAT}
    big = [i for i in onnx.load(str(path)).graph.initializer if np.prod(i.dims) > 1024]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
    assert _worst(path, feeds, refs) < 1e-2


def test_bf16_stores_bf16_weights_and_runs_in_fp32(exported, tmp_path):
    src = exported("tiny-sd") / "onnx" / "text_encoder"
    feeds, refs = _cases(exported, "text_encoder")
    path = graph.save(half.to_bf16_weights(graph.load(src)), tmp_path / "te")
    model = onnx.load(str(path))
    stored = [i for i in model.graph.initializer if i.name.endswith(".bf16")]
    assert stored and all(i.data_type == onnx.TensorProto.BFLOAT16 for i in stored)
    original = {i.name: numpy_helper.to_array(i) for i in graph.load(src).graph.initializer}
    one = stored[0]
    expect = original[one.name.removesuffix(".bf16")].astype(ml_dtypes.bfloat16)
    assert np.array_equal(numpy_helper.to_array(one).view(np.uint16), expect.view(np.uint16))
    err = _worst(path, feeds, refs)
    assert 0 < err < 3e-2  # bf16 rounding is visible but small


@pytest.fixture(scope="module")
def planted(exported, tmp_path_factory):
    """The tiny-sd VAE decoder with its first conv scaled so activations exceed fp16's 65504."""
    work = tmp_path_factory.mktemp("planted")
    model = graph.load(exported("tiny-sd") / "onnx" / "vae_decoder")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    inits = {i.name: i for i in model.graph.initializer}
    for name in conv.input[1:]:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * 1e5, name))
    path = graph.save(model, work / "fp32")
    feeds, _ = _cases(exported, "vae_decoder")
    refs = graph.run(path, feeds)
    assert all(np.isfinite(r["sample"]).all() for r in refs)
    return work, path.parent, feeds, refs


def test_planted_overflow_breaks_plain_fp16(planted):
    work, src, feeds, refs = planted
    plain = graph.save(half.to_fp16(graph.load(src)), work / "plain")
    outs = graph.run(plain, feeds)
    assert not all(np.isfinite(o["sample"]).all() for o in outs)


def test_islands_fix_the_planted_overflow(planted, tmp_path):
    work, src, feeds, refs = planted
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    report = islands.fp16_with_islands(src, tmp_path / "fixed", feeds[:1], tmp_path / "work", rel_l2=5e-3)
    assert report.clean and report.kept_fp32 and report.overflowing
    assert not np.isfinite(report.first_round_rel_l2["sample"])
    assert _worst(tmp_path / "fixed" / "model.onnx", feeds, refs) < 5e-3  # every reference point, not only the search input
    assert list((tmp_path / "work").iterdir()) == []  # candidates and probe files are cleaned up
    # only part of the graph stays fp32: the island is not the whole decoder
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert len(report.kept_fp32) < len(model.graph.node)
    assert any(c not in report.kept_fp32 for c in convs)


def test_islands_found_part_by_part(planted, tmp_path, monkeypatch):
    # Full-size graphs are probed part by part (graph.chunks) with the parts of both graphs consumed
    # in step; the search must still find the overflow and fix it. (The kept set may differ by a few
    # nodes: ONNX Runtime fuses differently when other intermediates are exposed.)
    work, src, feeds, refs = planted
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    sizes = []
    real_chunks = graph.chunks
    monkeypatch.setattr(graph, "chunks", lambda *a, **k: sizes.append(len(r := real_chunks(*a, **k))) or r)
    parted = islands.fp16_with_islands(src, tmp_path / "fixed", feeds[:1], tmp_path / "work", rel_l2=5e-3, chunk=16)
    assert sizes and min(sizes) > 3  # really probed in several parts
    assert parted.clean and parted.overflowing and parted.kept_fp32
    assert len(parted.kept_fp32) < len(model.graph.node)
    assert _worst(tmp_path / "fixed" / "model.onnx", feeds, refs) < 5e-3


def test_probe_parts_respect_count_and_byte_budget():
    from onnx import TensorProto, helper

    # x -> Relu -> v0 -> Relu -> v1 ... ; v0..v4 have static shapes (1000 floats), v5 is dynamic.
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"v{i - 1}"], [f"v{i}"]) for i in range(6)]
    infos = [helper.make_tensor_value_info(f"v{i}", TensorProto.FLOAT, [1000]) for i in range(5)]
    infos.append(helper.make_tensor_value_info("v5", TensorProto.FLOAT, ["n"]))
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
        [helper.make_tensor_value_info("v5", TensorProto.FLOAT, ["n"])], value_info=infos[:5]))
    names = [f"v{i}" for i in range(6)]
    assert graph.value_bytes(infos[0]) == 4000 and graph.value_bytes(infos[5]) is None
    # two feeds: 8000 bytes a value, so 20000 bytes hold two of them
    assert graph.chunks(model, names, copies=2, chunk=256, budget=20000) == [
        ["v0", "v1"], ["v2", "v3"], ["v4", "v5"]]  # v5: unknown size, counted as budget / chunk
    assert graph.chunks(model, names, copies=1, chunk=4, budget=1 << 30) == [["v0", "v1", "v2", "v3"], ["v4", "v5"]]
    assert graph.chunks(model, names[:1], copies=1, chunk=4, budget=10) == [["v0"]]  # too big for any part: alone


def test_fp16_value_read_by_two_default_fp32_ops_stays_single_assignment(tmp_path):
    # The converter keeps Min/Max/Range/... in fp32 and casts a shared fp16 value once per reader,
    # all under one name; seen on the full-size SD 1.5 UNet, not on the tiny presets.
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["v"]),
             helper.make_node("Max", ["v", "lo"], ["a"]), helper.make_node("Min", ["v", "hi"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    inits = [numpy_helper.from_array(np.full(8, 0.25, np.float32), "lo"),
             numpy_helper.from_array(np.full(8, 0.75, np.float32), "hi")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8]) for n in ("x", "y")]
    infos = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8]) for n in ("v", "a", "b")]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], inits, value_info=infos),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path = graph.save(half.to_fp16(model), tmp_path / "half")  # onnx.checker: single assignment
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    want = np.maximum(np.maximum(x, 0), 0.25) + np.minimum(np.maximum(x, 0), 0.75)
    assert np.allclose(graph.run(path, [{"x": x}])[0]["y"], want, atol=1e-3)


def test_clean_graph_needs_no_island(exported, tmp_path):
    feeds, refs = _cases(exported, "vae_decoder")
    report = islands.fp16_with_islands(exported("tiny-sd") / "onnx" / "vae_decoder", tmp_path / "out", feeds[:1],
                                       tmp_path / "work")
    assert report.clean and report.kept_fp32 == [] and report.rounds == 1
    assert _worst(tmp_path / "out" / "model.onnx", feeds, refs) < 1e-2


def test_island_search_needs_inputs(exported, tmp_path):
    with pytest.raises(ExportError, match="at least one input"):
        islands.fp16_with_islands(exported("tiny-sd") / "onnx" / "vae_decoder", tmp_path / "out", [], tmp_path)


def test_rel_error_flags_non_finite():
    ref = np.ones(4, np.float32)
    assert islands.rel_error(np.array([1, 1, np.inf, 1], np.float32), ref) == float("inf")
    assert islands.rel_error(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-3)


def test_int4_replaces_matmuls(exported, tmp_path):
    src = exported("tiny-sd") / "onnx" / "unet"
    feeds, refs = _cases(exported, "unet")
    path = graph.save(int4.int4_weights(graph.load(src), block_size=32), tmp_path / "unet")
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert "MatMulNBits" in ops
    assert _worst(path, feeds, refs) < 0.3


def test_large_models_skip_the_symbolic_shape_pass(exported, tmp_path, monkeypatch, caplog):
    import onnxruntime.quantization as ortq

    calls = []
    real = ortq.quant_pre_process
    monkeypatch.setattr(ortq, "quant_pre_process", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(quantize, "SYMBOLIC_SHAPE_LIMIT", 0)  # every model counts as large
    with caplog.at_level("INFO", logger="exporters.precision.quantize"):
        out = quantize.prepare(exported("tiny-sd") / "onnx" / "text_encoder", tmp_path)
    assert out.is_file() and [k.get("skip_symbolic_shape") for k in calls] == [True]
    assert "skipping symbolic shape inference" in caplog.text


def test_dynamic_int8_quantizes_matmuls(exported, tmp_path):
    src = exported("tiny-sd") / "onnx" / "text_encoder"
    feeds, refs = _cases(exported, "text_encoder")
    out = quantize.dynamic_int8(src, tmp_path / "q" / "model.onnx", tmp_path)
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert "MatMulInteger" in ops
    assert _worst(out, feeds, refs) < 0.2


def test_static_int8_needs_feeds(exported, tmp_path):
    with pytest.raises(ExportError, match="calibration"):
        quantize.static_int8(tmp_path / "x.onnx", tmp_path / "y.onnx", [])


def test_quantizers_leave_nothing_in_the_working_directory(exported, tmp_path, monkeypatch):
    """ONNX Runtime's quantization tools write temp files into the CWD; ours must not litter it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    src = exported("tiny-sd") / "onnx" / "text_encoder"
    feeds, _ = _cases(exported, "text_encoder")
    prepared = quantize.prepare(src, tmp_path / "prep")
    quantize.static_int8(prepared, tmp_path / "s" / "model.onnx", feeds[:1])
    quantize.dynamic_int8(src, tmp_path / "d" / "model.onnx", tmp_path / "dwork")
    assert list(cwd.iterdir()) == []


def _initializers(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_static_int8_matches_onnxruntime_calibrating_inline(exported, tmp_path):
    """Calibrating in its own step (memory-bounded) gives the same QDQ graph as quantize_static's inline calibrator."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = exported("tiny-sd") / "onnx" / "unet"
    feeds, refs = _cases(exported, "unet")
    prepared = quantize.prepare(src, tmp_path / "prep")
    ours = quantize.static_int8(prepared, tmp_path / "ours" / "model.onnx", feeds[:2])
    inline = tmp_path / "inline" / "model.onnx"
    inline.parent.mkdir()
    quantize_static(str(prepared), str(inline), quantize.FeedReader(feeds[:2]), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(quantize.STATIC_OPS),
                    use_external_data_format=True)
    got, want = _initializers(ours), _initializers(inline)
    scales = [n for n in want if n.endswith("_scale")]
    assert scales and got.keys() == want.keys()
    assert all(np.array_equal(got[n], want[n]) for n in want)
    assert _worst(ours, feeds, refs) < 0.2


def test_calibration_session_runs_reductions_early(exported, tmp_path, monkeypatch):
    """The calibrator's session uses the priority-based order: in the default depth-first order every
    calibrated activation lives to the end of the call (a full-size UNet passed 20 GB)."""
    import onnxruntime as ort

    orders = []
    real = ort.InferenceSession

    def recording(path, options=None, **kwargs):
        orders.append(options.execution_order if options is not None else None)
        return real(path, options, **kwargs)

    feeds, _ = _cases(exported, "text_encoder")
    prepared = quantize.prepare(exported("tiny-sd") / "onnx" / "text_encoder", tmp_path / "prep")
    monkeypatch.setattr(ort, "InferenceSession", recording)
    ranges = quantize.calibrate(prepared, feeds[:1], tmp_path / "ranges.json")
    assert orders == [ort.ExecutionOrder.PRIORITY_BASED]
    from onnxruntime.quantization import load_tensors_data

    data = load_tensors_data(ranges)
    assert len(data.data) > 0 and all(np.all(d.range_value[0] <= d.range_value[1]) for d in data.data.values())


def test_calibration_methods_are_onnxruntime_members():
    from onnxruntime.quantization import CalibrationMethod

    assert all(m in CalibrationMethod.__members__ for m in quantize.CALIBRATION_METHODS)


@pytest.mark.parametrize("method", ["Entropy", "Percentile"])
def test_histogram_calibration_matches_onnxruntime_inline(exported, tmp_path, method):
    """Entropy/Percentile calibrated in their own step give the QDQ graph quantize_static's inline
    calibrator gives with the same method (one feed: the per-feed histogram merge is then a no-op)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, load_tensors_data, quantize_static

    src = exported("tiny-sd") / "onnx" / "text_encoder"
    feeds, refs = _cases(exported, "text_encoder")
    prepared = quantize.prepare(src, tmp_path / "prep")
    ours = quantize.static_int8(prepared, tmp_path / "ours" / "model.onnx", feeds[:1], method=method)
    inline = tmp_path / "inline" / "model.onnx"
    inline.parent.mkdir()
    quantize_static(str(prepared), str(inline), quantize.FeedReader(feeds[:1]), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[method], op_types_to_quantize=list(quantize.STATIC_OPS),
                    use_external_data_format=True)
    got, want = _initializers(ours), _initializers(inline)
    assert [n for n in want if n.endswith("_scale")] and got.keys() == want.keys()
    assert all(np.array_equal(got[n], want[n]) for n in want)
    ranges = load_tensors_data(quantize.calibrate(prepared, feeds[:1], tmp_path / "r.json", method=method))
    assert ranges.calibration_method == CalibrationMethod[method]
    assert _worst(ours, feeds, refs) < 0.2


def test_calibration_methods_give_different_ranges(exported, tmp_path, capsys):
    """Percentile clips the tails MinMax keeps: its bound is never past MinMax's largest magnitude,
    and for most tensors well inside it. The histogram collector's progress prints stay off stdout."""
    from onnxruntime.quantization import load_tensors_data

    feeds, _ = _cases(exported, "unet")
    prepared = quantize.prepare(exported("tiny-sd") / "onnx" / "unet", tmp_path / "prep")
    minmax = load_tensors_data(quantize.calibrate(prepared, feeds[:2], tmp_path / "mm.json")).data
    pct = load_tensors_data(quantize.calibrate(prepared, feeds[:2], tmp_path / "p.json", method="Percentile",
                                               percentile=99.0)).data
    assert capsys.readouterr().out == ""
    assert minmax.keys() == pct.keys()
    bound = {n: (float(np.max(np.abs(minmax[n].range_value))), float(np.max(np.abs(pct[n].range_value))))
             for n in minmax}
    assert all(p <= m * (1 + 1e-6) for m, p in bound.values())
    assert sum(p < 0.9 * m for m, p in bound.values()) > len(bound) // 2


def test_unknown_calibration_method_names_the_choices(exported, tmp_path):
    from exporters.errors import UsageError

    feeds, _ = _cases(exported, "text_encoder")
    with pytest.raises(UsageError, match="MinMax, Entropy, Percentile"):
        quantize.calibrate(tmp_path / "x.onnx", feeds[:1], tmp_path / "r.json", method="KL")
