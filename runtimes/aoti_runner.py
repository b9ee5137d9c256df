"""AOTInductor runner: one .pt2 package loaded with torch._inductor.aoti_load_package (CPU, or CUDA where present).

A package is native code for one device kind and one torch build; loading it under another
torch can crash the process instead of raising. So package.json beside it (written by
targets/aotinductor.py) is checked first, and a mismatch is an error that names both builds.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from exporters.errors import BackendUnavailable, SourceError, UsageError
from exporters.spec import ComponentSpec
from runtimes.base import Runner

log = logging.getLogger(__name__)

PACKAGE_INFO = "package.json"  # component, precision, device and torch build of the package beside it


def read_facts(package: Path) -> dict[str, str]:
    path = Path(package).parent / PACKAGE_INFO
    if not path.is_file():
        raise SourceError(f"{path} is missing: the package's device and torch build are unknown",
                          "rebuild it with 'diffprism compile DIR --target aotinductor'")
    return json.loads(path.read_text())


def check_loadable(facts: dict[str, str], device: str) -> None:
    """Raise when this process cannot load a package with these facts."""
    here = torch.__version__
    if facts.get("torch_version") != here:
        raise UsageError(f"the AOTInductor package of '{facts.get('component')}' was built with torch "
                         f"{facts.get('torch_version')} and this process runs torch {here}; a package loads only "
                         "under the torch build that compiled it",
                         f"rebuild it here with 'diffprism compile DIR --target aotinductor --precision "
                         f"{facts.get('precision')}', or run it with torch {facts.get('torch_version')}")
    if facts.get("device") != device.split(":")[0]:
        raise UsageError(f"the package of '{facts.get('component')}' is compiled for {facts.get('device')}, "
                         f"not {device}", f"run it with --option device={facts.get('device')} or rebuild it for {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("the package is compiled for CUDA and no CUDA GPU is visible",
                                 "run it on a machine with an NVIDIA GPU and a CUDA build of torch")


class AotiRunner(Runner):
    backend = "aotinductor"

    def __init__(self, spec: ComponentSpec, package: Path, device: str | None = None):
        super().__init__(spec)
        self.package = Path(package)
        self.facts = read_facts(self.package)
        self.device = str(device or self.facts.get("device", "cpu"))
        self.model = None

    def _activate(self) -> None:
        check_loadable(self.facts, self.device)
        index = int(self.device.split(":")[1]) if ":" in self.device else -1
        self.model = torch._inductor.aoti_load_package(str(self.package), device_index=index)

    def _infer(self, feed):
        device = torch.device(self.device)
        args = [torch.from_numpy(feed[name]).to(device) for name in self.spec.input_names]
        with torch.no_grad():
            out = self.model(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: o.detach().float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy()
                for n, o in zip(self.spec.output_names, out)}

    def _deactivate(self) -> None:
        self.model = None

    def describe(self):
        return {"backend": self.backend, "device": self.device, "precision": str(self.facts.get("precision")),
                "torch": str(self.facts.get("torch_version")), "model": self.package.parent.name}
