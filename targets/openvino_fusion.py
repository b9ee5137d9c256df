"""Graph rewrites that give OpenVINO the fused ops its own frontends would have produced.

A GroupNorm exported through ONNX arrives as Reshape(x, [N, G, -1]) -> InstanceNormalization ->
Reshape(back to x's shape) -> Mul(gamma) -> Add(beta); OpenVINO's ONNX frontend turns the middle
into MVN, so the IR keeps the reshapes and their shape arithmetic. OpenVINO's PyTorch frontend
(optimum-intel's route) emits one GroupNormalization instead, which the CPU plugin runs as a
single kernel: on sd15-random the unfused UNet's first inference took 6.0 s against 2.9 s
(docs/benchmarks.md, #18). `fuse_group_norms` rewrites the chain into that op.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def fuse_group_norms(model) -> int:
    """Replace each Reshape -> MVN -> Reshape group norm (and the per-channel Multiply/Add after it)
    by one GroupNormalization; returns how many were fused. Anything that does not match exactly
    (another axis, eps outside the root, a batch-coupled reshape) is left as it is."""
    fused = 0
    for mvn in model.get_ordered_ops():
        if mvn.get_type_name() != "MVN":
            continue
        match = _group_norm(mvn)
        if match is None:
            continue
        x, groups, eps, tail = match
        scale, bias, end = _affine(tail, x.get_partial_shape()[1].get_length())
        _replace(end, x, scale, bias, groups, eps)
        fused += 1
    if fused:
        model.validate_nodes_and_infer_types()
    log.debug("openvino: %d group norm(s) fused into GroupNormalization", fused)
    return fused


def _group_norm(mvn):
    """(x, groups, eps, the Reshape back) when `mvn` normalises the groups of x, else None."""
    attrs = mvn.get_attributes()
    if not attrs.get("normalize_variance") or attrs.get("eps_mode", "").upper() != "INSIDE_SQRT":
        return None
    if len(mvn.inputs()) < 2 or (axes := _constant(mvn.input_value(1))) is None or list(axes.ravel()) not in ([2], [-1]):
        return None
    split = mvn.input_value(0).get_node()
    if split.get_type_name() != "Reshape" or len(split.output(0).get_target_inputs()) != 1:
        return None
    x = split.input_value(0)
    shape, pattern = x.get_partial_shape(), _constant(split.input_value(1))
    if shape.rank.is_dynamic or shape.rank.get_length() < 3 or shape[1].is_dynamic or pattern is None:
        return None
    channels, pattern = shape[1].get_length(), [int(v) for v in pattern.ravel()]
    if len(pattern) != 3 or pattern[2] != -1 or pattern[1] <= 0 or channels % pattern[1]:
        return None
    same_batch = (pattern[0] == 0 and split.get_attributes().get("special_zero")) or \
        (shape[0].is_static and pattern[0] == shape[0].get_length())
    if not same_batch:
        return None
    targets = list(mvn.output(0).get_target_inputs())
    if len(targets) != 1 or (back := targets[0].get_node()).get_type_name() != "Reshape":
        return None
    if not _restores(back, x):
        return None
    return x, pattern[1], float(attrs["eps"]), back


def _restores(back, x) -> bool:
    """Whether Reshape `back` gives its input x's shape: ShapeOf(x), or a constant that names x's
    batch (0 or itself), its channels and its static dims, with at most one -1."""
    restore = back.input_value(1)
    if restore.get_node().get_type_name() == "ShapeOf":
        return restore.get_node().input_value(0) == x
    shape, target = x.get_partial_shape(), _constant(restore)
    if target is None or len(target.ravel()) != shape.rank.get_length():
        return False
    target = [int(v) for v in target.ravel()]
    zero = bool(back.get_attributes().get("special_zero"))
    if not ((target[0] == 0 and zero) or (shape[0].is_static and target[0] == shape[0].get_length())):
        return False
    if target[1] != shape[1].get_length():
        return False
    rest = list(zip(target[2:], shape[2:]))
    unknown = sum(1 for t, _ in rest if t == -1)
    return unknown <= 1 and all(t == -1 or (d.is_static and t == d.get_length()) for t, d in rest)


def _affine(node, channels: int):
    """The per-channel (gamma, beta) a Multiply/Add after `node` applies, folded; and the last node folded."""
    import numpy as np

    scale, bias, end = np.ones(channels, np.float32), np.zeros(channels, np.float32), node
    for kind in ("Multiply", "Add"):
        targets = list(end.output(0).get_target_inputs())
        if len(targets) != 1 or (op := targets[0].get_node()).get_type_name() != kind:
            break
        other = op.input_value(1 - targets[0].get_index())
        values = _per_channel(_constant(other), channels, end.get_output_partial_shape(0).rank.get_length())
        if values is None:
            break
        if kind == "Multiply":
            scale, bias = scale * values, bias * values
        else:
            bias = bias + values
        end = op
    return scale, bias, end


def _per_channel(values, channels: int, rank: int):
    """`values` as a [C] vector if it broadcasts along dim 1 of a rank-`rank` tensor only, else None."""
    import numpy as np

    if values is None or values.ndim > rank or values.size != channels:
        return None
    full = values.reshape((1,) * (rank - values.ndim) + values.shape)
    if channels > 1 and full.shape[1] != channels:
        return None
    return np.asarray(full, np.float32).reshape(channels)


def _replace(end, x, scale, bias, groups: int, eps: float) -> None:
    import openvino as ov
    import openvino.opset12 as ops

    def weights(values):
        const = ops.constant(values)
        return const if x.get_element_type() == ov.Type.f32 else ops.convert(const, x.get_element_type())

    gn = ops.group_normalization(x, weights(scale), weights(bias), groups, eps)
    gn.set_friendly_name(end.get_friendly_name())
    end.output(0).replace(gn.output(0))


def _constant(value):
    """The data behind a Constant (possibly through a Convert), else None."""
    node = value.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None
