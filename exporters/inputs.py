"""Deterministic inputs generated from a spec: for tracing, references and validation."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from exporters.spec import ComponentSpec


def make_feed(spec: ComponentSpec, point: str | Mapping[str, int] = "opt", seed: int = 0) -> dict[str, np.ndarray]:
    """One array per input at a shape point; same spec, point and seed give the same bytes."""
    values = spec.dim_values(point)
    rng = np.random.default_rng(seed)
    feed = {}
    for t in spec.inputs:
        shape = spec.shape(t, values)
        dtype = np.dtype(t.dtype)
        if t.value_range is not None:
            lo, hi = t.value_range
            if dtype.kind in "iu":
                arr = rng.integers(int(lo), int(hi), size=shape, dtype=dtype)
            else:
                arr = rng.uniform(lo, hi, size=shape).astype(dtype)
        else:
            arr = rng.standard_normal(size=shape).astype(dtype)
        feed[t.name] = arr
    return feed


def trace_values(spec: ComponentSpec) -> dict[str, int]:
    """Dim values for tracing: opt, but never 1 or the min/max edge of a dynamic dim.

    torch.export specialises a symbol whose example value is 0 or 1, and a dim that is a
    multiple of m is traced as m * symbol, so a dynamic dim is traced at >= 2 * m when its
    range allows (a pipeline whose default latent is 8 with multiples of 8).
    """
    values = {}
    for d in spec.dims:
        if d.product_of:
            continue  # a derived dim follows its sources (ComponentSpec.dim_values)
        value = d.opt
        if not d.is_static and value // max(d.multiple_of, 1) < 2:
            value = min(d.max, max(2, 2 * d.multiple_of))
        values[d.name] = value
    return values
