"""Tolerances per precision, for component and image checks, in one table; per-component overrides.

The bounds are documented in README.md ("Validation tolerances"); a comparison passes
only if every bound that is set holds for every output.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

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


@dataclass(frozen=True)
class ImageTolerance:
    latent_rel_l2: float  # upper bound
    psnr: float  # lower bound, dB, on images in [0, 1]
    ssim: float  # lower bound

    def violations(self, metrics: Mapping[str, float]) -> list[str]:
        bad = []
        if not metrics["latent_rel_l2"] <= self.latent_rel_l2:
            bad.append(f"latent rel_l2 {metrics['latent_rel_l2']:.3g} > {self.latent_rel_l2:.3g}")
        if not metrics["psnr"] >= self.psnr:
            bad.append(f"PSNR {metrics['psnr']:.1f} dB < {self.psnr:.1f}")
        if not metrics["ssim"] >= self.ssim:
            bad.append(f"SSIM {metrics['ssim']:.4f} < {self.ssim}")
        return bad

    def to_json(self) -> dict[str, float]:
        return {"latent_rel_l2": self.latent_rel_l2, "psnr": self.psnr, "ssim": self.ssim}


@dataclass(frozen=True)
class Row:
    component: Tolerance  # one component's outputs against its PyTorch reference
    image: ImageTolerance  # the final latents and image of a whole pipeline (errors compound: looser)


# The one tolerance table: every precision a target can build (a target maps a variant to its row,
# Target.tolerance_row), ordered from strictest to loosest (a mix is judged by its loosest row).
# fp32: same math, different kernels. fp16/bf16: ~3 and ~2 decimal digits, visually identical images.
# Quantized variants are judged by direction (cosine) and a loose relative error; same composition.
TABLE: dict[str, Row] = {
    "fp32": Row(Tolerance(rel_l2=1e-4, cosine=0.99999), ImageTolerance(latent_rel_l2=1e-3, psnr=45.0, ssim=0.995)),
    "fp16": Row(Tolerance(rel_l2=1e-2, cosine=0.9995), ImageTolerance(latent_rel_l2=5e-2, psnr=30.0, ssim=0.95)),
    "bf16": Row(Tolerance(rel_l2=3e-2, cosine=0.999), ImageTolerance(latent_rel_l2=1e-1, psnr=25.0, ssim=0.90)),
    "int8": Row(Tolerance(rel_l2=0.2, cosine=0.98), ImageTolerance(latent_rel_l2=0.35, psnr=18.0, ssim=0.60)),
    "int8-dynamic": Row(Tolerance(rel_l2=0.2, cosine=0.98), ImageTolerance(latent_rel_l2=0.35, psnr=18.0, ssim=0.60)),
    # qat: fake-quantized int8 trained towards the original: held to the int8 bounds.
    "qat": Row(Tolerance(rel_l2=0.2, cosine=0.98), ImageTolerance(latent_rel_l2=0.35, psnr=18.0, ssim=0.60)),
    # fp8 Q/DQ (TensorRT): like the other 8-bit quantized variants.
    "fp8": Row(Tolerance(rel_l2=0.2, cosine=0.98), ImageTolerance(latent_rel_l2=0.35, psnr=18.0, ssim=0.60)),
    "int4": Row(Tolerance(rel_l2=0.3, cosine=0.95), ImageTolerance(latent_rel_l2=0.5, psnr=15.0, ssim=0.45)),
    # pruned: a different (smaller) model distilled towards the original, not a re-encoding of it.
    # The bounds only say the output still points the original's way; the build records the
    # distillation error and the export's own fidelity (ONNX vs the pruned torch model).
    "pruned": Row(Tolerance(cosine=0.5), ImageTolerance(latent_rel_l2=1.0, psnr=10.0, ssim=0.2)),
}
DEFAULTS: dict[str, Tolerance] = {k: r.component for k, r in TABLE.items()}
IMAGE: dict[str, ImageTolerance] = {k: r.image for k, r in TABLE.items()}


def row(precision: str) -> Row:
    if precision not in TABLE:
        raise UsageError(f"no tolerance for precision '{precision}'", f"known: {', '.join(TABLE)}")
    return TABLE[precision]


def loosest(precisions: Sequence[str]) -> str:
    """The row that judges a mix (an int8 UNet with an fp32 VAE is judged as int8)."""
    unknown = [p for p in precisions if p not in TABLE]
    if unknown:
        raise UsageError(f"no tolerance for precision(s) {unknown}", f"known: {', '.join(TABLE)}")
    order = list(TABLE)
    return max(precisions, key=order.index) if precisions else "fp32"


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
