"""Peak memory of a streamed component export, relative to the component's fp32 weight bytes.

    python benchmarks/export_memory.py save sd15-random /tmp/bench/sd15      # once: preset -> safetensors folder
    python benchmarks/export_memory.py component /tmp/bench/sd15 unet --out /tmp/bench/sd15-onnx

`component` exports one component in a fresh child process (multiprocessing spawn) from the saved
folder, weights streamed from its safetensors, and reports the child's peak RSS
(getrusage(RUSAGE_CHILDREN).ru_maxrss) divided by the component's weight bytes. `--plain` runs
the ordinary export (weights loaded with from_pretrained) for comparison.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae", "text_encoder": "text_encoder",
         "text_encoder_2": "text_encoder_2"}


def save(preset: str, folder: Path) -> None:
    from diffprism import presets

    if (folder / "model_index.json").is_file():
        print(f"{folder} exists")
        return
    presets.build(preset).save_pretrained(str(folder), safe_serialization=True)


def _child(folder: str, component: str, out: str, plain: bool) -> None:
    import gc

    from exporters.export import export_component, plan_specs
    from exporters import streaming

    if plain:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    else:
        pipe = streaming.empty_pipeline(Path(folder))
    _, specs = plan_specs(pipe, [component])
    export_component(pipe, specs[component], Path(out) / component, 18, streaming=not plain)
    gc.collect()


def component(folder: Path, name: str, out: Path, plain: bool) -> dict:
    weights = sum(f.stat().st_size for f in (folder / PARTS[name]).glob("*.safetensors"))
    start = time.perf_counter()
    proc = mp.get_context("spawn").Process(target=_child, args=(str(folder), name, str(out), plain))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"export failed (exit {proc.exitcode})")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    return {"component": name, "mode": "plain" if plain else "streaming", "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": peak, "weight_bytes": weights, "ratio": round(peak / weights, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("preset")
    s.add_argument("folder", type=Path)
    c = sub.add_parser("component")
    c.add_argument("folder", type=Path)
    c.add_argument("name", choices=sorted(PARTS))
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--plain", action="store_true")
    args = ap.parse_args()
    if args.cmd == "save":
        save(args.preset, args.folder)
    else:
        print(json.dumps(component(args.folder, args.name, args.out, args.plain)))


if __name__ == "__main__":
    main()
