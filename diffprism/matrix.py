"""Per-platform CI jobs for a recipe: one job per target x precision, with the runner it needs.

TensorRT engines are specific to the GPU and TensorRT version that build them, so their
jobs go to a self-hosted GPU runner labelled with the TensorRT version; Core ML needs
macOS; ONNX Runtime and OpenVINO build and validate on any x86 Linux runner.
"""
from __future__ import annotations

from typing import Any

from diffprism.recipe import BuildSpec, Recipe
from exporters.errors import UsageError

FORMATS = ("github", "gitlab")


def runner_labels(build: BuildSpec, recipe: Recipe) -> list[str]:
    if build.runs_on:
        return list(build.runs_on)
    if build.target == "tensorrt":
        return ["self-hosted", "linux", "x64", "gpu", f"tensorrt-{recipe.matrix.tensorrt}"]
    if build.target == "coreml":
        return ["macos-14"]
    return ["ubuntu-latest"]


def jobs(recipe: Recipe, only: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for b in recipe.select(only):
        job: dict[str, Any] = {"name": f"{b.target}-{b.precision}", "build": b.id, "target": b.target,
                               "precision": b.precision, "runs-on": runner_labels(b, recipe),
                               "gpu": b.target == "tensorrt"}
        if b.target == "tensorrt":
            job["tensorrt"] = recipe.matrix.tensorrt
        out.append(job)
    return out


def render(recipe: Recipe, fmt: str, only: list[str] | None = None) -> dict[str, Any]:
    """GitHub Actions `strategy.matrix` ({"include": [...]}) or GitLab `parallel:matrix` document."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown matrix format '{fmt}'", f"choose from {', '.join(FORMATS)}")
    entries = jobs(recipe, only)
    if fmt == "github":
        return {"include": entries}
    # GitLab matrix values are strings; runner tags come from the RUNNER variable (tags: ["$RUNNER"]).
    return {"parallel": {"matrix": [{"BUILD": j["build"], "TARGET": j["target"], "PRECISION": j["precision"],
                                     "RUNNER": _gitlab_tag(j)} for j in entries]}}


def _gitlab_tag(job: dict[str, Any]) -> str:
    if job["target"] == "tensorrt":
        return f"gpu-tensorrt-{job['tensorrt']}"
    if job["target"] == "coreml":
        return "saas-macos-medium-m1"
    return "saas-linux-small-amd64"
