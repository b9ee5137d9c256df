"""Per-step memory estimates, checked before a step starts (never an OOM kill mid-write).

An estimate is the bytes a step reads times a factor for what that step holds at once (docs/design.md,
"Flux-size in bounded memory"; derived from the step's code), plus a fixed overhead for the
interpreter, torch and the graph. Measured on flux-random's transformer (docs/benchmarks.md): the
streamed write stays under its estimate (1.31 GB against 1.75 GB); the streamed references reach
3.96-5.02 GB against 1.53 GB, so that factor is known to be low and is not yet explained.
The budget is `--memory-budget` / DIFFPRISM_MEMORY_BUDGET if set, else psutil's available memory.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from exporters.errors import DiffprismError, UsageError, EXIT_BAD_INPUT

log = logging.getLogger(__name__)

ENV = "DIFFPRISM_MEMORY_BUDGET"
OVERHEAD = 1 << 30  # interpreter, torch, onnx and the graph protobuf of a full-size DiT

# What each step holds, as a multiple of the bytes named in `basis`.
FACTORS = {
    # basis: the largest tensor. Materialise draws and writes one tensor at a time.
    "materialise": ("largest tensor", 1.0),
    # basis: the largest tensor. The streamed export holds one source tensor, its converted copy
    # and the contiguous view written to the data file.
    "streamed export": ("largest tensor (fp32)", 3.0),
    # basis: all weights (fp32). The plain export holds the module, the traced program's constants
    # and the ONNX initializers.
    "plain export": ("weights (fp32)", 3.0),
    # basis: the largest tensor (fp32). Streamed references read one layer's weights per forward.
    "streamed reference": ("largest tensor (fp32)", 2.0),
    # basis: the ONNX weights file. OpenVINO reads the ONNX model, builds the IR's constants
    # (compressed ones stay compressed) and writes them.
    "openvino compile": ("ONNX weights", 2.0),
    # basis: the ONNX weights file. NNCF's weight compression holds the fp model and int8 copies.
    "openvino int8 weights": ("ONNX weights", 2.5),
}


class MemoryBudgetError(DiffprismError):
    """A step would need more memory than it may use; raised before the step starts."""

    exit_code = EXIT_BAD_INPUT


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'24G', '512M', '1.5g', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise UsageError(f"cannot read memory size '{text}'", "write e.g. 24G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def budget(override: str | int | None = None) -> tuple[int, str]:
    """(bytes, where the figure comes from)."""
    if override is not None:
        return (override if isinstance(override, int) else parse_bytes(override)), "--memory-budget"
    if os.environ.get(ENV):
        return parse_bytes(os.environ[ENV]), ENV
    import psutil

    return int(psutil.virtual_memory().available), "available memory"


@dataclass(frozen=True)
class Estimate:
    step: str
    basis_bytes: int

    @property
    def bytes(self) -> int:
        _, factor = FACTORS[self.step]
        return int(self.basis_bytes * factor) + OVERHEAD


def _gb(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check(step: str, basis_bytes: int, *, fix: str, override: str | int | None = None) -> Estimate:
    """Raise MemoryBudgetError if `step` would not fit; `fix` names the option that avoids it."""
    est = Estimate(step, basis_bytes)
    have, where = budget(override)
    basis, factor = FACTORS[step]
    log.debug("%s: needs ~%s (%s %s x %.1f + %s), %s %s", step, _gb(est.bytes), basis, _gb(basis_bytes), factor,
              _gb(OVERHEAD), where, _gb(have))
    if est.bytes > have:
        raise MemoryBudgetError(
            f"{step} needs about {_gb(est.bytes)} of memory ({basis} {_gb(basis_bytes)} x {factor:g} "
            f"+ {_gb(OVERHEAD)}), more than the {_gb(have)} of {where}", fix)
    return est
