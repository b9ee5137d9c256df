"""The fp32-island search on a full-size VAE decoder with a planted fp16 overflow: rounds, time, peak RSS.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/islands_planted.py /tmp/bench/islands \\
        --source sd15-random --size 512

Exports the source's VAE decoder (batch 1, static size; SD 1.5's and SDXL's VAE share the
architecture), scales its first convolution by
--scale so activations leave fp16's range (what SDXL's real VAE decoder does in fp16: NaNs,
black images), shows that plain fp16 then produces non-finite outputs, and runs the island
search in a child process whose peak RSS (process tree, sampled) is recorded.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tree_rss import run_sampled  # noqa: E402
from diffprism.jobs import export_job  # noqa: E402
from exporters import reference  # noqa: E402
from exporters.export import ONNX_DIR, REFERENCE_DIR  # noqa: E402
from exporters.precision import graph, half, islands  # noqa: E402
from exporters.spec import ShapeRequest  # noqa: E402

COMPONENT = "vae_decoder"


def plant(src: Path, dst: Path, scale: float) -> Path:
    """dst/: src with its first Conv's weight and bias multiplied by `scale`."""
    from onnx import numpy_helper

    model = graph.load(src)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    inits = {i.name: i for i in model.graph.initializer}
    for name in conv.input[1:]:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * scale, name))
    return graph.save(model, dst).parent


def feed(out: Path) -> dict:
    cases = reference.load(out / REFERENCE_DIR / f"{COMPONENT}.npz")
    return next(iter(cases.values()))["inputs"]


def search(work: Path) -> None:
    """Child process: the island search on the planted graph; writes report.json."""
    start = time.perf_counter()
    report = islands.fp16_with_islands(work / "planted", work / "fixed", [feed(work / "export")], work / "search",
                                       rel_l2=5e-3)
    facts = {"seconds": round(time.perf_counter() - start, 1), **report.to_json()}
    (work / "report.json").write_text(json.dumps(facts, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--source", default="sd15-random")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--scale", type=float, default=1e5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work
    if args.child:
        search(work)
        return
    out = work / "export"
    if not (out / ONNX_DIR / COMPONENT).is_dir():
        export_job(args.source, out, components=[COMPONENT],
                   shapes=ShapeRequest(batch=(1, 1, 1), image=(args.size, args.size, args.size)))
    planted = plant(out / ONNX_DIR / COMPONENT, work / "planted", args.scale)
    x = [feed(out)]
    (want,) = graph.run(planted / "model.onnx", x)
    assert all(np.isfinite(v).all() for v in want.values()), "the planted fp32 graph itself overflows"
    plain = graph.save(half.to_fp16(graph.load(planted), in_place=True), work / "plain")
    (got,) = graph.run(plain, x)
    bad = {k: float(np.mean(~np.isfinite(v))) for k, v in got.items()}
    print(json.dumps({"plain_fp16_nonfinite_fraction": bad}), flush=True)
    code, seconds, peak = run_sampled([sys.executable, __file__, str(work), "--child"])
    if code:
        sys.exit(f"island search failed (exit {code})")
    facts = json.loads((work / "report.json").read_text())
    (fixed,) = graph.run(work / "fixed" / "model.onnx", x)
    nodes = len(onnx.load(str(planted / "model.onnx"), load_external_data=False).graph.node)
    summary = {"source": args.source, "size": args.size, "nodes": nodes, "kept_fp32": len(facts["kept_fp32"]),
               "rounds": facts["rounds"], "clean": facts["clean"], "search_seconds": facts["seconds"],
               "process_seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2),
               "plain_fp16_nonfinite_fraction": bad,
               "fixed_rel_l2": {k: islands.rel_error(fixed[k], want[k]) for k in want},
               "fp32_weight_bytes": graph.size_bytes(planted)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
