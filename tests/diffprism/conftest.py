"""A small recipe built once per session (tiny-sd text encoder + VAE decoder, ONNX Runtime fp32).

Tests treat the built folder as read-only; `copy_built()` gives a private copy.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

RECIPE = """\
name = "small"
components = ["text_encoder", "vae_decoder"]

[source]
preset = "tiny-sd"

[shapes]
batch = "1:1:2"
size = "32:32:64"

[[build]]
target = "onnxruntime"
precision = "fp32"
"""


@pytest.fixture(scope="session")
def recipe_text() -> str:
    return RECIPE


@pytest.fixture(scope="session")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "small.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="session")
def built(tmp_path_factory, recipe_file) -> Path:
    from diffprism.build import run_build
    from diffprism.recipe import load

    out = tmp_path_factory.mktemp("built") / "small"
    report = run_build(load(recipe_file), out)
    assert report.passed, report.verdicts
    return out


@pytest.fixture
def copy_built(built, tmp_path):
    def copy(name: str = "set") -> Path:
        dst = tmp_path / name
        shutil.copytree(built, dst)
        return dst

    return copy
