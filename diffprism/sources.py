"""Resolve a source (built-in preset, local diffusers folder, or Hub id) into a loaded pipeline.

Weights load from safetensors only; pickled weights (.bin/.ckpt/.pt) are refused unless
the caller passes allow_pickle. Remote code is never run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffprism import presets
from exporters.errors import SourceError
from exporters.files import HashCache
from exporters.families import SUPPORTED, family_of

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
COMPONENT_DIRS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


@dataclass
class Source:
    kind: str  # "preset", "folder", "hub"
    ref: str
    pipeline: Any
    info: dict[str, Any] = field(default_factory=dict)
    empty: bool = False  # models on the meta device, weights left in the folder (streamed export)


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not os.path.exists(text)


def load(ref: str, *, allow_pickle: bool = False, revision: str | None = None, seed: int = 0,
         empty: bool = False, components: list[str] | None = None, hashes: HashCache | None = None) -> Source:
    """empty=True: a folder's models are built on the meta device; their weights stay in the
    safetensors files for a streamed export (exporters.streaming). components: the ones to be
    exported (a folder needs the tokenizers of those text encoders only). `hashes` remembers the
    folder's file digests (a build passes the one under its .stages/)."""
    if ref in presets.PRESETS:
        pipe = presets.build(ref, seed)
        # A materialised preset is a folder on the meta device: always streamed.
        return Source("preset", ref, pipe, {"kind": "preset", "preset": ref, "seed": seed},
                      empty=presets.PRESETS[ref].materialised)
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")) or not looks_like_hub_id(ref):
        return _load_folder(path, allow_pickle, empty, components, hashes)
    return _load_hub(ref, allow_pickle, revision)


def check_folder(path: Path, allow_pickle: bool, components: list[str] | None = None) -> dict[str, Any]:
    """Checks a folder before anything is loaded; returns model_index.json."""
    if not path.exists():
        raise SourceError(f"model folder {path} does not exist", "pass a diffusers folder, a Hub id or a preset "
                          f"({', '.join(presets.PRESETS)})")
    if not path.is_dir():
        raise SourceError(f"{path} is a file, not a diffusers folder", "pass the folder that holds model_index.json")
    if not any(path.iterdir()):
        raise SourceError(f"model folder {path} is empty", "download or save the pipeline into it first")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise SourceError(
            f"{path} is not a diffusers pipeline (no model_index.json)",
            "save it with pipeline.save_pretrained(folder), or pass the pipeline's root folder",
        )
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise SourceError(f"{index_path} is not UTF-8 text", "restore the file from the original model") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"{index_path} is not valid JSON ({exc.msg})", "restore the file from the original model") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name", ""), str):
        raise SourceError(f"{index_path} is not a pipeline index (a JSON object with _class_name)",
                          "restore the file from the original model, or re-save the pipeline")
    class_name = index.get("_class_name", "?")
    family_of(class_name)  # raises for unsupported classes
    for sub in COMPONENT_DIRS:
        d = path / sub
        if sub not in index or index[sub] in (None, [None, None]):
            continue
        if not d.is_dir():
            raise SourceError(
                f"model_index.json lists '{sub}' but {d} is missing",
                "restore the component folder, or re-save the whole pipeline",
            )
        safes = list(d.glob("*.safetensors"))
        pickles = [p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not safes and pickles and not allow_pickle:
            raise SourceError(
                f"{d} has only pickled weights ({pickles[0].name}); pickles can run arbitrary code",
                "convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        if not safes and not pickles:
            raise SourceError(f"{d} has no weights", "re-download or re-save the pipeline")
        for f in safes:
            _check_safetensors(f)
    for encoder, tokenizer in TOKENIZER_OF.items():
        wanted = components is None or encoder in components
        if wanted and index.get(encoder) not in (None, [None, None]) and not (path / tokenizer).is_dir():
            raise SourceError(
                f"{path} has {encoder}/ but no {tokenizer}/: a text encoder is useless without its tokenizer",
                f"restore {tokenizer}/ from the original model, or leave the text encoders out with --components",
            )
    return index


def _check_safetensors(path: Path) -> None:
    """Read the header without loading tensors: catches truncated or corrupt files early."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            size = path.stat().st_size
            for key in keys[-1:]:  # the last tensor's end must lie inside the file
                f.get_slice(key)
        if size < 8:
            raise ValueError("file too short")
    except Exception as exc:
        raise SourceError(f"corrupt safetensors file {path}: {exc}", "re-download the weights") from None


def _load_folder(path: Path, allow_pickle: bool, empty: bool = False, components: list[str] | None = None,
                 hashes: HashCache | None = None) -> Source:
    from diffusers import DiffusionPipeline

    from exporters.streaming import empty_pipeline

    index = check_folder(path, allow_pickle, components)
    try:
        if empty:
            pipe = empty_pipeline(path)
        else:
            # use_safetensors=None: each component loads its safetensors where they exist and falls back to a
            # pickle only where they do not (False would make diffusers prefer .bin even beside safetensors).
            pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=None if allow_pickle else True,
                                                     local_files_only=True)
    except Exception as exc:
        raise SourceError(f"cannot load the pipeline in {path}: {type(exc).__name__}: {_first_line(exc)}",
                          "check that every component folder is complete") from None
    info = {"kind": "folder", "path": str(path.resolve()), "class": index.get("_class_name"),
            "weights_sha256": weights_digest(path, hashes)}
    return Source("folder", str(path), pipe, info, empty=empty)


def _load_hub(repo_id: str, allow_pickle: bool, revision: str | None) -> Source:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, revision=revision,
                                                 use_safetensors=None if allow_pickle else True,
                                                 trust_remote_code=False)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in str(exc).lower() or "offline" in str(exc).lower() \
            or "resolve" in str(exc).lower() or type(exc).__name__ in ("LocalEntryNotFoundError", "OSError")
        if offline:
            raise SourceError(
                f"cannot reach the Hugging Face Hub for '{repo_id}' (offline or no network)",
                "download the model elsewhere (huggingface-cli download) and pass the local folder",
            ) from None
        raise SourceError(f"cannot load '{repo_id}' from the Hub: {_first_line(exc)}",
                          f"supported pipelines: {', '.join(SUPPORTED)}") from None
    family_of(type(pipe).__name__)
    return Source("hub", repo_id, pipe, {"kind": "hub", "repo_id": repo_id, "revision": revision})


def weights_digest(path: Path, hashes: HashCache | None = None) -> str:
    """sha256 over every file of the folder (relative path and full sha256 of its bytes).

    Weights, configs, tokenizer and scheduler files all shape the export. `hashes` remembers
    each file's digest by path, size, mtime, ctime and inode, so a rerun re-reads nothing unchanged.
    """
    hashes = hashes or HashCache()
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(rel.as_posix().encode() + b"\0" + hashes.sha256(f).encode() + b"\n")
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_recorded(info: dict[str, Any], *, allow_pickle: bool = False) -> Source:
    """Reload the source an export recorded in its manifest (preset, folder or Hub id), with the LoRA
    adapters it recorded fused in."""
    if info.get("adapters"):
        from exporters import lora

        src = _load_recorded({k: v for k, v in info.items() if k != "adapters"}, allow_pickle=allow_pickle)
        lora.fuse(src.pipeline, lora.from_record(info["adapters"]))
        src.info = dict(info)
        return src
    return _load_recorded(info, allow_pickle=allow_pickle)


def _load_recorded(info: dict[str, Any], *, allow_pickle: bool = False) -> Source:
    kind = info.get("kind")
    if kind == "preset":
        pipe = presets.build(info["preset"], info.get("seed", 0))
        return Source("preset", info["preset"], pipe, dict(info))
    if kind == "folder":
        return _load_folder(Path(info["path"]), allow_pickle)
    if kind == "hub":
        return _load_hub(info["repo_id"], allow_pickle, info.get("revision"))
    if kind == "compressed":  # diffprism compress: the base source with the distilled students put in
        from exporters.compress.transform import load_student

        base = load_recorded(info["base"], allow_pickle=allow_pickle)
        load_student(base.pipeline, Path(info["path"]), list(info["components"]))
        return Source("compressed", info["path"], base.pipeline, dict(info))
    if kind == "refit":  # diffprism refit: the base source; load_recorded fuses the refit's adapters
        base = load_recorded(info["base"], allow_pickle=allow_pickle)
        return Source("refit", info["path"], base.pipeline, dict(info))
    raise SourceError("the manifest does not record a loadable source", "re-run 'diffprism export SOURCE --out DIR'")
