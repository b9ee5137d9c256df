"""Store an ONNX graph's weights in fp16 or bf16, computing in float32 (`export --dtype`).

Each float32 initializer that lives in the data file (> 1 KiB; shape constants stay inline and
fp32) is stored in the requested dtype and read through a Cast to float32 placed before its first
use. Why casts at load rather than a half-precision graph:
- the graph computes exactly what the fp32 graph computes with the rounded weights, so the
  PyTorch references (taken with the same weights upcast to fp32) judge it, on any runtime;
- ONNX Runtime's CPU provider has no bf16 MatMul/Conv kernels: it folds the Casts at session
  load (the session then holds fp32 weights; the disk and download are halved);
- OpenVINO reads Constant(f16/bf16) -> Convert(f32) as compressed weights, keeps them compressed
  in the IR and decompresses per layer, so the compiled model holds half the bytes;
- half-precision compute stays with the precision targets (ONNX Runtime fp16/bf16), which need
  the fp32 tree (they refuse a converted one: see `require_fp32`).

The conversion is a pure function of the graph, so a streamed export converting each tensor on
its way into model.onnx_data writes the same bytes as a plain export converted afterwards
(`convert_file`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from exporters import onnx_writer
from exporters.errors import SourceError, UsageError

DTYPES = ("fp32", "fp16", "bf16")
INLINE_BYTES = 1024  # onnx_writer.save keeps tensors up to this size in the graph
META_KEY = "diffprism.weights_dtype"


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "fp32":
        return np.dtype(np.float32)
    if dtype == "fp16":
        return np.dtype(np.float16)
    if dtype == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise UsageError(f"unknown weights dtype '{dtype}'", f"choose from {', '.join(DTYPES)}")


@dataclass(frozen=True)
class _Converted:
    tensor: object
    dtype: np.dtype

    def __call__(self) -> ir.Tensor:
        arr = self.tensor.numpy()
        out = np.ascontiguousarray(arr.astype(self.dtype))
        del arr
        if hasattr(self.tensor, "release"):  # an external tensor: unmap its pages now
            self.tensor.release()
        return ir.Tensor(out)


def convert(model: ir.Model, dtype: str) -> int:
    """Convert `model` in place (lazily: each tensor is converted when it is written); returns the
    number of initializers stored in `dtype`."""
    target = numpy_dtype(dtype)
    if dtype == "fp32":
        return 0
    graph = model.graph
    casts = []
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size * 4 <= INLINE_BYTES:
            continue
        if value.is_graph_output():
            raise SourceError(f"initializer '{name}' is a graph output", "export with --dtype fp32")
        uses = list(value.uses())
        new_type = ir.DataType.from_numpy(target)
        value.const_value = ir.LazyTensor(_Converted(tensor, target), new_type, tensor.shape, name=tensor.name)
        value.dtype = new_type
        # Named after the weight, so the graph does not depend on how it was built (node counters).
        cast = ir.node("Cast", inputs=[value], attributes={"to": ir.DataType.FLOAT}, name=f"{name}__cast",
                       outputs=[ir.Value(name=f"{name}__fp32", shape=value.shape,
                                         type=ir.TensorType(ir.DataType.FLOAT))])
        for user, index in uses:
            user.replace_input_with(index, cast.outputs[0])
        casts.append(cast)
    if casts:
        first = graph.node(0) if graph.num_nodes() else None
        if first is None:
            graph.extend(casts)
        else:
            graph.insert_before(first, casts)
    model.metadata_props[META_KEY] = dtype
    return len(casts)


def convert_file(src_dir: Path, dst_dir: Path, dtype: str) -> Path:
    """dst_dir/model.onnx(+_data): src_dir's model with its weights stored in `dtype`, one tensor at a time."""
    model = ir.load(str(Path(src_dir) / onnx_writer.ONNX_NAME))
    convert(model, dtype)
    return onnx_writer.save(model, Path(dst_dir))


def of_info(info: dict) -> str:
    """The weights dtype a tree records (trees written before the field hold fp32)."""
    return info.get("weights_dtype", "fp32")


def require_fp32(info: dict, what: str) -> None:
    """Refuse a tree whose weights are stored in half precision where fp32 weights are read."""
    stored = of_info(info)
    if stored != "fp32":
        raise SourceError(f"{what} needs the fp32 export tree; this tree stores {stored} weights",
                          "re-export with --dtype fp32 (the precision variants convert from fp32 themselves)")
