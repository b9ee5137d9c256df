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
INDEX_CHAIN_LIMIT = 64  # nodes an index computation may span (T5's relative-position buckets take 5)
# Ops a position or phase computation is made of (no layer: nothing that reads weights).
_POSITION_OPS = {"Cast", "Constant", "ConstantOfShape", "Range", "Shape", "Unsqueeze", "Squeeze", "Reshape", "Expand",
                 "Concat", "Slice", "Transpose", "Flatten", "Tile", "Where", "Add", "Sub", "Mul", "Div", "Neg", "Abs",
                 "Log", "Exp", "Pow", "Sqrt", "Floor", "Ceil", "Min", "Max", "Sin", "Cos"}
_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                  onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def to_fp16(model: onnx.ModelProto, *, block: Iterable[str] = (), keep_io_types: bool = True,
            in_place: bool = False) -> onnx.ModelProto:
    """An fp16 copy of `model` (or `model` itself, converted, with in_place: no second copy of the
    weights); nodes named in `block` keep fp32 compute, with Casts around them."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = set(block) | index_arithmetic(model.graph)
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


def index_arithmetic(graph: onnx.GraphProto) -> set[str]:
    """Nodes of float arithmetic on positions and indices: they must stay fp32.

    Two kinds, found by structure:
    - integer indices computed in float: T5's relative-position buckets are integer positions
      cast to float, divided, logged, scaled and cast back to int64; in fp16 a value such as
      log(8/2)/log(16/2)*2 = 1.0 lands at 0.9995 and truncates to the neighbouring bucket, so
      the attention bias reads the wrong row (no island on float activations repairs that);
    - phases of sinusoidal embeddings: a timestep x 1000 or a rotary position times its
      frequency is already off by 0.5 rad at 1000 in fp16, before Sin/Cos.
    Each float->integer Cast, Sin and Cos is followed upstream through elementwise and shape
    ops to graph inputs, integer values and constants; a chain that meets a layer (MatMul,
    Conv, a Gather of an embedding table, ...) is part of the network's float data flow and
    left to the island search.
    """
    producer = {o: n for n in graph.node for o in n.output}
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    constants = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    found: set[str] = set()
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        to_index = node.op_type == "Cast" and to in _INTEGER_TYPES and types.get(node.input[0]) not in _INTEGER_TYPES
        if not (to_index or node.op_type in ("Sin", "Cos")):
            continue
        chain, stack, ok = {node.name}, list(node.input), True
        while stack and ok:
            name = stack.pop()
            if name == "" or name in constants or types.get(name) in _INTEGER_TYPES:
                continue
            up = producer.get(name)
            if up is None or up.op_type not in _POSITION_OPS:
                ok = False
            elif up.name not in chain:
                chain.add(up.name)
                stack.extend(up.input)
                ok = len(chain) <= INDEX_CHAIN_LIMIT
        if ok:
            found |= chain
    if found:
        log.debug("fp16: %d node(s) of index and phase arithmetic kept in fp32", len(found))
    return found


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
        # keep_io_types' cast of an fp32 graph input is a round trip too: a timestep rounded to fp16
        # is off by 0.5 at 1000, before the fp32 phase arithmetic reads it
        if up is not None and up.op_type == "Cast" and (up.name.endswith("_cast_to_fp16_node")
                                                        or up.name.startswith("graph_input_cast")):
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
    # Frequency tables of sinusoidal embeddings are constants too: rounded to bf16 they shift
    # the phases (a timestep x 1000 times a frequency off by 2^-9 is off by 2 rad), so
    # constants read only by position arithmetic keep fp32.
    positional = index_arithmetic(graph)
    readers: dict[str, set[bool]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name in positional)
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_BF16_ELEMENTS:
            continue
        if readers.get(init.name) == {True}:
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
