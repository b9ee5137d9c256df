"""Tokenizer folders of the exported tree: every file the source has, plus what older transformers reads."""
from __future__ import annotations

import json

import pytest

from exporters.families import family_of
from exporters.tree import write_pipeline_files

PRESETS = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module")
def source_folders(pipeline, tmp_path_factory):
    """Each preset saved as a diffusers folder, its tokenizers with the extra files Hub folders carry."""
    from diffprism import presets

    root = tmp_path_factory.mktemp("tokenizer-sources")
    folders = {}
    for name in PRESETS:
        pipe = pipeline(name)
        folder = root / name
        pipe.save_config(folder)
        for tok_name in family_of(type(pipe).__name__).tokenizers:
            tok = getattr(pipe, tok_name)
            tok.save_pretrained(folder / tok_name)
            extra = {"special_tokens_map.json": json.dumps({"pad_token": str(tok.pad_token)}),
                     "added_tokens.json": "{}"}
            if type(tok).__name__.startswith("CLIP"):  # as CLIP folders on the Hub hold them
                for asset in ("vocab.json", "merges.txt"):
                    extra[asset] = (presets.resources.files("diffprism") / "assets" / "tokenizer" / asset).read_text()
            for file, text in extra.items():
                (folder / tok_name / file).write_text(text)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("preset", PRESETS)
def test_tokenizer_folders_hold_every_source_file(pipeline, source_folders, tmp_path, preset):
    pipe = pipeline(preset)
    source = source_folders[preset]
    tokenizers = family_of(type(pipe).__name__).tokenizers
    write_pipeline_files(pipe, tmp_path, tokenizers, source_dir=source)
    for tok_name in tokenizers:
        src = source / tok_name
        for f in src.iterdir():
            copied = tmp_path / tok_name / f.name
            assert copied.is_file(), f"{tok_name}/{f.name} was dropped"
            if f.name != "tokenizer_config.json":  # rewritten only where older transformers needs a mapping
                assert copied.read_bytes() == f.read_bytes(), f"{tok_name}/{f.name} differs from the source"


@pytest.mark.parametrize("preset", ("tiny-sd", "tiny-sdxl"))
def test_clip_tokenizers_of_a_preset_export_carry_vocab_and_merges(exported, preset):
    """Older transformers reads vocab.json + merges.txt, not tokenizer.json: the files load and agree."""
    from transformers import AutoTokenizer

    tree = exported(preset) / "onnx"
    for folder in sorted(tree.glob("tokenizer*")):
        model = json.loads((folder / "tokenizer.json").read_text())["model"]
        assert json.loads((folder / "vocab.json").read_text()) == model["vocab"]
        merges = [line.split() for line in (folder / "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#")]
        assert merges == [list(m) if isinstance(m, list) else m.split() for m in model["merges"]]
        assert AutoTokenizer.from_pretrained(folder)("a red cube").input_ids


def test_t5_tokenizer_is_built_from_the_shipped_vocabulary():
    from diffprism import presets

    tok = presets.t5_tokenizer()
    ids = tok("a red cube on a blue table").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.unk_token_id not in ids  # every word is in the vocabulary
    assert tok.model_max_length == presets.T5_MAX_LENGTH
