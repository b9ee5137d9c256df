"""Shared fixtures: each tiny preset is built and exported once per test session, then reused.

Tests must treat the exported folders as read-only; a test that changes files copies
the folder first (see `copy_export`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from diffprism import presets

TINY = ("tiny-sd", "tiny-sd2", "tiny-sdxl")
DIT = ("tiny-sd3", "tiny-flux")  # transformer (DiT) presets


@pytest.fixture(scope="session")
def pipeline():
    """pipeline(name) -> the preset's diffusers pipeline (built once per session; do not mutate)."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = presets.build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, pipeline):
    """exported(name) -> folder with onnx/ and reference/ and manifest.json for that preset (read-only)."""
    from diffprism.jobs import export_job

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"export-{name}")
            export_job(name, out)
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture
def copy_export(exported, tmp_path):
    """copy_export(name) -> a private, writable copy of the session export."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(exported(name), dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def openvino_tiny_sd(exported, tmp_path_factory):
    """A copy of the tiny-sd export with OpenVINO fp32 and weight-only int8 built (int8 needs no
    calibration that way), once per session. Tests may add generated images; trees stay read-only."""
    from diffprism.jobs import compile_job
    from exporters.errors import UsageError
    from targets.base import get_target

    try:
        target = get_target("openvino")
    except UsageError as exc:
        pytest.skip(f"the openvino target is not in this build: {exc}")
    if not target.availability().ok:
        pytest.skip(f"OpenVINO cannot run here: {target.availability().reason}")
    out = tmp_path_factory.mktemp("openvino") / "tiny-sd"
    shutil.copytree(exported("tiny-sd"), out)
    compile_job(out, target="openvino", precision="fp32")
    compile_job(out, target="openvino", precision="int8", options={"quantize_activations": []})
    return out


@pytest.fixture(scope="session")
def openvino_dit(exported, tmp_path_factory):
    """{preset: copy of the tiny-sd3 / tiny-flux export with OpenVINO fp32 built}, once per session (read-only)."""
    from diffprism.jobs import compile_job
    from exporters.errors import UsageError
    from targets.base import get_target

    try:
        target = get_target("openvino")
    except UsageError as exc:
        pytest.skip(f"the openvino target is not in this build: {exc}")
    if not target.availability().ok:
        pytest.skip(f"OpenVINO cannot run here: {target.availability().reason}")
    built = {}
    for preset in DIT:
        out = tmp_path_factory.mktemp("openvino-dit") / preset
        shutil.copytree(exported(preset), out)
        compile_job(out, target="openvino", precision="fp32")
        built[preset] = out
    return built
