"""benchmarks/lora_refit.py's argument handling and LoRA file, on tiny-sd (no measured runs)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("lora_refit")


def test_arguments_and_commands(bench, tmp_path):
    args = bench.parse_args(["tiny-sd", "--work", str(tmp_path), "--rank", "2", "--scale", "0.5"])
    assert (args.source, args.rank, args.scale, args.interval) == ("tiny-sd", 2, 0.5, 0.05)
    assert bench.parse_args(["--work", str(tmp_path)]).source == "sd15-random"
    assert bench.parse_args(["--work", str(tmp_path)]).rank == 16
    for bad in (["--rank", "0"], ["--interval", "0"], []):
        with pytest.raises(SystemExit):
            bench.parse_args(["tiny-sd", *bad] if bad else ["tiny-sd"])
    cmds = bench.commands(args, tmp_path / "l.safetensors")
    assert cmds["reexport"][-2:] == ["--lora", f"{tmp_path / 'l.safetensors'}:0.5"]
    assert cmds["refit"][cmds["refit"].index("refit") + 1] == str(tmp_path / "base")
    assert "--lora" not in cmds["base"] and cmds["base"][-2:] == ["--components", "unet"]


def test_lora_file_has_the_rank(bench, tmp_path):
    pytest.importorskip("peft", reason="the LoRA file needs peft")
    from safetensors import safe_open

    path = bench.make_lora("tiny-sd", 2, tmp_path / "lora")
    with safe_open(str(path), framework="pt") as f:
        downs = [k for k in f.keys() if ".lora_A." in k]
        assert downs and all(f.get_slice(k).get_shape()[0] == 2 for k in downs)
