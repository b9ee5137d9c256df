"""Tolerances per precision, with per-component overrides.

The bounds are documented in README.md ("Validation tolerances"); a comparison passes
only if every bound that is set holds for every output.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from exporters.errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float | None = None  # upper bound
    cosine: float | None = None  # lower bound
    max_abs: float | None = None  # upper bound

    def violations(self, metrics: Mapping[str, float]) -> list[str]:
        bad = []
        if self.rel_l2 is not None and not metrics["rel_l2"] <= self.rel_l2:
            bad.append(f"rel_l2 {metrics['rel_l2']:.3g} > {self.rel_l2:.3g}")
        if self.cosine is not None and not metrics["cosine"] >= self.cosine:
            bad.append(f"cosine {metrics['cosine']:.6f} < {self.cosine}")
        if self.max_abs is not None and not metrics["max_abs"] <= self.max_abs:
            bad.append(f"max_abs {metrics['max_abs']:.3g} > {self.max_abs:.3g}")
        return bad

    def to_json(self) -> dict:
        return {k: v for k, v in (("rel_l2", self.rel_l2), ("cosine", self.cosine), ("max_abs", self.max_abs)) if v is not None}


# fp32: same math, different kernels. fp16/bf16: ~3 and ~2 decimal digits. Quantized
# variants are judged by direction (cosine) and a loose relative error.
DEFAULTS: dict[str, Tolerance] = {
    "fp32": Tolerance(rel_l2=1e-4, cosine=0.99999),
    "fp16": Tolerance(rel_l2=1e-2, cosine=0.9995),
    "bf16": Tolerance(rel_l2=3e-2, cosine=0.999),
    "int8": Tolerance(rel_l2=0.2, cosine=0.98),
    "int8-dynamic": Tolerance(rel_l2=0.2, cosine=0.98),
    "int4": Tolerance(rel_l2=0.3, cosine=0.95),
    # pruned: a different (smaller) model distilled towards the original, not a re-encoding of it.
    # The bound only says the output still points the original's way; the build records the
    # distillation error and the export's own fidelity (ONNX vs the pruned torch model).
    "pruned": Tolerance(cosine=0.5),
    # qat: fake-quantized int8 trained towards the original: held to the int8 bounds.
    "qat": Tolerance(rel_l2=0.2, cosine=0.98),
}


@dataclass(frozen=True)
class Policy:
    defaults: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULTS))
    overrides: Mapping[tuple[str, str], Tolerance] = field(default_factory=dict)  # (precision, component)

    def tolerance(self, precision: str, component: str) -> Tolerance:
        if (precision, component) in self.overrides:
            return self.overrides[(precision, component)]
        if precision not in self.defaults:
            raise UsageError(f"no tolerance for precision '{precision}'", f"known: {', '.join(self.defaults)}")
        return self.defaults[precision]

    def with_override(self, precision: str, component: str, **bounds: float) -> "Policy":
        base = self.tolerance(precision, component)
        overrides = dict(self.overrides)
        overrides[(precision, component)] = replace(base, **bounds)
        return Policy(self.defaults, overrides)
