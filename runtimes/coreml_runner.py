"""Core ML runner: MLModel.predict on a .mlpackage (predictions need the macOS Core ML framework)."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from exporters.errors import BackendUnavailable
from exporters.spec import ComponentSpec
from runtimes.base import Runner

COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")


def unavailable() -> tuple[str, str] | None:
    """None if Core ML predictions can run here, else (reason, fix)."""
    if platform.system() != "Darwin":
        return (f"Core ML predictions need macOS (this is {platform.system()})",
                "validate on a Mac; here 'diffprism validate --target coreml' checks structure only")
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return "coremltools is not installed", "pip install 'diffprism[coreml]'"
    return None


class CoreMlRunner(Runner):
    backend = "coreml"

    def __init__(self, spec: ComponentSpec, package: Path, compute_units: str = "all"):
        super().__init__(spec)
        if compute_units not in COMPUTE_UNITS:
            from exporters.errors import UsageError

            raise UsageError(f"unknown compute_units {compute_units!r}", f"choose from {', '.join(COMPUTE_UNITS)}")
        self.package = Path(package)
        self.compute_units = compute_units
        self.model = None
        self.names: dict[str, str] = {}

    def _activate(self) -> None:
        missing = unavailable()
        if missing:
            raise BackendUnavailable(f"Core ML runner: {missing[0]}", missing[1])
        import coremltools as ct

        self.model = ct.models.MLModel(str(self.package), compute_units=getattr(ct.ComputeUnit, self.compute_units.upper()))
        # spec name -> package name where Core ML needed an identifier (hidden_states.1 -> hidden_states_1)
        self.names = json.loads(self.model.user_defined_metadata.get("diffprism.io_names") or "{}")

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Core ML has no int64 multiarrays: token ids go in as int32 (the package declares int32).
        cast = {k: v.astype(np.int32) if v.dtype.kind in "iu" else v.astype(np.float32) for k, v in feed.items()}
        out = self.model.predict({self.names.get(k, k): v for k, v in cast.items()})
        back = {v: k for k, v in self.names.items()}
        return {back.get(k, k): np.asarray(v, dtype=np.float32) for k, v in out.items()}

    def _deactivate(self) -> None:
        self.model = None

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend, "compute_units": self.compute_units, "package": self.package.name}
