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
import shutil
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
    # Older transformers (optimum's venv) read the slow tokenizer files; newer ones save tokenizer.json only.
    assets = Path(presets.__file__).parent / "assets" / "tokenizer"
    for sub in ("tokenizer", "tokenizer_2"):
        if (folder / sub).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copy2(assets / name, folder / sub / name)


class _StageProfile:
    """Per-stage memory of the export: RSS entering and leaving each stage, the highest RSS sampled
    during it (a thread reads /proc/self/statm every 10 ms), and the process high-water mark
    (ru_maxrss) when it ends, so the stage that set the peak is the one where that mark moved."""

    def __init__(self):
        import os
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.rows: list[dict] = []
        self.stack: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self.stop.wait(0.01):
            rss = self.rss()
            for row in self.stack:
                row["max"] = max(row["max"], rss)

    def wrap(self, owner, attr: str, label: str) -> None:
        import functools

        original = getattr(owner, attr)

        @functools.wraps(original)
        def staged(*args, **kwargs):
            row = {"stage": label, "depth": len(self.stack), "start": self.rss(), "max": 0}
            row["max"] = row["start"]
            self.rows.append(row)
            self.stack.append(row)
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()
                row["end"] = self.rss()
                row["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        setattr(owner, attr, staged)

    def install(self) -> None:
        import onnx
        import onnx_ir
        import torch
        from torch.onnx._internal.exporter._onnx_program import ONNXProgram

        from exporters import export, onnx_writer, streaming

        self.wrap(streaming, "empty_pipeline", "build the pipeline on meta")
        self.wrap(export, "export_component", "export the component (all stages)")
        self.wrap(streaming, "trace", "torch.export trace (fake weights)")
        self.wrap(torch.onnx, "export", "torch.onnx translation to ONNX IR")
        self.wrap(streaming._Binder, "prepare", "stand-ins for large weights")
        self.wrap(ONNXProgram, "optimize", "onnxscript optimizer")
        self.wrap(streaming._Binder, "bind", "bind initializers to the source")
        self.wrap(onnx_ir, "save", "write model.onnx + weights")
        self.wrap(onnx.checker, "check_model", "onnx.checker")
        self.wrap(onnx_writer, "save", "save (write + check)")


def _child(folder: str, component: str, out: str, plain: bool, profile: str | None = None) -> None:
    import gc

    if profile:
        import torch  # noqa: F401  the imports below are part of the baseline

        prof = _StageProfile()
        prof.install()
        prof.rows.append({"stage": "imports (torch, diffusers, onnx, ...)", "depth": 0, "start": 0,
                          "end": prof.rss(), "max": prof.rss(), "maxrss": 0})

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
    if profile:
        prof.stop.set()
        Path(profile).write_text(json.dumps(prof.rows, indent=1))


def profile_table(rows: list[dict]) -> str:
    gb = 1e9
    lines = ["| stage | RSS entering (GB) | RSS leaving (GB) | max RSS during (GB) | high-water mark after (GB) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        indent = "&nbsp;&nbsp;" * r["depth"]
        lines.append(f"| {indent}{r['stage']} | {r['start'] / gb:.2f} | {r['end'] / gb:.2f} | {r['max'] / gb:.2f} | "
                     f"{r['maxrss'] / gb:.2f} |")
    return "\n".join(lines)


def component(folder: Path, name: str, out: Path, plain: bool, profile: Path | None = None) -> dict:
    weights = sum(f.stat().st_size for f in (folder / PARTS[name]).glob("*.safetensors"))
    start = time.perf_counter()
    proc = mp.get_context("spawn").Process(target=_child, args=(str(folder), name, str(out), plain, str(profile) if profile else None))
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
    c.add_argument("--profile", type=Path, help="write a per-stage RSS profile (JSON) here and print it as a table")
    args = ap.parse_args()
    if args.cmd == "save":
        save(args.preset, args.folder)
    else:
        print(json.dumps(component(args.folder, args.name, args.out, args.plain, args.profile)))
        if args.profile:
            print(profile_table(json.loads(args.profile.read_text())))


if __name__ == "__main__":
    main()
