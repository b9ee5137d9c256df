"""The Runner contract: every backend runs a component with the same feed/fetch names."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

from exporters.spec import ComponentSpec

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


class Runner(ABC):
    """activate() loads, infer(feed) runs, deactivate() frees; also a context manager.

    infer() checks the feed against the spec before dispatching, so a bad feed is a
    clear ShapeError rather than a backend crash.
    """

    backend: str = "?"

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self.active = False

    def activate(self) -> None:
        if not self.active:
            self._activate()
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self.spec.check_feed(feed)
        self.activate()
        outputs = self._infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        missing = [n for n in self.spec.output_names if n not in outputs]
        if missing:
            raise RuntimeError(f"{self.backend} runner for {self.spec.name} returned no {missing}")
        return {n: outputs[n] for n in self.spec.output_names}

    def describe(self) -> dict[str, str]:
        """What ran: backend, device, precision hints (recorded in reports)."""
        return {"backend": self.backend}

    def compute_precision(self) -> str | None:
        """The tolerance row (validation.policy) of the precision the runtime really computes in, read
        after activation; None when it computes in the artifact's own precision (most runtimes)."""
        return None

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _deactivate(self) -> None:
        pass
