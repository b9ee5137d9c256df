"""The HF-ONNX tree around the component graphs: model_index.json, scheduler, tokenizers, configs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from exporters.files import write_json_atomic
from exporters.spec import ComponentSpec

TREE_INFO = "diffprism.json"  # specs and facts of the tree, read by targets and validation


# model_index.json entries that older transformers (optimum's pinned one) cannot load as written:
# its T5Tokenizer is the sentencepiece one, which needs spiece.model; the fast class reads tokenizer.json.
LEGACY_CLASSES = {"T5Tokenizer": "T5TokenizerFast"}


def write_pipeline_files(pipe: Any, tree: Path, tokenizers: tuple[str, ...], source_dir: Path | None = None) -> None:
    """model_index.json, scheduler/ and tokenizer*/ as diffusers and optimum lay them out.

    Tokenizer folders hold what the running transformers saves, the BPE vocab.json/merges.txt
    that older transformers reads instead of tokenizer.json, and every file of the source
    folder's tokenizer (copied as the source has them).
    """
    pipe.save_config(tree)  # model_index.json: optimum picks its ORT/OV pipeline class from it
    _legacy_model_index(tree / "model_index.json")
    pipe.scheduler.save_pretrained(tree / "scheduler")
    for name in tokenizers:
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        out = tree / name
        tok.save_pretrained(out)
        _write_bpe_files(tok, out)
        src = Path(source_dir) / name if source_dir is not None else None
        if src is not None and src.is_dir():
            for f in sorted(src.iterdir()):
                if f.is_file():
                    shutil.copyfile(f, out / f.name)
        _legacy_tokenizer_config(out / "tokenizer_config.json")


def _write_bpe_files(tok: Any, out: Path) -> None:
    backend = getattr(tok, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ == "BPE" and not (out / "vocab.json").exists():
        model.save(str(out))  # vocab.json + merges.txt


def _legacy_model_index(path: Path) -> None:
    index = json.loads(path.read_text())
    changed = False
    for key, value in index.items():
        if isinstance(value, list) and len(value) == 2 and value[1] in LEGACY_CLASSES:
            index[key] = [value[0], LEGACY_CLASSES[value[1]]]
            changed = True
    if changed:
        write_json_atomic(path, index)


def _legacy_tokenizer_config(path: Path) -> None:
    """Newer transformers writes extra_special_tokens as a list; older ones read a name -> token mapping."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config["extra_special_tokens"] = {}
        if extra:
            config["additional_special_tokens"] = extra
        write_json_atomic(path, config)


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


class _ComponentEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    dims: list[dict[str, Any]]


class _TreeInfo(BaseModel):
    """The shape of diffprism.json; other keys (e.g. geometry, variant facts) pass through."""
    model_config = ConfigDict(extra="allow")
    components: list[_ComponentEntry]


def read_tree_info(tree: Path) -> tuple[dict[str, Any], dict[str, ComponentSpec]]:
    """The tree's facts and specs; a damaged or hostile file is an IntegrityError (exit 6), never a traceback."""
    from exporters.errors import DiffprismError, IntegrityError, SourceError
    from exporters.paths import check_name

    path = tree / TREE_INFO
    if not path.is_file():
        raise SourceError(f"{tree} is not a diffprism ONNX tree (no {TREE_INFO})", "run 'diffprism export' first")
    fix = "the tree is damaged: re-run 'diffprism export'"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        _TreeInfo.model_validate(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid UTF-8 JSON ({type(exc).__name__})", fix) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise IntegrityError(f"{path}: {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}",
                             fix) from None
    specs = {}
    for entry in data.pop("components"):
        name = check_name(entry["name"], f"component name in {path}")
        try:
            specs[name] = ComponentSpec.from_json(entry)
        except DiffprismError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise IntegrityError(f"{path}: component {name} has a malformed spec ({type(exc).__name__}: {exc})",
                                 fix) from None
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
