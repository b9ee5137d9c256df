"""Torch-TensorRT runner: a saved ExportedProgram holding TensorRT engines (model.ep), on a CUDA GPU.

torch_tensorrt is imported before loading: it registers the TensorRT runtime ops the program calls.
"""
from __future__ import annotations

from pathlib import Path

import torch

from exporters.errors import BackendUnavailable
from exporters.spec import ComponentSpec
from runtimes.base import Runner


class TorchTensorRtRunner(Runner):
    backend = "torch_tensorrt"

    def __init__(self, spec: ComponentSpec, program: Path, device: str = "cuda:0"):
        super().__init__(spec)
        self.program = Path(program)
        self.device = torch.device(device)
        self.module = None

    def _activate(self) -> None:
        try:
            import torch_tensorrt  # noqa: F401  (registers the engine ops)
        except ImportError as exc:
            raise BackendUnavailable("torch_tensorrt is not installed", "pip install torch-tensorrt on a CUDA machine") from exc
        self.module = torch.export.load(str(self.program)).module()

    def _infer(self, feed):
        args = [torch.from_numpy(feed[name]).to(self.device) for name in self.spec.input_names]
        with torch.no_grad():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.spec.output_names, out)}

    def _deactivate(self) -> None:
        self.module = None
        torch.cuda.empty_cache()

    def describe(self):
        return {"backend": self.backend, "device": str(self.device), "model": self.program.parent.name}
