"""Deploy-time speed of OpenVINO variants: diffprism's own runtime against optimum-intel, one run back to back.

    # once: an export with the fp16 and the calibrated full-scheme int8 variants
    python benchmarks/openvino_deploy.py prepare sd15-random /tmp/bench/ovdeploy
    # the table (each row a fresh process, one after the other; optimum-intel in its own venv)
    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/openvino_deploy.py run /tmp/bench/ovdeploy \\
        --source /tmp/bench/sd15 --optimum-python /tmp/optimum-venv/bin/python

Rows (one image each, same prompt, seed, size, steps and guidance; seconds of the image alone,
every model compiled before the timed call, as both pipelines do at load):
- optimum-intel `OVDiffusionPipeline` on its own fp16 and int8 (weight-only) IRs, exported from
  `--source` (a saved diffusers folder) with `optimum-cli export openvino --weight-format fp16|int8`,
  at OpenVINO's default hint;
- `diffprism generate --target openvino --precision fp16|int8`, as deployed (the device's default
  inference precision), then the same two with `--option hint=bf16`;
- optimum-intel's pipeline driving diffprism's openvino-fp16 / openvino-int8 trees;
- `diffprism bench --size S --steps N`: every variant built next to PyTorch eager, in one run.
Without `--optimum-python` the optimum-intel rows are left out (a smoke run on tiny-sd needs none).
The per-row runtime configuration (the inference precision read back from each compiled model)
is printed beside the seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"

# Run inside optimum-intel's venv: load a tree with OVDiffusionPipeline (compiled at load), draw one image.
OPTIMUM_DRIVER = r"""
import json, sys, time
import numpy as np
import torch
from optimum.intel import OVDiffusionPipeline
folder, prompt, size, steps, guidance, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
start = time.perf_counter()
pipe = OVDiffusionPipeline.from_pretrained(folder, device="CPU")
pipe.compile()
load = time.perf_counter() - start
start = time.perf_counter()
pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
     generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
seconds = time.perf_counter() - start
precision = {}
for name in ("text_encoder", "unet", "vae_decoder"):
    request = getattr(getattr(pipe, name, None), "request", None)
    try:
        compiled = request.get_compiled_model() if hasattr(request, "get_compiled_model") else request
        precision[name] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception as exc:  # an optimum-intel version that keeps the compiled model elsewhere
        precision[name] = f"? ({type(exc).__name__})"
print(json.dumps({"seconds": round(seconds, 2), "load_seconds": round(load, 2), "inference_precision": precision}))
"""


def _beside(out: Path, ext: str) -> Path:
    """Files of this script go next to the set, never into it (the manifest lists what the set holds)."""
    return out.with_name(f"{out.name}-openvino_deploy.{ext}")


def _run(cmd: list[str], log: Path, env: dict | None = None) -> str:
    with open(log, "a") as err:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}), see {log}: {' '.join(cmd)}")
    return done.stdout


def _diffprism(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffprism.cli", "-q", *args]


def prepare(source: str, out: Path, log: Path) -> None:
    """Export, capture calibration, build openvino fp16 and the full-scheme calibrated int8 (each once)."""
    if not (out / "onnx").is_dir():
        _run(_diffprism("export", source, "--out", str(out)), log)
    _run(_diffprism("compile", str(out), "--target", "openvino", "--precision", "fp16"), log)
    _run(_diffprism("compile", str(out), "--target", "openvino", "--precision", "int8", "--option", "int8_scheme=full"),
         log)


def generate_row(out: Path, precision: str, size: int, steps: int, log: Path, hint: str | None = None) -> dict:
    cmd = _diffprism("--json", "generate", str(out), "--target", "openvino", "--precision", precision,
                     "--prompt", PROMPT, "--size", str(size), "--steps", str(steps), "--out", str(_beside(out, "png")))
    if hint:
        cmd += ["--option", f"hint={hint}"]
    doc = json.loads(_run(cmd, log))
    used = {n: r.get("inference_precision") for n, r in doc["runner"].items()}
    return {"seconds": doc["seconds"], "load_seconds": doc.get("load_seconds"), "inference_precision": used,
            "variant": doc["label"], "command": " ".join(cmd[1:])}


def optimum_row(python: str, folder: Path, size: int, steps: int, log: Path) -> dict:
    cmd = [python, "-c", OPTIMUM_DRIVER, str(folder), PROMPT, str(size), str(steps), "7.5", "0"]
    return {**json.loads(_run(cmd, log).strip().splitlines()[-1]), "command": f"OVDiffusionPipeline({folder})"}


def optimum_export(python: str, source: Path, dst: Path, weight_format: str, log: Path) -> Path:
    if not (dst / "model_index.json").is_file():
        cli = Path(python).with_name("optimum-cli")
        _run([str(cli), "export", "openvino", "--model", str(source), "--task", "text-to-image",
              "--weight-format", weight_format, str(dst)], log)
    return dst


def run(args: argparse.Namespace) -> dict:
    out, log = args.dir, _beside(args.dir, "log")
    rows: dict[str, dict] = {}
    size, steps = args.size, args.steps
    if args.optimum_python:
        if not args.source:
            raise SystemExit("--optimum-python needs --source (the saved diffusers folder optimum-intel exports)")
        for fmt in ("fp16", "int8"):
            ir = optimum_export(args.optimum_python, args.source, args.work / f"optimum-{fmt}", fmt, log)
            rows[f"optimum-intel, its {fmt} IR"] = optimum_row(args.optimum_python, ir, size, steps, log)
    for precision in ("fp16", "int8"):
        rows[f"diffprism generate openvino {precision}"] = generate_row(out, precision, size, steps, log)
    for precision in ("fp16", "int8"):
        rows[f"diffprism generate openvino {precision}, hint=bf16"] = generate_row(out, precision, size, steps, log,
                                                                                 hint="bf16")
    if args.optimum_python:
        for precision in ("fp16", "int8"):
            tree = rows[f"diffprism generate openvino {precision}"]["variant"]  # the variant's key names its folder
            rows[f"optimum-intel driving diffprism's {tree}"] = optimum_row(args.optimum_python, out / tree, size,
                                                                           steps, log)
    bench = json.loads(_run(_diffprism("--json", "bench", str(out), "--size", str(size), "--steps", str(steps),
                                       "--image-runs", str(args.image_runs), "--warmup", "1", "--repeat", "3"), log))
    images = {e["target"]: e for e in bench["images"]}
    return {"size": size, "steps": steps, "load_average_start": os.getloadavg()[0], "rows": rows,
            "bench_images": {k: {"median_s": round(v["median_ms"] / 1e3, 2) if "median_ms" in v else None,
                                 "speedup": v.get("speedup"), "error": v.get("error"),
                                 "runner": {n: r.get("inference_precision") for n, r in (v.get("runner") or {}).items()}}
                             for k, v in images.items()}}


def table(result: dict) -> str:
    lines = [f"{result['size']}x{result['size']}, {result['steps']} steps, one image per row", "",
             "| pipeline | seconds per image | load s | inference precision |", "| --- | --- | --- | --- |"]
    for name, r in result["rows"].items():
        used = ", ".join(sorted(set((r.get("inference_precision") or {}).values()))) or "?"
        lines.append(f"| {name} | {r['seconds']:.2f} | {r.get('load_seconds') or 0:.2f} | {used} |")
    lines += ["", "| `diffprism bench` variant | median s per image | vs torch | inference precision |",
              "| --- | --- | --- | --- |"]
    for name, r in result["bench_images"].items():
        used = ", ".join(sorted({v for v in r["runner"].values() if v})) or "-"
        seconds = f"{r['median_s']:.2f}" if r["median_s"] is not None else f"error: {r['error']}"
        lines.append(f"| {name} | {seconds} | {r['speedup'] or 0:.2f}x | {used} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="export SOURCE into DIR and build openvino fp16 and calibrated full int8")
    p.add_argument("source", help="preset name or saved diffusers folder")
    p.add_argument("dir", type=Path)
    r = sub.add_parser("run", help="measure every row, back to back")
    r.add_argument("dir", type=Path, help="folder made by 'prepare'")
    r.add_argument("--source", type=Path, help="saved diffusers folder optimum-intel exports its own IRs from")
    r.add_argument("--optimum-python", help="python of a venv with optimum-intel (optimum-cli next to it)")
    r.add_argument("--work", type=Path, default=Path("/tmp/bench/ovdeploy-optimum"))
    r.add_argument("--size", type=int, default=512)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--image-runs", type=int, default=1)
    args = ap.parse_args()
    if args.command == "prepare":
        args.dir.parent.mkdir(parents=True, exist_ok=True)
        prepare(args.source, args.dir, _beside(args.dir, "log"))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    _beside(args.dir, "json").write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
