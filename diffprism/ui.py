"""Terminal output for the CLI: rich tables and progress for people, one JSON document for machines.

Human output goes to stderr when --json is set, so stdout stays parseable.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from exporters.paths import printable


class UI:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.console = Console(stderr=json_mode, highlight=False)
        self.err = Console(stderr=True, highlight=False)

    @staticmethod
    def literal(value: Any) -> str:
        """A path or name as text inside markup: brackets escaped, control characters shown as escapes."""
        return escape(printable(str(value)))

    def info(self, text: str) -> None:
        """text is rich markup: pass paths and names through literal()."""
        if not self.quiet:
            self.console.print(text)

    def error(self, text: str) -> None:
        self.err.print(f"[bold red]error:[/] {self.literal(text)}", markup=True, soft_wrap=True)

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.quiet:
            return
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*[str(c) for c in row])
        self.console.print(table)

    def emit(self, data: dict[str, Any]) -> None:
        """The machine-readable result (only in --json mode)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()

    @contextmanager
    def progress(self, description: str) -> Iterator[callable]:
        """Yield update(text): a spinner with elapsed time while a long step runs."""
        if self.quiet:
            yield lambda text: None
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=self.console if not self.json_mode else self.err, transient=True) as bar:
            task = bar.add_task(description)

            def update(text: str) -> None:
                bar.update(task, description=f"{description}: {text}")

            yield update
