"""diffprism validate DIR: run artifacts on their runtime and compare with the PyTorch references."""
from __future__ import annotations

import argparse

from diffprism import manifest
from diffprism.commands.common import add_components, out_dir, parse_options
from diffprism.commands.imagecheck import add_e2e_args, print_e2e, run_e2e
from diffprism.e2e_jobs import report_job
from diffprism.jobs import validate_job
from diffprism.lock import folder_lock
from exporters.errors import EXIT_OK, EXIT_VALIDATION_FAILED
from validation.policy import Policy


def register(sub) -> None:
    p = sub.add_parser("validate", help="compare built artifacts with PyTorch (exit 1 on any failure)")
    p.add_argument("dir", type=out_dir, help="folder written by 'diffprism export'")
    p.add_argument("--target", "--runtime", dest="target", default="onnxruntime",
                   help="onnxruntime (default), openvino, tensorrt, coreml, web, aotinductor, torch_tensorrt")
    p.add_argument("--precision", default=None, help="variant to validate (default: the target's, fp32; Core ML fp16)")
    add_components(p)
    p.add_argument("--rel-l2", type=float, help="override the relative L2 bound for this run")
    p.add_argument("--cosine", type=float, help="override the cosine lower bound for this run")
    p.add_argument("--option", action="append", help="runner option KEY=VALUE (repeatable); target options "
                   "such as compress=palettize4 pick the variant")
    p.add_argument("--require-numeric", action="store_true",
                   help="exit 1 unless numerics ran (a structural-only check, e.g. Core ML off macOS, exits 0 by default)")
    add_e2e_args(p)
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

    from diffprism.bundle_jobs import is_pipeline_target
    from diffprism.commands.imagecheck import run_pipeline_target
    from targets.base import get_target

    _, specs = tree_specs(args.dir)
    args.precision = args.precision or get_target(args.target).Config.model_fields["precision"].default
    if is_pipeline_target(args.target):  # web: judged by the image its page draws
        return run_pipeline_target(args, ui)
    names = list(select(specs, args.components))
    with folder_lock(args.dir), manifest.one_write(args.dir), \
            ui.progress(f"validate {args.target} {args.precision}") as update:
        result = validate_job(args.dir, target=args.target, precision=args.precision, components=args.components,
                              policy=policy_from(args, names), runner_options=parse_options(args.option),
                              progress=update)
        images = run_e2e(args, update, parse_options(args.option)) if args.e2e else []
        report_job(args.dir)
    if result.status == "structural":
        # Structure checked, numerics not run: exit 0 unless the structure is wrong or numerics are required.
        ok = result.structure_ok and not args.require_numeric and all(r.passed for r in images)
        print_structural(ui, result, args.require_numeric)
        print_e2e(ui, images)
        ui.emit({"ok": ok, **result.to_json(), "e2e": [r.to_json() for r in images], **_failure(ok, result)})
        return EXIT_OK if ok else EXIT_VALIDATION_FAILED
    print_result(ui, result)
    print_e2e(ui, images)
    passed = result.passed and all(r.passed for r in images)
    ui.emit({"ok": passed, **result.to_json(), "e2e": [r.to_json() for r in images], **_failure(passed, result)})
    return EXIT_OK if passed else EXIT_VALIDATION_FAILED


def _failure(ok: bool, result) -> dict:
    """--json carries error and fix on every failure, a failed verdict included."""
    if ok:
        return {}
    return {"exit_code": EXIT_VALIDATION_FAILED,
            "error": f"validation of {result.target} {result.precision} failed ({result.verdict})",
            "fix": "see the failed comparisons; loosen a bound with --rel-l2/--cosine only if the error is expected"}


def print_result(ui, result) -> None:
    rows = []
    for c in result.comparisons:
        dims = " ".join(f"{k[0]}{v}" for k, v in c.dims.items())  # b2 h32 w32 s77
        check = f"{c.check.replace('_', ' ')} ({c.row})" if c.row else c.check
        if c.error:
            rows.append([c.component, c.point, check, dims, "-", "-", "-", f"[red]FAIL[/] {c.error}"])
            continue
        bad = "; ".join(v for o in c.outputs for v in o.violations)
        verdict = "[green]pass[/]" if c.passed else f"[red]FAIL[/] {bad}"
        rows.append([c.component, c.point, check, dims, f"{c.worst('rel_l2'):.2e}", f"{c.worst('cosine'):.6f}",
                     f"{c.worst('max_abs'):.2e}", verdict])
    runner = next(iter(result.runner.values()), {})
    title = f"validation: {result.target} {result.precision} vs PyTorch ({', '.join(f'{k}={v}' for k, v in runner.items())})"
    if result.weights_only:
        ran = next(iter(result.weights_only.values()))["runner"]
        title += f"; weights only: {', '.join(f'{k}={v}' for k, v in ran.items())}"
    ui.table(title, ["component", "point", "check (row)", "dims (batch height width seq)", "rel L2", "cosine", "max abs", "verdict"], rows)
    status = "[green]PASSED[/]" if result.passed else "[red]FAILED[/]"
    ui.info(f"{status}: {sum(c.passed for c in result.comparisons)}/{len(result.comparisons)} comparisons within tolerance")


def print_structural(ui, result, require_numeric: bool) -> None:
    rows = []
    for name, s in result.structure.items():
        facts = f"{s.get('shapes', '?')} shapes, {sum(s.get('ops', {}).values())} ops, {s.get('bytes', 0)} bytes"
        verdict = "[yellow]structure ok[/]" if s.get("ok") else f"[red]FAIL[/] {'; '.join(s.get('problems', []))}"
        rows.append([name, facts, verdict, "[yellow]NOT RUN[/]"])
    ui.table(f"structural check: {result.target} {result.precision} (numerics not run: {result.numerics_skipped})",
             ["component", "package", "structure", "numerics"], rows)
    if not result.structure_ok:
        ui.info("[red]FAILED[/]: the packages do not match their specs")
    elif require_numeric:
        ui.info("[red]NOT VALIDATED[/]: structure ok, numerics not run and --require-numeric was given")
    else:
        ui.info("[yellow]STRUCTURE OK, NUMERICS NOT RUN[/] (not a numeric pass; use --require-numeric to fail on this)")
