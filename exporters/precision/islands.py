"""Automatic fp32 islands: keep in fp32 exactly the nodes that overflow or diverge in fp16.

The fp32 graph and its fp16 conversion run side by side on real inputs with every
intermediate exposed. A node is kept in fp32 when
  - its fp32 output leaves the fp16 range (|x| > 65504): the node and its consumers, or
  - it introduces the error: its output is non-finite or off by more than `rel_l2`
    while its inputs are several times closer (the error starts at this node).
The conversion repeats with the growing block list until the graph outputs are finite
and within `rel_l2`; nothing is hand-listed per model.
"""
from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from exporters.errors import ExportError
from exporters.onnx_writer import ONNX_NAME
from exporters.precision import graph, half

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
LOCAL_FACTOR = 4.0  # a node "introduces" error when its output is this many times worse than its inputs


@dataclass
class IslandReport:
    kept_fp32: list[str] = field(default_factory=list)  # node names
    overflowing: list[str] = field(default_factory=list)  # values whose fp32 magnitude exceeds fp16's range
    rounds: int = 0
    clean: bool = False
    output_rel_l2: dict[str, float] = field(default_factory=dict)
    first_round_rel_l2: dict[str, float] = field(default_factory=dict)  # plain fp16, before any island

    def to_json(self) -> dict:
        return {"kept_fp32": self.kept_fp32, "overflowing": self.overflowing[:50], "rounds": self.rounds,
                "clean": self.clean, "output_rel_l2": self.output_rel_l2,
                "plain_fp16_rel_l2": self.first_round_rel_l2}


def rel_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Relative L2 error; inf when the candidate has Inf/NaN the reference has not."""
    c = candidate.astype(np.float64)
    r = reference.astype(np.float64)
    if not np.isfinite(c).all():
        return float("inf") if np.isfinite(r).all() else 0.0
    floor = 1e-6 * np.sqrt(max(r.size, 1))  # near-zero tensors: judge absolute error instead
    return float(np.linalg.norm(c - r) / max(np.linalg.norm(r), floor))


def fp16_with_islands(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]], workdir: Path, *,
                      rel_l2: float = 1e-2, keep_io_types: bool = True, max_rounds: int = 8,
                      chunk: int = 256) -> IslandReport:
    """Write dst/{model.onnx, model.onnx_data}: the fp16 graph of src/ with the fp32 islands it needs.

    Works from files so a full-size model is never held twice: each round loads the weights
    only to convert them and saves the candidate, and ONNX Runtime reads both graphs from disk.
    """
    if not feeds:
        raise ExportError("fp32 island search needs at least one input feed", "capture calibration data or export references")
    src, dst, workdir = Path(src), Path(dst), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src / ONNX_NAME), load_external_data=False)  # the structure; weights stay on disk
    values = graph.float_values(model)
    names = sorted(values)
    producer = {out: node.name for node in model.graph.node for out in node.output}
    inputs_of = {node.name: [i for i in node.input if i in values] for node in model.graph.node}
    consumers = defaultdict(set)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].add(node.name)
    outputs = [o.name for o in model.graph.output]
    report = IslandReport()
    block: set[str] = set()
    ref_cache: tuple | None = None  # (parts, fp32 values) when one part holds every value
    candidate = None
    for round_no in range(1, max_rounds + 1):
        if candidate is not None:
            shutil.rmtree(candidate)
        candidate = _convert(src, workdir / f"round{round_no}", block, keep_io_types)
        if round_no == 1:  # most graphs convert cleanly: compare the outputs before probing every value
            ref_out, got_out = (graph.run(d / ONNX_NAME, feeds) for d in (src, candidate))
            report.first_round_rel_l2 = {o: max(rel_error(g[o], r[o]) for r, g in zip(ref_out, got_out))
                                         for o in outputs}
            del ref_out, got_out
            if all(e <= rel_l2 for e in report.first_round_rel_l2.values()):
                report.rounds, report.clean = 1, True
                report.output_rel_l2 = dict(report.first_round_rel_l2)
                _move(candidate, dst)
                return report
        converted = onnx.load(str(candidate / ONNX_NAME), load_external_data=False)
        present = set(graph.float_values(converted)) | {o.name for o in converted.graph.output}
        del converted
        measured = [n for n in names if n in present]
        errors: dict[str, float] = {}
        peak: dict[str, float] = {}
        # Sized on the fp32 graph (its values are the larger); both sides are consumed part by part,
        # so one part's values are held at a time.
        parts = graph.chunks(model, measured, len(feeds), chunk)
        if len(parts) == 1:  # everything fits at once: keep the fp32 side for the next rounds
            if ref_cache is None or ref_cache[0] != parts:
                ref_cache = (parts, list(graph.probe(src, parts, feeds, workdir)))
            ref_parts = iter(ref_cache[1])
        else:
            ref_parts = graph.probe(src, parts, feeds, workdir)
        for ref_runs, half_runs in zip(ref_parts, graph.probe(candidate, parts, feeds, workdir)):
            for ref, got in zip(ref_runs, half_runs):
                for name, r in ref.items():
                    if name in got:
                        errors[name] = max(errors.get(name, 0.0), rel_error(got[name], r))
                    finite = r[np.isfinite(r)]
                    peak[name] = max(peak.get(name, 0.0), float(np.abs(finite).max()) if finite.size else 0.0)
        report.rounds = round_no
        report.output_rel_l2 = {o: errors.get(o, float("nan")) for o in outputs}
        new = set()
        overflow = [n for n, p in peak.items() if p > FP16_MAX]
        report.overflowing = sorted(set(report.overflowing) | set(overflow))
        for name in overflow:  # the value cannot exist in fp16: producer and readers stay fp32
            new |= {producer[name], *consumers[name]}
        for name, err in errors.items():
            upstream = max((errors.get(i, 0.0) for i in inputs_of.get(producer.get(name, ""), [])), default=0.0)
            if err > rel_l2 and err > LOCAL_FACTOR * upstream:
                new.add(producer[name])
        new = {n for n in new if n in inputs_of} - block
        done = all(report.output_rel_l2[o] <= rel_l2 for o in outputs)
        if done and not new:
            report.clean = True
            break
        if not new:  # error grows gradually: keep the node that worsens it most
            ratio = {producer[n]: e / max(max((errors.get(i, 0.0) for i in inputs_of[producer[n]]), default=0.0), 1e-6)
                     for n, e in errors.items() if producer.get(n) in inputs_of and producer[n] not in block}
            if not ratio:
                break
            new = {max(ratio, key=ratio.get)}
        log.info("fp16 islands round %d: %d node(s) kept in fp32 (+%d), outputs %s", round_no, len(block) + len(new),
                 len(new), report.output_rel_l2)
        block |= new
    else:  # out of rounds: the last block list has not been converted yet
        shutil.rmtree(candidate)
        candidate = _convert(src, workdir / "final", block, keep_io_types)
    _move(candidate, dst)
    report.kept_fp32 = sorted(block)
    if not report.clean:
        worst = max(report.output_rel_l2.values())
        if not np.isfinite(worst):
            raise ExportError(f"fp16 graph still produces Inf/NaN after keeping {len(block)} node(s) in fp32",
                              "use precision fp32 for this component (policy option)")
        log.warning("fp16 islands: outputs still off by rel_l2 %.3g after %d rounds", worst, report.rounds)
    return report


def _convert(src: Path, dst: Path, block: set[str], keep_io_types: bool) -> Path:
    """dst/: src converted to fp16 with `block` kept in fp32 (the only place the weights are loaded)."""
    return graph.save(half.to_fp16(graph.load(src), block=block, keep_io_types=keep_io_types, in_place=True), dst).parent


def _move(candidate: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in candidate.glob("model.onnx*"):
        shutil.move(path, dst / path.name)
    shutil.rmtree(candidate)
