"""benchmarks/tree_rss.py: the per-stage profile charges each RSS sample to the stage the command was in."""
from __future__ import annotations

import sys

CHILD = r"""
import sys, time
import numpy as np
print("INFO exporters.export: small stage", file=sys.stderr, flush=True)
time.sleep(0.6)
print("INFO onnx_ir.passes: not one of ours", file=sys.stderr, flush=True)
print("INFO exporters.streaming: large stage", file=sys.stderr, flush=True)
held = np.ones(300 << 20, dtype=np.uint8)  # 300 MiB, touched
time.sleep(0.6)
del held
print("INFO exporters.export: after", file=sys.stderr, flush=True)
time.sleep(0.6)
"""


def test_profile_names_the_stage_that_reached_the_peak(load_bench, tmp_path):
    tree_rss = load_bench("tree_rss")
    log = tmp_path / "step.log"
    code, seconds, peak, stages = tree_rss.run_profiled([sys.executable, "-c", CHILD], interval=0.02, log_path=log)
    assert code == 0
    assert [s["stage"] for s in stages] == ["(start)", "small stage", "large stage", "after"]
    by = {s["stage"]: s for s in stages}
    assert by["large stage"]["peak_rss"] == peak
    assert peak - by["small stage"]["peak_rss"] > 250 << 20  # the allocation shows in its own stage only
    assert by["after"]["peak_rss"] < peak - (250 << 20)
    assert abs(sum(s["seconds"] for s in stages) - seconds) < 0.05
    assert "not one of ours" in log.read_text()  # the whole stderr is kept
