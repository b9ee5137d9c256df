"""The --e2e part of 'diffprism validate': image-level comparison of a target's pipeline with PyTorch."""
from __future__ import annotations

import argparse


def add_e2e_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--e2e", action="store_true",
                        help="also generate images with PyTorch and with this target from the same latents and "
                             "compare them (latent rel L2, PSNR, SSIM); exit 1 if they differ")
    parser.add_argument("--e2e-prompt", action="append", metavar="PROMPT",
                        help="prompt for the image check (repeatable; default: three built-in prompts)")
    from validation.e2e import STEPS

    parser.add_argument("--e2e-steps", type=int, default=STEPS, help=f"denoising steps per image (default {STEPS})")
    parser.add_argument("--e2e-size", help="N or HxW in pixels (default: the export's preferred size)")
    parser.add_argument("--e2e-guidance-scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    add_control_image_arg(parser)


def add_control_image_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control-image", type=_control_path, metavar="PNG",
                        help="a ControlNet pipeline's control image (default: a drawn edge map of two shapes)")


def _control_path(text: str) -> str:
    from pathlib import Path

    return str(Path(text).resolve())


def e2e_requests(args: argparse.Namespace) -> list:
    from diffprism.e2e_jobs import parse_size
    from exporters.errors import UsageError
    from validation.e2e import PROMPTS, requests_for

    if args.e2e_steps < 1:
        raise UsageError(f"--e2e-steps {args.e2e_steps} must be at least 1", "pass e.g. --e2e-steps 10")
    return requests_for(args.e2e_prompt or PROMPTS, size=parse_size(args.e2e_size, args.dir),
                        steps=args.e2e_steps, guidance_scale=args.e2e_guidance_scale,
                        control_image=args.control_image)


def run_e2e(args: argparse.Namespace, progress, runner_options) -> list:
    from diffprism.e2e_jobs import e2e_job
    from diffprism.jobs import split_options
    from diffprism.placement import resolve
    from diffprism.variant import Variant

    chosen, runner_options = split_options(args.target, runner_options)  # target options pick the variant
    variant = resolve(args.dir, Variant.of(args.target, args.precision, chosen), {})
    return e2e_job(args.dir, [variant], e2e_requests(args), runner_options=runner_options, progress=progress)


def run_pipeline_target(args: argparse.Namespace, ui) -> int:
    """Validate a target whose artifact is a whole pipeline (web): the image-level check is the validation."""
    from diffprism.bundle_jobs import pipeline_e2e_job
    from diffprism.commands.common import parse_options
    from diffprism.e2e_jobs import report_job
    from diffprism.lock import folder_lock
    from exporters.errors import EXIT_OK, EXIT_VALIDATION_FAILED

    with folder_lock(args.dir), ui.progress(f"validate {args.target} {args.precision}") as update:
        result = pipeline_e2e_job(args.dir, target=args.target, precision=args.precision, requests=e2e_requests(args),
                                  runner_options=parse_options(args.option), progress=update)
        report_job(args.dir)
    runner = result.runner.get("pipeline", {})
    if runner:
        ui.info(", ".join(f"{k}: {v}" for k, v in runner.items()))
    print_e2e(ui, [result])
    for i, c in enumerate(result.checks):
        steps = c.timings.get("steps") or []
        ui.info(f"prompt {i}: {c.timings.get('backend')} total {c.timings.get('total', 0):.0f} ms, "
                f"{len(steps)} UNet steps at {sum(steps) / max(1, len(steps)):.0f} ms each; screenshot {c.screenshot}")
    ui.emit({"ok": result.passed, "e2e": [result.to_json()]})
    return EXIT_OK if result.passed else EXIT_VALIDATION_FAILED


def print_e2e(ui, results) -> None:
    from validation.report import runs_as

    for result in results:
        rows = []
        for c in result.checks:
            m = c.metrics
            verdict = "[green]pass[/]" if c.passed else "[red]FAIL[/] " + "; ".join(c.violations)
            rows.append([c.request.prompt[:40], c.request.seed, f"{m['latent_rel_l2']:.2e}", f"{m['psnr']:.1f}",
                         f"{m['ssim']:.4f}", verdict])
        if result.error:
            rows.append(["-", "-", "-", "-", "-", f"[red]FAIL[/] {result.error}"])
        t = result.tolerance
        ran = ", ".join(dict.fromkeys(runs_as(d) for d in result.runner.values()))
        ui.table(f"images: {result.label} ({ran}) vs PyTorch (judged as {result.precision}: latent rel L2 <= "
                 f"{t.latent_rel_l2:g}, PSNR >= {t.psnr:g} dB, SSIM >= {t.ssim:g})",
                 ["prompt", "seed", "latent rel L2", "PSNR dB", "SSIM", "verdict"], rows)
        status = "[green]PASSED[/]" if result.passed else "[red]FAILED[/]"
        ui.info(f"{status}: {sum(c.passed for c in result.checks)}/{len(result.checks)} images within tolerance")
