"""compare(): a structured verdict of a candidate's outputs against the reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from validation.metrics import all_metrics
from validation.policy import Tolerance


@dataclass
class OutputComparison:
    name: str
    metrics: dict[str, float]
    violations: list[str]

    @property
    def passed(self) -> bool:
        return not self.violations


@dataclass
class Comparison:
    component: str
    point: str
    dims: dict[str, int]
    tolerance: Tolerance
    outputs: list[OutputComparison] = field(default_factory=list)
    error: str | None = None  # the candidate failed to produce outputs
    check: str = "deploy"  # the runtime configuration that ran: "deploy" (as shipped) or "weights_only"
    row: str = ""  # the validation.policy row whose bounds applied

    @property
    def passed(self) -> bool:
        return self.error is None and all(o.passed for o in self.outputs)

    def worst(self, metric: str = "rel_l2") -> float:
        values = [o.metrics[metric] for o in self.outputs]
        if not values:
            return float("nan")
        return min(values) if metric in ("cosine", "psnr") else max(values)

    def to_json(self) -> dict:
        return {
            "component": self.component,
            "point": self.point,
            "dims": self.dims,
            "passed": self.passed,
            "tolerance": self.tolerance.to_json(),
            "error": self.error,
            "check": self.check,
            "row": self.row,
            "outputs": [{"name": o.name, "metrics": o.metrics, "violations": o.violations} for o in self.outputs],
        }


def compare(component: str, point: str, dims: Mapping[str, int], reference: Mapping[str, np.ndarray],
            candidate: Mapping[str, np.ndarray], tolerance: Tolerance) -> Comparison:
    result = Comparison(component, point, dict(dims), tolerance)
    for name, ref in reference.items():
        if name not in candidate:
            result.outputs.append(OutputComparison(name, {}, [f"output '{name}' missing"]))
            continue
        out = np.asarray(candidate[name])
        if out.shape != ref.shape:
            result.outputs.append(OutputComparison(name, {}, [f"shape {out.shape} != reference {ref.shape}"]))
            continue
        metrics = all_metrics(ref, out)
        result.outputs.append(OutputComparison(name, metrics, tolerance.violations(metrics)))
    return result
