"""The PyTorch reference runner: the wrapped component, on a device given as a parameter."""
from __future__ import annotations

import torch
from torch import nn

from exporters.spec import ComponentSpec
from runtimes.base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, spec: ComponentSpec, module: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(spec)
        self.module = module
        self.device = torch.device(device)
        self.dtype = dtype

    def _activate(self) -> None:
        self.module.to(self.device, self.dtype).eval()

    def _infer(self, feed):
        args = []
        for name in self.spec.input_names:
            t = torch.from_numpy(feed[name]).to(self.device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        with torch.no_grad():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.spec.output_names, out)}

    def describe(self):
        return {"backend": self.backend, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}
