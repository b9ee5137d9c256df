"""ONNX Runtime runner: CPU here; CUDA and TensorRT execution providers when present."""
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

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed", "pip install onnxruntime") from exc
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.model_path), opts, providers=self.providers)
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
        return {"backend": self.backend, "providers": ",".join(self.providers), "model": self.model_path.parent.name}


# Variant graphs may take half-precision inputs; the feed contract stays float32.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
