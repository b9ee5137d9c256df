"""diffprism bench DIR: latency, peak memory and size per component and per image, PyTorch eager as baseline."""
from __future__ import annotations

import argparse

from diffprism.commands.common import add_components, out_dir, parse_options
from exporters.errors import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark every target built in DIR against PyTorch eager")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--target", action="append", metavar="TARGET[:PRECISION]",
                   help="bench only these variants (repeatable; default: every variant built in DIR)")
    add_components(p)
    p.add_argument("--size", help="N or HxW in pixels (default: the export's preferred size)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1; the denoiser runs 2 latents "
                   "per image under guidance)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per component (default 2)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per component (default 10)")
    p.add_argument("--image-runs", type=int, default=3, help="timed images per variant, after one warm-up (0: none)")
    p.add_argument("--option", action="append", help="runner option KEY=VALUE (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.e2e_jobs import bench_job, parse_size
    from diffprism.lock import folder_lock
    from diffprism.placement import Placement, built_variants
    from exporters.errors import UsageError

    for flag in ("steps", "batch", "repeat"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1", f"pass e.g. --{flag} 2")
    if args.warmup < 0 or args.image_runs < 0:
        raise UsageError("--warmup and --image-runs cannot be negative", "pass 0 or more")
    variants = [Placement.parse(t, args.dir) for t in args.target] if args.target else built_variants(args.dir)
    size = parse_size(args.size, args.dir)
    with folder_lock(args.dir), ui.progress("bench") as update:
        result = bench_job(args.dir, variants, size=size, steps=args.steps, batch=args.batch, warmup=args.warmup,
                           repeat=args.repeat, image_runs=args.image_runs, components=args.components,
                           runner_options=parse_options(args.option), progress=update)
    print_bench(ui, result)
    ui.emit({"ok": True, **result})
    return EXIT_OK


def print_bench(ui, result) -> None:
    from validation.report import runs_as

    s = result["settings"]
    rows = []
    for e in result["images"]:
        if "error" in e:
            rows.append([e["target"], "-", "-", "-", "-", f"[red]{e['error']}[/]"])
            continue
        ran = ", ".join(dict.fromkeys(runs_as(d) for d in (e.get("runner") or {}).values()))
        rows.append([e["target"], f"{e['median_ms'] / 1e3:.2f} s", f"{e['p90_ms'] / 1e3:.2f} s",
                     f"{e.get('speedup', float('nan')):.2f}x", f"{e['peak_rss_delta_bytes'] / 2**20:.0f} MiB", ran])
    if rows:
        ui.table(f"per image: {s['size'][0]}x{s['size'][1]}, {s['steps']} steps",
                 ["variant", "median", "p90", "vs torch", "peak RSS delta", "runs as / note"], rows)
    rows = []
    for e in result["components"]:
        size = f"{e['artifact_bytes'] / 2**20:.1f} MiB" if e.get("artifact_bytes") is not None else "-"
        if "error" in e:
            rows.append([e["component"], e["target"], "-", "-", "-", "-", size, f"[red]{e['error']}[/]"])
            continue
        rows.append([e["component"], e["target"], f"{e['median_ms']:.1f}", f"{e['p90_ms']:.1f}",
                     f"{e.get('speedup', float('nan')):.2f}x", f"{e['peak_rss_delta_bytes'] / 2**20:.0f} MiB", size,
                     runs_as(e.get("runner"))])
    ui.table(f"per component: batch {s['batch']}, {s['warmup']} warm-up + {s['repeat']} timed runs",
             ["component", "variant", "median ms", "p90 ms", "vs torch", "peak RSS delta", "size", "runs as / note"], rows)
    ui.info(f"memory: {result['memory_method']}")
