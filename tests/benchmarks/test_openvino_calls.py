"""benchmarks/openvino_calls.py: times each IR in its own process, fills dynamic inputs from --shape."""
from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _save(tmp_path, static: bool):
    import numpy as np
    import openvino as ov
    import openvino.opset12 as ops

    shape = [2, 4, 8, 8] if static else [-1, 4, -1, -1]
    x = ops.parameter(ov.PartialShape(shape), ov.Type.f32, name="sample")
    x.output(0).get_tensor().set_names({"sample"})
    gn = ops.group_normalization(x, ops.constant(np.ones(4, np.float32)), ops.constant(np.zeros(4, np.float32)), 2, 1e-5)
    path = tmp_path / ("static.xml" if static else "dynamic.xml")
    ov.save_model(ov.Model([gn], [x]), str(path))
    return path


def test_each_ir_timed_with_its_ops(tmp_path):
    static, dynamic = _save(tmp_path, True), _save(tmp_path, False)
    out = subprocess.run([sys.executable, str(BENCH / "openvino_calls.py"), str(static), str(dynamic),
                          "--shape", "sample=1,4,6,6", "--calls", "2"], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["xml"] for r in rows] == [str(static), str(dynamic)]
    for row in rows:
        assert row["ops"]["GroupNormalization"] == 1 and row["ops"]["MVN"] == 0
        assert row["compile_s"] > 0 and row["first_call_s"] > 0 and row["later_call_median_s"] > 0


def test_dynamic_input_without_a_shape_names_the_option(tmp_path):
    dynamic = _save(tmp_path, False)
    out = subprocess.run([sys.executable, str(BENCH / "openvino_calls.py"), str(dynamic)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "--shape sample=" in out.stderr
