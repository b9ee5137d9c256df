"""ONNX Runtime runner: CPU here; CUDA and TensorRT execution providers when present.

ONNX Runtime drops a requested execution provider it cannot start (not in this build, no GPU, a
TensorRT EP that fails to initialise) with only a warning and runs on the next one, down to CPU.
The runner reads the providers the session really has, reports those, and refuses a session
that lacks one it was asked for: a validation must never pass on CPU while saying "TensorRT".
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from exporters.errors import BackendUnavailable
from exporters.spec import ComponentSpec
from runtimes.base import Runner

log = logging.getLogger(__name__)

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers(prefer_gpu: bool = True) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    order = PREFERRED if prefer_gpu else ("CPUExecutionProvider",)
    return [p for p in order if p in available] or ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, spec: ComponentSpec, model_path: Path, providers: Sequence | None = None, threads: int = 0):
        super().__init__(spec)
        self.model_path = Path(model_path)
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.threads = threads
        self.session = None
        self.active_providers: list[str] = []
        self.session_options: dict[str, str] = {}

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed", "pip install onnxruntime") from exc
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        session = ort.InferenceSession(str(self.model_path), opts, providers=self.providers)
        active = session.get_providers()
        missing = [p for p in requested_names(self.providers) if p not in active]
        if missing:
            raise BackendUnavailable(
                f"ONNX Runtime did not start {', '.join(missing)} for {self.spec.name} (the session runs on "
                f"{', '.join(active)}; this onnxruntime build offers {', '.join(ort.get_available_providers())})",
                "install the onnxruntime package with that provider (e.g. onnxruntime-gpu) on a machine that has "
                "its device and libraries, or validate with the providers that are there",
            )
        self.session, self.active_providers = session, active
        # What the session really runs with (recorded beside the providers in reports and verdicts).
        self.session_options = {"graph_optimization": opts.graph_optimization_level.name,
                                "intra_op_threads": str(opts.intra_op_num_threads or "default")}
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}

    def _infer(self, feed):
        cast = {}
        for name, arr in feed.items():
            want = _ORT_TYPES.get(self._input_types.get(name, ""), None)
            cast[name] = arr.astype(want) if want is not None and arr.dtype != want else arr
        values = self.session.run(None, cast)
        names = [o.name for o in self.session.get_outputs()]
        return {n: np.asarray(v).astype(np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
                for n, v in zip(names, values)}

    def _deactivate(self) -> None:
        self.session = None

    def describe(self):
        """The providers the session really runs on (after activation); before it, the requested ones."""
        providers = self.active_providers or requested_names(self.providers)
        return {"backend": self.backend, "providers": ",".join(providers), **self.session_options,
                "model": self.model_path.parent.name}


def requested_names(providers: Sequence) -> list[str]:
    """Provider names from ORT's `providers` argument (names, or (name, options) pairs)."""
    return [p if isinstance(p, str) else p[0] for p in providers]


# Variant graphs may take half-precision inputs; the feed contract stays float32.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
