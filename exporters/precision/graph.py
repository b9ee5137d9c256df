"""Load, save and probe ONNX graphs of a tree component (model.onnx + model.onnx_data)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from exporters.onnx_writer import DATA_NAME, ONNX_NAME

log = logging.getLogger(__name__)

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def load(directory: Path) -> onnx.ModelProto:
    """The component graph with its weights in memory."""
    return onnx.load(str(Path(directory) / ONNX_NAME), load_external_data=True)


def save(model: onnx.ModelProto, directory: Path) -> Path:
    """Write directory/model.onnx with weights in one model.onnx_data file (as the exported tree does).

    Consumes `model`: the weights are moved out of the proto while saving.
    """
    sort_nodes(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ONNX_NAME
    for stale in (path, directory / DATA_NAME):
        stale.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)
    onnx.checker.check_model(str(path))
    return path


def sort_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Order nodes topologically in place (graph rewriters append Casts at the end; ONNX requires order)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {rest[0].name}")
        pending = rest
    nodes = [onnx.NodeProto() for _ in ordered]
    for new, old in zip(nodes, ordered):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("model.onnx*"))


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(path: Path, feeds: Sequence[Mapping[str, np.ndarray]], threads: int = 0) -> list[dict[str, np.ndarray]]:
    """Run a graph on fp32 feeds, casting each input to the graph's declared type."""
    sess = session(path, threads)
    types = {i.name: _NP.get(i.type) for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    results = []
    for feed in feeds:
        cast = {k: v.astype(types[k]) if types.get(k) is not None else v for k, v in feed.items() if k in types}
        results.append(dict(zip(names, sess.run(None, cast))))
    return results


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def float_values(model: onnx.ModelProto) -> dict[str, int]:
    """name -> element type of every float value the graph's nodes produce (from its value_info)."""
    produced = {o for node in model.graph.node for o in node.output}
    infos = (*model.graph.value_info, *model.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in infos
            if v.name in produced and v.type.tensor_type.elem_type in FLOAT_TYPES}


PROBE_BUDGET = 2 << 30  # bytes of exposed intermediates held per probe run (all feeds together)


def probe(directory: Path, parts: Sequence[Sequence[str]], feeds: Sequence[Mapping[str, np.ndarray]],
          workdir: Path) -> Iterator[list[dict[str, np.ndarray]]]:
    """For each part (a list of value names, see `chunks`), the values of those intermediates on
    every feed (one dict per feed), from the graph saved in `directory`. Values are exposed as
    graph outputs a part at a time, so a caller that consumes the iterator lazily holds one part's
    values. The weights stay on disk: each part is a small graph file beside a link to the
    directory's data file, and ONNX Runtime maps them from there. `directory` is not modified.
    """
    directory = Path(directory)
    base = onnx.load(str(directory / ONNX_NAME), load_external_data=False)
    types = {v.name: v for v in (*base.graph.value_info, *base.graph.output)}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for location in _data_files(base):
            _link(directory / location, Path(tmp) / location)
        for part in parts:
            del base.graph.output[:]
            base.graph.output.extend(types[n] for n in part)
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(base, str(path))
            yield run(path, feeds)


def _data_files(model: onnx.ModelProto) -> set[str]:
    """The external data files the graph's initializers point to (relative to its folder)."""
    return {entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"}


def _link(src: Path, dst: Path) -> None:
    """A hard link (no copy on one filesystem), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def chunks(model: onnx.ModelProto, names: Sequence[str], copies: int, chunk: int = 256,
           budget: int = PROBE_BUDGET) -> list[list[str]]:
    """`names` in order, split for `probe` so each part has <= chunk names and, where value_info
    gives static shapes, <= budget bytes over `copies` feeds (a UNet's attention scores are ~1 GB
    each at 512 px). Values of unknown size count as budget / chunk; one over the budget goes alone."""
    infos = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    parts: list[list[str]] = []
    part: list[str] = []
    held = 0
    for name in names:
        size = value_bytes(infos.get(name))
        size = budget // chunk if size is None else size * copies
        if part and (len(part) == chunk or held + size > budget):
            parts.append(part)
            part, held = [], 0
        part.append(name)
        held += size
    if part:
        parts.append(part)
    return parts


def value_bytes(info: onnx.ValueInfoProto | None) -> int | None:
    """Bytes of a value with a fully static shape, else None."""
    if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    count = 1
    for dim in info.type.tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        count *= dim.dim_value
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).itemsize
    return count * itemsize
