"""Run each component's artifact on its runtime over the stored reference cases and compare."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from exporters import reference
from exporters.errors import DiffprismError, SourceError
from exporters.spec import ComponentSpec
from runtimes.base import Runner
from validation.compare import Comparison, compare
from validation.policy import Policy

log = logging.getLogger(__name__)

RunnerFactory = Callable[[ComponentSpec], Runner]


@dataclass
class ValidationResult:
    target: str
    precision: str
    runner: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> runner.describe()
    comparisons: list[Comparison] = field(default_factory=list)
    status: str = "numeric"  # "numeric", or e.g. "structural" where numerics cannot run here

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "precision": self.precision,
            "status": self.status,
            "passed": self.passed,
            "runner": self.runner,
            "comparisons": [c.to_json() for c in self.comparisons],
        }


def validate(specs: Mapping[str, ComponentSpec], make_runner: RunnerFactory, reference_dir: Path, *,
             target: str, precision: str, policy: Policy = Policy(),
             progress: Callable[[str], None] | None = None) -> ValidationResult:
    result = ValidationResult(target, precision)
    for name, spec in specs.items():
        ref_path = reference_dir / f"{name}.npz"
        if not ref_path.is_file():
            raise SourceError(f"no PyTorch reference for '{name}' at {ref_path}", "re-run 'diffprism export'")
        if progress:
            progress(name)
        tolerance = policy.tolerance(precision, name)
        runner = make_runner(spec)
        with runner:
            result.runner[name] = runner.describe()
            for point, case in reference.load(ref_path).items():
                try:
                    outputs = runner.infer(case["inputs"])
                except DiffprismError:
                    raise
                except Exception as exc:  # a runtime crash is a failed comparison, reported, not a traceback
                    comp = Comparison(name, point, case["dims"], tolerance, error=f"{type(exc).__name__}: {exc}")
                    result.comparisons.append(comp)
                    continue
                result.comparisons.append(compare(name, point, case["dims"], case["outputs"], outputs, tolerance))
        log.info("validated %s on %s/%s", name, target, precision)
    return result
