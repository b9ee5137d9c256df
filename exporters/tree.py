"""The HF-ONNX tree around the component graphs: model_index.json, scheduler, tokenizers, configs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from exporters.files import write_json_atomic
from exporters.spec import ComponentSpec

TREE_INFO = "diffprism.json"  # specs and facts of the tree, read by targets and validation


def write_pipeline_files(pipe: Any, tree: Path, tokenizers: tuple[str, ...]) -> None:
    """model_index.json, scheduler/ and tokenizer*/ as diffusers and optimum lay them out."""
    pipe.save_config(tree)  # model_index.json: optimum picks its ORT/OV pipeline class from it
    pipe.scheduler.save_pretrained(tree / "scheduler")
    for name in tokenizers:
        tok = getattr(pipe, name, None)
        if tok is not None:
            tok.save_pretrained(tree / name)


def write_component_config(directory: Path, config: Mapping[str, Any]) -> None:
    clean = {k: v for k, v in config.items() if _jsonable(v)}
    if isinstance(clean.get("_use_default_values"), list):  # diffusers fills it from a set: order varies per run
        clean["_use_default_values"] = sorted(clean["_use_default_values"])
    write_json_atomic(directory / "config.json", clean)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def write_tree_info(tree: Path, info: Mapping[str, Any], specs: Mapping[str, ComponentSpec]) -> None:
    data = dict(info)
    data["components"] = [spec.to_json() for spec in specs.values()]  # a list: keeps the pipeline order
    write_json_atomic(tree / TREE_INFO, data)


def read_tree_info(tree: Path) -> tuple[dict[str, Any], dict[str, ComponentSpec]]:
    from exporters.errors import SourceError

    path = tree / TREE_INFO
    if not path.is_file():
        raise SourceError(f"{tree} is not a diffprism ONNX tree (no {TREE_INFO})", "run 'diffprism export' first")
    data = json.loads(path.read_text())
    specs = {s["name"]: ComponentSpec.from_json(s) for s in data.pop("components")}
    return data, specs


def geometry(info: Mapping[str, Any]):
    """The pipeline's geometry from tree info (read_tree_info's first value): the one accessor."""
    from exporters.errors import SourceError
    from exporters.geometry import Geometry

    data = info.get("geometry")
    if not data:
        # Trees from before the geometry was recorded: their VAE scale, latent multiple and sequence
        # limits were never stored together, and guessing them is what this field replaces.
        raise SourceError("the exported tree records no geometry (it was exported by an older diffprism)",
                          "re-run 'diffprism export' to write the tree again")
    return Geometry.from_json(data)


def read_geometry(tree: Path):
    return geometry(read_tree_info(tree)[0])
