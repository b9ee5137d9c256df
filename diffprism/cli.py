"""diffprism command line. Subcommands live in diffprism/commands/, one module each.

Exit codes (stable, documented in README.md): 0 ok, 1 validation ran and failed, 2 usage error,
3 bad input (source, folder), 4 export/compile failed, 5 backend unavailable,
6 integrity check failed, 7 output folder locked, 8 unexpected internal error.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from diffprism import __version__
from diffprism.ui import UI
from exporters.errors import EXIT_INTERNAL, EXIT_USAGE, DiffprismError, OutputError

log = logging.getLogger("diffprism")

# Each module has register(subparsers) and sets args.func(args, ui) -> int.
COMMANDS = (
    "export",
    "validate",
    "inspect",
    "compile",
    "calibrate",
    "compress",
    "refit",
    "build",
    "plan",
    "publish",
    "verify",
    "generate",
    "bench",
    "report",
)


class _Parser(argparse.ArgumentParser):
    json_mode = False  # set from argv before parsing: usage errors are JSON too under --json

    def error(self, message: str) -> None:  # one line, exit code 2, like every usage error
        self.print_usage(sys.stderr)
        sys.stderr.write(f"error: {message}\n")
        if _Parser.json_mode:
            UI(json_mode=True).emit({"ok": False, "error": message, "fix": f"see '{self.prog} --help'",
                                     "exit_code": EXIT_USAGE})
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
        # torchao (installed for the AOTInductor int8 target) warns on import about CUDA kernels a CPU lacks.
        for noisy in ("torch", "torch.onnx", "onnxscript", "torch._export", "torch.export", "coremltools",
                      "torchao", "diffusers.quantizers.torchao"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _fail(ui: UI, exc: DiffprismError) -> int:
    ui.error(str(exc))
    ui.emit({"ok": False, "error": exc.message, "fix": exc.fix, "exit_code": exc.exit_code})
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    _Parser.json_mode = "--json" in (sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    ui = UI(json_mode=args.json, quiet=args.quiet)
    try:
        return int(args.func(args, ui))
    except DiffprismError as exc:
        return _fail(ui, exc)
    except KeyboardInterrupt:
        ui.error("interrupted; nothing half-written was kept")
        return 130
    except OSError as exc:  # a file that cannot be read or written: the folder, not diffprism
        where = f" {exc.filename}" if exc.filename else ""
        log.debug("OS error", exc_info=True)
        return _fail(ui, OutputError(f"cannot use{where}: {exc.strerror or exc}",
                                     "check the path exists, its permissions and the free disk space"))
    except Exception as exc:  # a bug: its own exit code, so a script never reads it as a verdict
        log.debug("unexpected error", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err = DiffprismError(f"unexpected error: {type(exc).__name__}: {first}",
                             "a bug in diffprism; re-run with -vv for the traceback and report it")
        err.exit_code = EXIT_INTERNAL
        return _fail(ui, err)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
