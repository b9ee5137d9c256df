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
    # status "structural": per-component checks of the artifact itself ({"ok", "problems", ...}), and why
    # numerics did not run. A structural result never counts as passed: `passed` is about numerics.
    structure: dict[str, dict] = field(default_factory=dict)
    numerics_skipped: str = ""
    # "component/point" reference cases outside a static build's fixed shapes (runner.spec), not run.
    skipped_points: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "numeric" and bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def structure_ok(self) -> bool:
        return bool(self.structure) and all(s.get("ok") for s in self.structure.values())

    @property
    def verdict(self) -> str:
        if self.status == "structural":
            return "structure ok, numerics not run" if self.structure_ok else "structure FAILED, numerics not run"
        return "passed" if self.passed else "failed"

    def to_json(self) -> dict:
        data = {
            "target": self.target,
            "precision": self.precision,
            "status": self.status,
            "verdict": self.verdict,
            "passed": self.passed if self.status == "numeric" else None,
            "runner": self.runner,
            "comparisons": [c.to_json() for c in self.comparisons],
        }
        if self.skipped_points:
            data["skipped_points"] = self.skipped_points
        if self.status == "structural":
            data.update(structure_ok=self.structure_ok, structure=self.structure, numerics_skipped=self.numerics_skipped)
        return data


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
                if runner.spec is not spec and not _accepts(runner.spec, case["inputs"]):
                    result.skipped_points.append(f"{name}/{point}")
                    continue
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


def _accepts(spec: ComponentSpec, feed) -> bool:
    """Whether a case fits a runner's own (narrower, e.g. static-shape) spec."""
    try:
        spec.check_feed(feed)
    except DiffprismError:
        return False
    return True
