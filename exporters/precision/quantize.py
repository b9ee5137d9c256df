"""INT8 with onnxruntime.quantization: static QDQ calibrated on captured inputs, and dynamic.

ONNX Runtime recommends pre-processing (optimization + shape inference) before quantizing;
`prepare` does that, and falls back to ONNX shape inference alone when the symbolic pass
cannot follow a graph. Static int8 runs in two steps that never hold the model together:
`calibrate` (ONNX Runtime's calibrator for the chosen CalibrationMethod, writing its
calibration cache) and then `quantize_static` reading that cache.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from exporters.errors import ExportError, UsageError
from exporters.files import working_dir
from exporters.onnx_writer import ONNX_NAME
from exporters.precision import graph

log = logging.getLogger(__name__)

STATIC_OPS = ("Conv", "MatMul", "Gemm")
# onnxruntime.quantization.CalibrationMethod members offered for int8 (Distribution is for fp8 only).
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
SYMBOLIC_SHAPE_LIMIT = 1 << 30  # weight bytes above which quant_pre_process skips its symbolic pass


def prepare(src: Path, workdir: Path) -> Path:
    """quant_pre_process of src/model.onnx into workdir (weights in one external file)."""
    from onnxruntime.quantization import quant_pre_process

    workdir = workdir.resolve()  # resolved before working_dir() changes the CWD
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "prepared.onnx"
    kwargs = dict(save_as_external_data=True, all_tensors_to_one_file=True, external_data_location="prepared.onnx_data")
    src = src.resolve()

    def run(skip_symbolic_shape: bool) -> None:
        with working_dir(workdir / "tmp"):
            quant_pre_process(str(src / ONNX_NAME), str(out), skip_symbolic_shape=skip_symbolic_shape, **kwargs)

    weights = graph.size_bytes(src)
    if weights > SYMBOLIC_SHAPE_LIMIT:
        # The symbolic pass holds the weights several times over (an SD 1.5 UNet exhausted 24 GB);
        # the exported graph carries full value_info, so ONNX's own inference is enough.
        log.info("%s: %.1f GB of weights, skipping symbolic shape inference", src.name, weights / 1e9)
        run(skip_symbolic_shape=True)
        return out
    try:
        run(skip_symbolic_shape=False)
    except Exception as exc:  # the symbolic pass does not know every op; ONNX's inference is enough
        log.info("symbolic shape inference failed (%s); using ONNX shape inference only", type(exc).__name__)
        for stale in workdir.glob("prepared.onnx*"):
            stale.unlink()
        run(skip_symbolic_shape=True)
    return out


class FeedReader:
    """CalibrationDataReader over in-memory feeds (names as the graph's inputs, fp32)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._it: Iterator | None = None

    def get_next(self):
        if self._it is None:
            self._it = iter(self.feeds)
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def calibrate(prepared: Path, feeds: Sequence[Mapping[str, np.ndarray]], ranges: Path,
              op_types: Sequence[str] = STATIC_OPS, *, method: str = "MinMax", percentile: float = 99.999,
              moving_average: bool = False) -> Path:
    """Ranges of every tensor the quantizer reads, written as ONNX Runtime's calibration cache.

    `method` names an onnxruntime.quantization.CalibrationMethod; each calibrator is built with
    the settings quantize_static would give it (`percentile` is its CalibPercentile,
    `moving_average` its CalibMovingAverage for MinMax).

    MinMax: ONNX Runtime's calibrator exposes a ReduceMin/ReduceMax of each such tensor as a
    graph output. In the session's default (depth-first) execution order those reductions run
    after the main chain, so every calibrated activation stays alive until the end of the call:
    an SD 1.5 UNet at 512 px passed 20 GB. The priority-based order runs each reduction as soon
    as its input exists, and the same call peaks at 6 GB.

    Entropy and Percentile histogram the activations themselves, which the calibrator returns
    as graph outputs; the feeds go in one at a time (the collector merges histograms across
    calls) so only one call's activations are held at once.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, MinMaxCalibrater, save_tensors_data
    from onnxruntime.quantization.calibrate import create_calibrator

    if not feeds:
        raise ExportError("static int8 needs calibration feeds", "run 'diffprism calibrate DIR' first")
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method '{method}'", f"choose from {', '.join(CALIBRATION_METHODS)}")

    class Calibrator(MinMaxCalibrater):
        def create_inference_session(self):
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ONNX Runtime's own
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            self.infer_session = ort.InferenceSession(self.augmented_model_path, opts, providers=self.execution_providers)

    class Reader(FeedReader, CalibrationDataReader):
        pass

    ranges = ranges.resolve()
    with tempfile.TemporaryDirectory(dir=ranges.parent) as tmp:
        augmented = str(Path(tmp) / "augmented.onnx")
        if method == "MinMax":
            calibrator = Calibrator(prepared.resolve(), list(op_types), augmented_model_path=augmented,
                                    use_external_data_format=True, moving_average=moving_average)
            calibrator.augment_graph()
            calibrator.create_inference_session()
            batches = [feeds]
        else:
            calibrator = create_calibrator(prepared.resolve(), list(op_types), augmented_model_path=augmented,
                                           calibrate_method=CalibrationMethod[method], use_external_data_format=True,
                                           extra_options={"percentile": percentile})
            batches = [[feed] for feed in feeds]
        chatter = io.StringIO()  # the histogram collector prints progress; stdout belongs to the CLI
        with contextlib.redirect_stdout(chatter):
            for batch in batches:
                calibrator.collect_data(Reader(batch))
            data = calibrator.compute_data()
        log.debug("%s calibration: %s", method, chatter.getvalue().strip())
        save_tensors_data(data, ranges)
        del calibrator
    return ranges


def static_int8(prepared: Path, out: Path, feeds: Sequence[Mapping[str, np.ndarray]], *, per_channel: bool = True,
                exclude: Sequence[str] = (), op_types: Sequence[str] = STATIC_OPS, method: str = "MinMax",
                percentile: float = 99.999, moving_average: bool = False) -> Path:
    """QDQ int8 of the compute-heavy ops: uint8 activations calibrated on `feeds` (`method`, see
    `calibrate`), int8 weights.

    Only `op_types` are quantized: elementwise and shape ops gain nothing from int8 on CPU
    and cost accuracy.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    prepared, out = prepared.resolve(), out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with working_dir(out.parent / "tmp"):
        ranges = calibrate(prepared, feeds, out.parent / "tmp" / "ranges.json", op_types, method=method,
                           percentile=percentile, moving_average=moving_average)
        quantize_static(str(prepared), str(out), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod[method], op_types_to_quantize=list(op_types),
                        nodes_to_exclude=list(exclude) or None, use_external_data_format=True,
                        calibration_cache_path=str(ranges))
    return out


def dynamic_int8(src: Path, out: Path, workdir: Path, *, per_channel: bool = True,
                 op_types: Sequence[str] = ("MatMul",)) -> Path:
    """Weight int8, activations quantized per call at run time (MatMulInteger); no calibration.

    The dynamic quantizer re-runs ONNX shape inference in strict mode, which rejects some
    exporter value_info; it gets the graph without value_info and infers its own.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from exporters.precision import graph

    model = graph.load(src)
    del model.graph.value_info[:]
    stripped = graph.save(model, workdir / "stripped").resolve()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with working_dir(workdir.resolve() / "tmp"):
        quantize_dynamic(str(stripped.resolve()), str(out.resolve()), op_types_to_quantize=list(op_types),
                         per_channel=per_channel, weight_type=QuantType.QInt8, use_external_data_format=True)
    return out
