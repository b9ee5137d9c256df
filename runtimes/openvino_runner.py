"""OpenVINO runner: one compiled IR on a device (CPU here; GPU/NPU where present), precision hint explicit.

The hint is the compute precision: "f32", "bf16", "f16", or "default" to leave the device's own
choice (bf16 on CPUs with AVX512-BF16 or AMX, f32 on other CPUs, f16 on GPUs), which is how a
variant is deployed. Which hint a variant runs with is the target's runtime configuration
(targets/openvino.py `runtime_options`: fp32 at f32, the others at the device default); the
runner's own default, f32, is what a bare comparison with PyTorch fp32 needs. describe() and
compute_precision() report the precision the compiled model really uses, read back from it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from exporters.errors import BackendUnavailable, UsageError
from exporters.spec import ComponentSpec
from runtimes.base import Runner

log = logging.getLogger(__name__)

HINTS = ("f32", "bf16", "f16", "default")
# OpenVINO element type of the compiled model's inference precision -> validation.policy row.
ROWS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
PERFORMANCE = ("LATENCY", "THROUGHPUT")


class OpenVinoRunner(Runner):
    backend = "openvino"

    def __init__(self, spec: ComponentSpec, model_path: Path, device: str = "CPU", hint: str = "f32",
                 cache_dir: str | Path | None = None, performance: str = "LATENCY", threads: int = 0):
        super().__init__(spec)
        if hint not in HINTS:
            raise UsageError(f"unknown OpenVINO precision hint '{hint}'", f"choose from {', '.join(HINTS)}")
        if performance not in PERFORMANCE:
            raise UsageError(f"unknown OpenVINO performance hint '{performance}'", f"choose from {', '.join(PERFORMANCE)}")
        self.model_path = Path(model_path)
        self.device = str(device).upper()
        self.hint = hint
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.performance = performance
        self.threads = int(threads)
        self.compiled = None
        self.request = None
        self.used_hint = "?"

    def properties(self) -> dict[str, str]:
        props = {"PERFORMANCE_HINT": self.performance}
        if self.hint != "default":
            props["INFERENCE_PRECISION_HINT"] = self.hint
        if self.threads:
            props["INFERENCE_NUM_THREADS"] = str(self.threads)
        return props

    def _activate(self) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailable("openvino is not installed", "pip install 'diffprism[openvino]'") from exc
        core = ov.Core()
        if self.device.split(".")[0] not in {d.split(".")[0] for d in core.available_devices}:
            raise BackendUnavailable(f"OpenVINO device '{self.device}' is not present",
                                     f"use one of {', '.join(core.available_devices)} (--option device=CPU)")
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        # Compiling from the path (not a read model) lets the cache skip the compile next time.
        self.compiled = core.compile_model(str(self.model_path), self.device, self.properties())
        self.request = self.compiled.create_infer_request()
        try:
            used = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            self.used_hint = used.get_type_name() if hasattr(used, "get_type_name") else str(used)  # ov.Type -> "f32"
        except RuntimeError:  # devices without the property
            self.used_hint = self.hint
        self._outputs = [(port, port.get_any_name()) for port in self.compiled.outputs]

    def _infer(self, feed):
        # infer() is synchronous and the feed is not touched while it runs: share its memory instead of
        # copying it in. The outputs it returns are already copies (share_outputs=False); cast only if needed.
        results = self.request.infer(dict(feed), share_inputs=True)
        out = {}
        for port, name in self._outputs:
            arr = results[port]
            out[name] = arr.astype(np.float32, copy=False) if arr.dtype.kind == "f" else arr
        return out

    def _deactivate(self) -> None:
        self.request = None
        self.compiled = None

    def describe(self):
        return {"backend": self.backend, "device": self.device, "hint": self.hint, "inference_precision": self.used_hint,
                "performance": self.performance, "model": self.model_path.parent.name}

    def compute_precision(self) -> str | None:
        return ROWS.get(self.used_hint)
