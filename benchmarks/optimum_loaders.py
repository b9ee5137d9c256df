"""Load diffprism trees in optimum's own pipelines and check they draw what diffusers draws.

    make optimum-venvs                                   # once: the two venvs, from the pins below
    .venv/bin/python benchmarks/optimum_loaders.py build/tiny-sd build/tiny-sdxl [--json results.json]

Each argument is a diffprism export folder (its manifest.json names the source). For each one:
- PyTorch: the source pipeline (diffusers, in this interpreter) draws one image from a fixed
  prompt and seed;
- `ORTDiffusionPipeline.from_pretrained(DIR/onnx)` runs in the optimum-onnx venv and
  `OVDiffusionPipeline.from_pretrained(DIR/openvino-fp32)` in the optimum-intel venv (compile it
  first: `diffprism compile DIR --target openvino --precision fp32`), each drawing the same image
  (same prompt, steps, guidance and generator seed, so the same initial latents).
One JSON row per (tree, loader): load ok or the error, load and generation seconds, the image
shape, and the largest absolute pixel difference from PyTorch. Exit 1 if any tree did not load.

optimum pins older transformers and diffusers than diffprism, so each loader runs in its own
virtual environment (benchmarks/optimum-onnx.txt, benchmarks/optimum-intel.txt; default paths
under ~/.cache/diffprism/venvs). The child side of this file (`child`) imports only what those
venvs have.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENVS = Path(os.environ.get("DIFFPRISM_VENVS", Path.home() / ".cache" / "diffprism" / "venvs"))
PROMPT = "a red circle on a blue background"
# name -> (venv, tree subfolder, optimum class, module that holds it, packages whose versions are recorded)
LOADERS = {
    "ort": ("optimum-onnx", "onnx", "ORTDiffusionPipeline", "optimum.onnxruntime",
            ("optimum", "optimum-onnx", "onnxruntime")),
    "ov": ("optimum-intel", "openvino-fp32", "OVDiffusionPipeline", "optimum.intel",
           ("optimum", "optimum-intel", "openvino", "nncf")),
}
COMMON = ("torch", "transformers", "diffusers", "tokenizers", "huggingface_hub", "numpy")


def _call(pipe, size: tuple[int, int], steps: int, guidance: float, seed: int):
    """One generation with the settings both sides share; the image as float32 NHWC in [0, 1]."""
    import numpy as np
    import torch

    out = pipe(PROMPT, height=size[0], width=size[1], num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def child(args: argparse.Namespace) -> None:
    """Inside an optimum venv: load the tree with the loader's class, draw, compare with PyTorch's image."""
    import importlib
    from importlib import metadata

    import numpy as np

    venv, _, cls_name, module, packages = LOADERS[args.loader]
    row: dict = {"loader": cls_name, "tree": str(args.tree), "versions": {}}
    for pkg in (*packages, *COMMON):
        try:
            row["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        start = time.perf_counter()
        kwargs = {}
        if args.loader == "ov" and args.ov_hint != "default":
            # OpenVINO's CPU plugin computes in bf16 where the CPU has it (AVX-512 BF16, AMX) unless told
            # otherwise, which moves the image by ~1e-2: the fp32 tree is judged at fp32.
            kwargs["ov_config"] = {"INFERENCE_PRECISION_HINT": args.ov_hint}
            row["ov_inference_precision_hint"] = args.ov_hint
        pipe = getattr(importlib.import_module(module), cls_name).from_pretrained(str(args.tree), **kwargs)
        row["load_seconds"] = round(time.perf_counter() - start, 2)
        row["pipeline_class"] = type(pipe).__name__
        row["load_ok"] = True
    except Exception as exc:  # the point of the check: report why a tree does not load
        row.update(load_ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        print(json.dumps(row))
        return
    try:
        start = time.perf_counter()
        image = _call(pipe, (args.height, args.width), args.steps, args.guidance, args.seed)
        row["generate_seconds"] = round(time.perf_counter() - start, 2)
        row["image_shape"] = list(image.shape)
        reference = np.load(args.reference)
        if reference.shape == image.shape:
            row["max_abs_diff_vs_torch"] = float(np.abs(image - reference).max())
        else:
            row["error"] = f"image shape {list(image.shape)} differs from PyTorch's {list(reference.shape)}"
    except Exception as exc:
        row["error"] = f"generation failed: {type(exc).__name__}: {exc}"[:2000]
    print(json.dumps(row))


def _torch_image(export: Path, size: tuple[int, int], args: argparse.Namespace, dest: Path) -> dict:
    """The source pipeline's image, in this interpreter (diffprism's venv)."""
    import numpy as np

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # a diffprism on PYTHONPATH comes first
    from importlib import metadata

    from diffprism import sources

    manifest = json.loads((export / "manifest.json").read_text())
    pipe = sources.load_recorded(manifest["source"]).pipeline
    start = time.perf_counter()
    image = _call(pipe, size, args.steps, args.guidance, args.seed)
    np.save(dest, image)
    return {"loader": "diffusers (PyTorch source)", "pipeline_class": type(pipe).__name__,
            "generate_seconds": round(time.perf_counter() - start, 2), "image_shape": list(image.shape),
            "versions": {p: metadata.version(p) for p in ("torch", "transformers", "diffusers")}}


def _default_size(tree: Path) -> tuple[int, int]:
    geo = json.loads((tree / "diffprism.json").read_text())["geometry"]
    side = geo["default_latent"] * geo["vae_scale_factor"]
    return side, side


def run(args: argparse.Namespace) -> int:
    rows, failed = [], False
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # local folders only; nothing from diffprism's venv
    with tempfile.TemporaryDirectory(prefix="optimum-loaders-") as tmp:
        for export in args.exports:
            size = tuple(args.size) if args.size else _default_size(export / "onnx")
            reference = Path(tmp) / f"{len(rows)}.npy"
            torch_row = _torch_image(export, size, args, reference)
            rows.append({"export": str(export), "size": list(size), **torch_row})
            print(json.dumps(rows[-1]), flush=True)
            for name in args.loader or list(LOADERS):
                venv, sub = LOADERS[name][:2]
                python = Path(getattr(args, f"{name}_python") or VENVS / venv / "bin" / "python")
                tree = export / sub
                if not tree.is_dir():
                    row = {"loader": LOADERS[name][2], "tree": str(tree), "load_ok": False,
                           "error": f"no {sub}/ in {export}" + (
                               " (diffprism compile DIR --target openvino --precision fp32)" if name == "ov" else "")}
                elif not python.is_file():
                    row = {"loader": LOADERS[name][2], "tree": str(tree), "load_ok": False,
                           "error": f"no interpreter at {python} (make optimum-venvs)"}
                else:
                    cmd = [str(python), __file__, "child", name, str(tree), "--reference", str(reference),
                           "--height", str(size[0]), "--width", str(size[1]), "--steps", str(args.steps),
                           "--guidance", str(args.guidance), "--seed", str(args.seed), "--ov-hint", args.ov_hint]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                    row = json.loads(lines[-1]) if lines else {
                        "loader": LOADERS[name][2], "tree": str(tree), "load_ok": False,
                        "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
                row = {"export": str(export), **row}
                failed |= not row.get("load_ok") or "error" in row
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if failed else 0


def main() -> None:
    if sys.argv[1:2] == ["child"]:  # inside an optimum venv (see run)
        c = argparse.ArgumentParser(prog="optimum_loaders.py child")
        c.add_argument("loader", choices=list(LOADERS))
        c.add_argument("tree", type=Path)
        c.add_argument("--reference", type=Path, required=True)
        for flag in ("--height", "--width", "--steps", "--seed"):
            c.add_argument(flag, type=int, required=True)
        c.add_argument("--guidance", type=float, required=True)
        c.add_argument("--ov-hint", default="f32")
        child(c.parse_args(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", type=Path, nargs="+", help="diffprism export folders (with manifest.json)")
    ap.add_argument("--loader", choices=list(LOADERS), action="append", help="only these (default: both)")
    ap.add_argument("--ort-python", help="python of the optimum-onnx venv")
    ap.add_argument("--ov-python", help="python of the optimum-intel venv")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="pixels (default: the tree's)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ov-hint", default="f32", choices=("f32", "bf16", "f16", "default"),
                    help="OpenVINO INFERENCE_PRECISION_HINT for OVDiffusionPipeline (default f32; 'default': "
                         "the plugin's own choice, bf16 on CPUs that have it)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per loader run")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    raise SystemExit(run(ap.parse_args()))


if __name__ == "__main__":
    main()
