"""Run each component's artifact on its runtime over the stored reference cases and compare.

A variant is judged as it ships: its runners run at the variant's runtime configuration (the
"deploy" check), each component judged by the looser of the variant's own row and the row of the
precision its runtime really computes in (an fp16 IR computed in bf16 by the bf16 row; an int8
IR computed in bf16 stays int8). Where the target has one, a "weights_only" check runs beside it
at full compute precision, judged by the variant's own row: it isolates what the stored weights
lose. The verdict needs both.
"""
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
from validation.policy import Policy, loosest

log = logging.getLogger(__name__)

RunnerFactory = Callable[[ComponentSpec], Runner]
DEPLOY, WEIGHTS_ONLY = "deploy", "weights_only"


@dataclass
class ValidationResult:
    target: str
    precision: str
    runner: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> runner.describe() (deploy)
    comparisons: list[Comparison] = field(default_factory=list)  # every check's, each tagged with its check
    rows: dict[str, str] = field(default_factory=dict)  # component -> policy row of the deploy check
    # component -> {"runner": describe(), "row": row} of the weights-only check, where one ran.
    weights_only: dict[str, dict] = field(default_factory=dict)
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

    def check_passed(self, check: str) -> bool | None:
        mine = [c for c in self.comparisons if c.check == check]
        return all(c.passed for c in mine) if mine else None

    def add_weights_only(self, other: "ValidationResult") -> None:
        """Merge the weights-only check (a validate() run with check=WEIGHTS_ONLY) into this verdict."""
        self.comparisons.extend(other.comparisons)
        self.weights_only.update({n: {"runner": other.runner[n], "row": other.rows[n]} for n in other.runner})
        self.skipped_points.extend(p for p in other.skipped_points if p not in self.skipped_points)

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
        if self.rows:
            data["rows"] = self.rows
            data["checks"] = {DEPLOY: self.check_passed(DEPLOY)}
        if self.weights_only:
            data["weights_only"] = self.weights_only
            data["checks"][WEIGHTS_ONLY] = self.check_passed(WEIGHTS_ONLY)
        if self.skipped_points:
            data["skipped_points"] = self.skipped_points
        if self.status == "structural":
            data.update(structure_ok=self.structure_ok, structure=self.structure, numerics_skipped=self.numerics_skipped)
        return data


def validate(specs: Mapping[str, ComponentSpec], make_runner: RunnerFactory, reference_dir: Path, *,
             target: str, precision: str, policy: Policy = Policy(), check: str = DEPLOY,
             progress: Callable[[str], None] | None = None) -> ValidationResult:
    """`precision` is the variant's own tolerance row; each component is judged by the looser of it and
    the row of what its runner computes in (Runner.compute_precision, read after activation)."""
    result = ValidationResult(target, precision)
    for name, spec in specs.items():
        ref_path = reference_dir / f"{name}.npz"
        if not ref_path.is_file():
            raise SourceError(f"no PyTorch reference for '{name}' at {ref_path}", "re-run 'diffprism export'")
        if progress:
            progress(name if check == DEPLOY else f"{name} ({check.replace('_', ' ')})")
        runner = make_runner(spec)
        with runner:
            computed = runner.compute_precision()
            row = loosest([precision, computed]) if computed else precision
            # A bound given for this run (validate --rel-l2/--cosine) applies whatever row judges it.
            tolerance = policy.overrides.get((precision, name)) or policy.tolerance(row, name)
            result.runner[name] = runner.describe()
            result.rows[name] = row
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
                else:
                    comp = compare(name, point, case["dims"], case["outputs"], outputs, tolerance)
                comp.check, comp.row = check, row
                result.comparisons.append(comp)
        log.info("validated %s on %s/%s (%s check, %s row)", name, target, precision, check, row)
    return result


def _accepts(spec: ComponentSpec, feed) -> bool:
    """Whether a case fits a runner's own (narrower, e.g. static-shape) spec."""
    try:
        spec.check_feed(feed)
    except DiffprismError:
        return False
    return True
