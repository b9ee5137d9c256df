"""Agreement metrics between a reference and a candidate tensor."""
from __future__ import annotations

import math

import numpy as np


def max_abs(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))) if ref.size else 0.0


def rel_l2(ref: np.ndarray, out: np.ndarray) -> float:
    """||out - ref|| / ||ref||, the scale-free error (inf if the candidate is not finite)."""
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    if not np.all(np.isfinite(o)):
        return math.inf
    denom = np.linalg.norm(r)
    diff = np.linalg.norm(o - r)
    return float(diff / denom) if denom > 0 else float(diff)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    if not np.all(np.isfinite(o)):
        return -1.0
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    return float(np.dot(r, o) / denom) if denom > 0 else (1.0 if np.array_equal(r, o) else 0.0)


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """PSNR in dB against the reference's own peak-to-peak range."""
    r, o = ref.astype(np.float64), out.astype(np.float64)
    if not np.all(np.isfinite(o)):
        return -math.inf
    mse = float(np.mean((r - o) ** 2))
    peak = float(r.max() - r.min()) if r.size else 0.0
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak**2 / mse) if peak > 0 else -math.inf


def all_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    return {"max_abs": max_abs(ref, out), "rel_l2": rel_l2(ref, out), "cosine": cosine(ref, out), "psnr": psnr(ref, out)}
