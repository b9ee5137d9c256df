"""Per-platform CI jobs for a recipe: one job per variant, with the runner its target asks for.

Each target says where its builds run (targets.base.Target.runner_labels): e.g. TensorRT
engines need a GPU runner labelled with the TensorRT version, Core ML needs macOS, ONNX
Runtime and OpenVINO build and validate on any x86 Linux runner.
"""
from __future__ import annotations

from typing import Any

from diffprism.recipe import BuildSpec, Recipe
from exporters.errors import UsageError
from targets.base import get_target

FORMATS = ("github", "gitlab")


def runner_labels(build: BuildSpec, recipe: Recipe) -> list[str]:
    if build.runs_on:
        return list(build.runs_on)
    return get_target(build.target).runner_labels(recipe.matrix.model_dump())


def jobs(recipe: Recipe, only: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for b in recipe.select(only):
        target, variant, settings = get_target(b.target), b.variant, recipe.matrix.model_dump()
        job: dict[str, Any] = {"name": variant.key, "build": variant.id, "target": b.target,
                               "precision": variant.precision, "runs-on": runner_labels(b, recipe), "gpu": target.gpu,
                               "runner": target.gitlab_runner(settings), **target.matrix_facts(settings)}
        out.append(job)
    return out


def render(recipe: Recipe, fmt: str, only: list[str] | None = None) -> dict[str, Any]:
    """GitHub Actions `strategy.matrix` ({"include": [...]}) or GitLab `parallel:matrix` document."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown matrix format '{fmt}'", f"choose from {', '.join(FORMATS)}")
    entries = jobs(recipe, only)
    if fmt == "github":
        return {"include": [{k: v for k, v in j.items() if k != "runner"} for j in entries]}
    # GitLab matrix values are strings; runner tags come from the RUNNER variable (tags: ["$RUNNER"]).
    return {"parallel": {"matrix": [{"BUILD": j["build"], "TARGET": j["target"], "PRECISION": j["precision"],
                                     "RUNNER": j["runner"]} for j in entries]}}
