"""Half-precision variants of an fp32 graph: fp16 (compute in fp16) and bf16 (bf16 weights, fp32 compute).

fp16 uses ONNX Runtime's float16 converter; nodes in `block` stay fp32 (the islands found
by exporters.precision.islands). ONNX Runtime's CPU provider has almost no bf16 compute
kernels, so the bf16 variant stores weights as bf16 (half the size) and casts them to
fp32 when the session loads; the arithmetic is fp32, the rounding is bf16's.
"""
from __future__ import annotations

import logging
from typing import Iterable

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

MIN_BF16_ELEMENTS = 16  # shape constants and scalars stay fp32


def to_fp16(model: onnx.ModelProto, *, block: Iterable[str] = (), keep_io_types: bool = True,
            in_place: bool = False) -> onnx.ModelProto:
    """An fp16 copy of `model` (or `model` itself, converted, with in_place: no second copy of the
    weights); nodes named in `block` keep fp32 compute, with Casts around them."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = set(block)
    target = model
    if not in_place:
        target = onnx.ModelProto()
        target.CopyFrom(model)
    if block:
        _split_shared_weights(target.graph, block)
    # The exporter's value_info already types every value; onnx shape inference would fail
    # on graphs over 2 GB, so the converter works from what the graph declares.
    converted = convert_float_to_float16(target, keep_io_types=keep_io_types, node_block_list=sorted(block),
                                         disable_shape_infer=True)
    # The converter keeps some op types fp32 by default (Resize, Range, ...), so Casts around fp32
    # nodes appear even with an empty block list: repair them always.
    _join_islands(converted.graph)
    return converted


def _split_shared_weights(graph: onnx.GraphProto, block: set[str]) -> None:
    """Give kept-fp32 nodes their own copy of weights they share with fp16 nodes.

    The converter turns a shared weight to fp16 and casts it back for the fp32 node,
    which would clamp values beyond fp16's range inside an island.
    """
    inits = {i.name: i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    users: dict[str, set[bool]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                users.setdefault(name, set()).add(node.name in block)
    shared = {name for name, kinds in users.items() if kinds == {True, False}}
    for name in shared:
        twin = onnx.TensorProto()
        twin.CopyFrom(inits[name])
        twin.name = f"{name}.fp32"
        graph.initializer.append(twin)
    for node in graph.node:
        if node.name in block:
            for i, name in enumerate(node.input):
                if name in shared:
                    node.input[i] = f"{name}.fp32"


def _join_islands(graph: onnx.GraphProto) -> None:
    """Repair what the converter leaves between kept-fp32 nodes.

    It casts every fp32 node output to fp16 and back before the next fp32 node (so an
    overflowing value would still pass through fp16), and it emits one identical Cast per
    reader of a shared value (breaking single assignment). Here fp32 nodes read each
    other's fp32 outputs directly, and duplicate Casts are dropped.
    """
    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or not node.name.endswith("_cast_to_fp32_node"):
            continue
        up = producer.get(node.input[0])
        if up is not None and up.op_type == "Cast" and up.name.endswith("_cast_to_fp16_node"):
            rename[node.output[0]] = up.input[0]  # the fp32 value before the round trip
    seen: set[str] = set()
    keep = []
    for node in graph.node:
        if node.op_type == "Cast" and (node.output[0] in rename or node.output[0] in seen):
            continue
        seen.update(node.output)
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        keep.append(node)
    nodes = [onnx.NodeProto() for _ in keep]
    for new, old in zip(nodes, keep):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)
    infos, names = [], set()
    for info in graph.value_info:
        if info.name not in names and info.name not in rename:
            names.add(info.name)
            infos.append(info)
    del graph.value_info[:]
    graph.value_info.extend(infos)


def to_bf16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy storing every large fp32 initializer as bf16, cast back to fp32 by a node in the graph."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_BF16_ELEMENTS:
            continue
        name = init.name
        weights = numpy_helper.to_array(init).astype(ml_dtypes.bfloat16)
        init.CopyFrom(numpy_helper.from_array(weights, f"{name}.bf16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}.bf16"], [name], to=onnx.TensorProto.FLOAT,
                                           name=f"{name}.to_fp32"))
    for node in reversed(casts):
        graph.node.insert(0, node)
    log.info("bf16: %d initializers stored as bf16", len(casts))
    return copy
