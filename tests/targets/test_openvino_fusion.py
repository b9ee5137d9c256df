"""Group norm fusion on OpenVINO graphs: what it rewrites, what it leaves, and that outputs do not change."""
from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'diffprism[openvino]')")
import openvino.opset13 as ops  # noqa: E402

from targets.openvino_fusion import fuse_group_norms  # noqa: E402


def _counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.get_ops():
        counts[op.get_type_name()] = counts.get(op.get_type_name(), 0) + 1
    return counts


def _run(model, x: np.ndarray) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[0]


@pytest.fixture(scope="module")
def group_norm_onnx(tmp_path_factory):
    """Conv -> GroupNorm (trained-looking gamma/beta) -> SiLU, exported as diffprism's exporter does (dynamo)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.norm = torch.nn.GroupNorm(4, 8)
            torch.nn.init.normal_(self.norm.weight)
            torch.nn.init.normal_(self.norm.bias)

        def forward(self, x):
            return torch.nn.functional.silu(self.norm(self.conv(x)))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fusion") / "block.onnx"
    dims = {0: torch.export.Dim("batch", max=4), 2: torch.export.Dim("h", max=64), 3: torch.export.Dim("w", max=64)}
    torch.onnx.export(Block().eval(), (torch.randn(1, 4, 8, 8),), str(path), dynamo=True,
                      input_names=["x"], dynamic_shapes={"x": dims})
    return path


def test_exported_group_norm_with_affine_becomes_one_op(group_norm_onnx):
    plain, fused = ov.convert_model(group_norm_onnx), ov.convert_model(group_norm_onnx)
    before = _counts(plain)
    assert before.get("MVN") == 1 and before.get("GroupNormalization", 0) == 0  # the form the frontend gives
    assert fuse_group_norms(fused) == 1
    after = _counts(fused)
    assert after.get("GroupNormalization") == 1 and after.get("MVN", 0) == 0
    assert after.get("Multiply", 0) == before["Multiply"] - 1 and after.get("Add", 0) < before["Add"]  # gamma, beta folded
    rng = np.random.default_rng(0)
    for shape in ((1, 4, 8, 8), (3, 4, 16, 24)):  # the dynamic dims still work
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(_run(fused, x), _run(plain, x), atol=1e-5, rtol=1e-5)


def _hand_built(pattern: list[int], special_zero: bool, eps_mode: str):
    x = ops.parameter([2, 8, 4, 4], ov.Type.f32, name="x")
    split = ops.reshape(x, ops.constant(np.array(pattern, np.int64)), special_zero)
    norm = ops.mvn(split, ops.constant(np.array([2], np.int64)), True, 1e-5, eps_mode)
    back = ops.reshape(norm, ops.shape_of(x), False)
    return ov.Model([back], [x])


def test_only_true_group_norms_are_rewritten():
    x = np.random.default_rng(1).standard_normal((2, 8, 4, 4)).astype(np.float32)
    model = _hand_built([0, 4, -1], True, "inside_sqrt")
    expected = _run(_hand_built([0, 4, -1], True, "inside_sqrt"), x)
    assert fuse_group_norms(model) == 1
    np.testing.assert_allclose(_run(model, x), expected, atol=1e-5, rtol=1e-5)
    # Statistics across the batch, or eps outside the root, are other computations: left as they are.
    for pattern, zero, mode in (([1, 4, -1], False, "inside_sqrt"), ([0, 4, -1], True, "outside_sqrt")):
        model = _hand_built(pattern, zero, mode)
        assert fuse_group_norms(model) == 0, (pattern, mode)
        assert _counts(model).get("MVN") == 1
