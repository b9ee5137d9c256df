"""Flux-size in bounded memory: each step in its own process, peak RSS of its process tree (50 ms samples).

    python benchmarks/flux_size.py --work /tmp/fluxsize                      # every step, flux-random
    python benchmarks/flux_size.py --work /tmp/fluxsize --steps materialise,export-bf16
    python benchmarks/flux_size.py --work /tmp/x --preset tiny-flux --dry-run  # the plan and disk figures

Steps, in order (pick with --steps):
  materialise    the preset's cache folder (bf16 shards), under <work>/cache
  export-bf16    streamed export of --component with --dtype bf16, references at one small point
  export-fp16    the same with --dtype fp16 (removed after it is measured: it only shows the figure)
  openvino-int8  OpenVINO int8 weight-only compile of the bf16 export
  validate       the int8 IR against the streamed references at the small point; then the export
                 (ONNX and IR) is removed, as the disk plan needs
  optimum        optimum-cli's ONNX export of the same folder, if ~/.cache/diffprism/venvs/optimum-onnx exists

Disk plan: before a step starts, what <work> holds plus the step's estimate must stay under
--max-disk (default 70G) and the free space; otherwise the step is refused (not started). Each row
reports exit code, wall seconds, peak RSS and peak RSS / the component's bf16 weight bytes, and a
per-stage profile (each RSS sample charged to the last log line of the step; logs in <work>/<step>.log).
Results go to <work>/results.json; --clean removes <work> at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tree_rss import run_profiled  # noqa: E402

STEPS = ("materialise", "export-bf16", "export-fp16", "openvino-int8", "validate", "optimum")
OPTIMUM_VENV = Path.home() / ".cache" / "diffprism" / "venvs" / "optimum-onnx"
# Disk a step adds, as a multiple of the component's bf16 weight bytes (the whole pipeline for materialise).
DISK_FACTOR = {"export-bf16": 1.05, "export-fp16": 1.05, "openvino-int8": 0.55, "optimum": 2.1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from exporters.memory import parse_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (cache, exports, results)")
    p.add_argument("--preset", default="flux-random", help="a materialised preset, or a tiny one (tests)")
    p.add_argument("--component", default="transformer")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    p.add_argument("--size", default="256", help="image size of the reference / validation point (pixels)")
    p.add_argument("--max-disk", default="70G", help="most bytes <work> may hold at once")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its disk figures, run nothing")
    p.add_argument("--clean", action="store_true", help="remove <work> when done")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    args.max_disk_bytes = parse_bytes(args.max_disk)
    if args.preset not in _presets():
        p.error(f"unknown preset {args.preset!r}")
    return args


def _presets():
    from diffprism import presets

    return presets.PRESETS


def weight_bytes(pipe) -> dict[str, int]:
    """bf16 bytes per pipeline part, from the meta-device build (nothing allocated)."""
    from diffprism import preset_cache

    return {k: 2 * sum(p.numel() for p in m.parameters()) for k, m in preset_cache._models(pipe).items()}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


def _cli(*args: str) -> list[str]:
    # -v: the stage lines the per-stage profile charges each RSS sample to (tree_rss.run_profiled)
    return [sys.executable, "-m", "diffprism.cli", "-v", *args]


def commands(args: argparse.Namespace) -> dict[str, list[str] | None]:
    w, c = args.work, args.component
    folder = f"$({sys.executable} -c 'from diffprism import presets; print(presets.folder({args.preset!r}))')"
    export = ["export", args.preset, "--components", c, "--size", args.size, "--reference-points", "opt"]
    optimum = OPTIMUM_VENV / "bin" / "optimum-cli"
    return {
        "materialise": [sys.executable, "-c", f"from diffprism import presets; print(presets.folder({args.preset!r}))"],
        "export-bf16": _cli(*export, "--out", str(w / "export-bf16"), "--dtype", "bf16"),
        "export-fp16": _cli(*export, "--out", str(w / "export-fp16"), "--dtype", "fp16"),
        "openvino-int8": _cli("compile", str(w / "export-bf16"), "--target", "openvino", "--precision", "int8",
                              "--option", "quantize_activations=[]"),
        "validate": _cli("validate", str(w / "export-bf16"), "--target", "openvino", "--precision", "int8"),
        "optimum": ["/bin/sh", "-c", f"{optimum} export onnx --model \"{folder}\" --task text-to-image "
                    f"{w / 'optimum'}"] if optimum.exists() else None,
    }


def disk_need(step: str, weights: dict[str, int], component_part: str) -> int:
    if step == "materialise":
        return sum(weights.values())
    return int(DISK_FACTOR.get(step, 0.0) * weights.get(component_part, 0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from exporters.families import family_of

    pipe = _empty(args.preset)
    weights = weight_bytes(pipe)
    family = family_of(type(pipe).__name__)
    part = next((comp.source for comp in family.components if comp.name == args.component), args.component)
    if part not in weights:
        print(f"{args.preset} has no component {args.component!r} ({', '.join(weights)})", file=sys.stderr)
        return 2
    cmds = commands(args)
    env = {**os.environ, "DIFFPRISM_CACHE": str(args.work / "cache")}
    rows = []
    plan = [{"step": s, "disk_bytes": disk_need(s, weights, part), "command": cmds[s]} for s in args.steps]
    if args.dry_run:
        print(json.dumps({"preset": args.preset, "component": args.component, "weights_bytes": weights,
                          "max_disk": args.max_disk_bytes, "plan": plan}, indent=2))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    for step in plan:
        name, cmd = step["step"], step["command"]
        if cmd is None:
            rows.append({"step": name, "skipped": f"{OPTIMUM_VENV} not found"})
            continue
        held = _du(args.work)
        free = shutil.disk_usage(args.work).free
        if held + step["disk_bytes"] > args.max_disk_bytes or step["disk_bytes"] > free:
            rows.append({"step": name, "refused": f"needs {step['disk_bytes'] / 1e9:.1f} GB with {held / 1e9:.1f} GB "
                         f"held ({args.max_disk_bytes / 1e9:.0f} GB allowed, {free / 1e9:.1f} GB free)"})
            break
        code, seconds, peak, stages = run_profiled(cmd, interval=0.05, env=env, log_path=args.work / f"{name}.log")
        rows.append({"step": name, "exit": code, "seconds": round(seconds, 1), "peak_rss": peak,
                     "peak_over_weights": round(peak / weights[part], 3), "disk_after": _du(args.work),
                     "stages": stages})
        print(json.dumps(rows[-1]), flush=True)
        if name == "export-fp16":
            shutil.rmtree(args.work / "export-fp16", ignore_errors=True)
        last_ov = "validate" if "validate" in args.steps else "openvino-int8"
        if name == last_ov:  # the disk plan: the ONNX export goes once its IR has been compiled (and judged)
            shutil.rmtree(args.work / "export-bf16", ignore_errors=True)
        if code != 0:
            break
    result = {"preset": args.preset, "component": args.component, "weights_bytes": weights[part], "rows": rows}
    (args.work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if all(r.get("exit", 0) == 0 and "refused" not in r for r in rows) else 1


def _empty(preset: str):
    from diffprism import preset_cache

    return preset_cache.empty_build(_presets()[preset].build, 0)


if __name__ == "__main__":
    sys.exit(main())
