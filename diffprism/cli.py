"""diffprism command line. Subcommands live in diffprism/commands/, one module each.

Exit codes (stable, documented in README.md): 0 ok, 1 validation failed, 2 usage error,
3 bad input (source, folder), 4 export/compile failed, 5 backend unavailable,
6 integrity check failed, 7 output folder locked.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from diffprism import __version__
from diffprism.ui import UI
from exporters.errors import EXIT_USAGE, DiffprismError

# Each module has register(subparsers) and sets args.func(args, ui) -> int.
COMMANDS = (
    "export",
    "validate",
    "inspect",
    "compile",
    "calibrate",
    "compress",
    "build",
    "plan",
    "publish",
    "verify",
    "generate",
    "bench",
    "report",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, like every usage error
        self.print_usage(sys.stderr)
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffprism", description="Export diffusion pipelines to every deployment format, "
                     "each one validated against PyTorch.")
    parser.add_argument("--version", action="version", version=f"diffprism {__version__}")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no human output")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"diffprism.commands.{name}").register(sub)
    return parser


def _configure_logging(verbose: int) -> None:
    if verbose < 2:
        # Library deprecation chatter (torch, transformers) is not actionable for a CLI user.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:
        # torch.onnx and friends are chatty at INFO/WARNING about things users cannot act on.
        for noisy in ("torch", "torch.onnx", "onnxscript", "torch._export", "torch.export", "coremltools"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    ui = UI(json_mode=args.json, quiet=args.quiet)
    try:
        return int(args.func(args, ui))
    except DiffprismError as exc:
        ui.error(str(exc))
        ui.emit({"ok": False, "error": exc.message, "fix": exc.fix, "exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        ui.error("interrupted; nothing half-written was kept")
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
