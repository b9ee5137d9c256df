"""diffprism validate DIR: run artifacts on their runtime and compare with the PyTorch references."""
from __future__ import annotations

import argparse

from diffprism.commands.common import add_components, out_dir, parse_options
from diffprism.jobs import validate_job
from diffprism.lock import folder_lock
from exporters.errors import EXIT_OK, EXIT_VALIDATION_FAILED
from validation.policy import Policy


def register(sub) -> None:
    p = sub.add_parser("validate", help="compare built artifacts with PyTorch (exit 1 on any failure)")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--target", "--runtime", dest="target", default="onnxruntime",
                   help="onnxruntime (default), openvino, tensorrt, coreml")
    p.add_argument("--precision", default="fp32", help="variant to validate (default fp32)")
    add_components(p)
    p.add_argument("--rel-l2", type=float, help="override the relative L2 bound for this run")
    p.add_argument("--cosine", type=float, help="override the cosine lower bound for this run")
    p.add_argument("--option", action="append", help="runner option KEY=VALUE (repeatable)")
    p.set_defaults(func=run)


def policy_from(args: argparse.Namespace, components: list[str]) -> Policy:
    policy = Policy()
    bounds = {k: v for k, v in (("rel_l2", args.rel_l2), ("cosine", args.cosine)) if v is not None}
    if bounds:
        for name in components:
            policy = policy.with_override(args.precision, name, **bounds)
    return policy


def run(args: argparse.Namespace, ui) -> int:
    from diffprism.jobs import select, tree_specs

    _, specs = tree_specs(args.dir)
    names = list(select(specs, args.components))
    with folder_lock(args.dir), ui.progress(f"validate {args.target} {args.precision}") as update:
        result = validate_job(args.dir, target=args.target, precision=args.precision, components=args.components,
                              policy=policy_from(args, names), runner_options=parse_options(args.option),
                              progress=update)
    print_result(ui, result)
    ui.emit({"ok": result.passed, **result.to_json()})
    return EXIT_OK if result.passed else EXIT_VALIDATION_FAILED


def print_result(ui, result) -> None:
    rows = []
    for c in result.comparisons:
        dims = " ".join(f"{k}={v}" for k, v in c.dims.items())
        if c.error:
            rows.append([c.component, c.point, dims, "-", "-", "-", f"[red]FAIL[/] {c.error}"])
            continue
        bad = "; ".join(v for o in c.outputs for v in o.violations)
        verdict = "[green]pass[/]" if c.passed else f"[red]FAIL[/] {bad}"
        rows.append([c.component, c.point, dims, f"{c.worst('rel_l2'):.2e}", f"{c.worst('cosine'):.6f}",
                     f"{c.worst('max_abs'):.2e}", verdict])
    runner = next(iter(result.runner.values()), {})
    title = f"validation: {result.target} {result.precision} vs PyTorch ({', '.join(f'{k}={v}' for k, v in runner.items())})"
    ui.table(title, ["component", "point", "dims", "rel L2", "cosine", "max abs", "verdict"], rows)
    status = "[green]PASSED[/]" if result.passed else "[red]FAILED[/]"
    ui.info(f"{status}: {sum(c.passed for c in result.comparisons)}/{len(result.comparisons)} comparisons within tolerance")
