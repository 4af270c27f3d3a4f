"""How ``sandboxctl`` commands talk to the terminal.

Results go to stdout: one JSON document with ``--json`` (for scripts), else a rich table or a
plain line (for people). Errors, notes and spinners go to stderr so stdout stays parseable.
Spinners are drawn only when stderr is a terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: The width tables get when stdout is not a terminal: wide enough that piped output is never cut.
PIPE_WIDTH = 100_000


def _stdout() -> Console:
    # Built per call: rich binds the stream at construction, and tests swap sys.stdout.
    # Piped, rich would assume 80 columns and cut cells; tables take their natural width instead.
    return Console(file=sys.stdout, soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def _stderr() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


def to_jsonable(data: Any) -> Any:
    """Turn models, paths, datetimes and enums (also nested) into plain JSON values."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, Mapping):
        return {str(key): to_jsonable(value) for key, value in data.items()}
    if isinstance(data, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in data]
    if isinstance(data, Enum):
        return to_jsonable(data.value)
    if isinstance(data, datetime):
        return data.isoformat()
    if isinstance(data, Path):
        return str(data)
    if data is None or isinstance(data, (str, int, float, bool)):
        return data
    return str(data)


def _cell(value: Any) -> str:
    plain = to_jsonable(value)
    if plain is None:
        return "-"
    if isinstance(plain, (dict, list)):
        return json.dumps(plain, separators=(",", ":"))
    return str(plain)


def emit(data: Any, json_mode: bool) -> None:
    """Print a command's result on stdout: one JSON document with ``--json``, else for people.

    Without ``--json`` a string prints as is, a mapping (or pydantic model) as a two-column
    key/value table, a sequence of mappings as a table with one row each and one column per
    key, and anything else as its string form.
    """
    if json_mode:
        print(json.dumps(to_jsonable(data), separators=(",", ":")), flush=True)
        return
    if isinstance(data, str):
        print(data, flush=True)
        return
    plain = to_jsonable(data)
    console = _stdout()
    if isinstance(plain, dict):
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in plain.items():
            table.add_row(escape(key), escape(_cell(value)))
        console.print(table)
    elif isinstance(plain, list) and plain and all(isinstance(row, dict) for row in plain):
        rows: Sequence[dict[str, Any]] = plain
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        table = Table(*[escape(column) for column in columns])
        for row in rows:
            table.add_row(*[escape(_cell(row.get(column))) for column in columns])
        console.print(table)
    elif isinstance(plain, list):
        for item in plain:
            print(_cell(item))
    else:
        print(_cell(plain))
    sys.stdout.flush()


def note(message: str) -> None:
    """Print an informational line on stderr; best effort, a closed stderr is ignored."""
    # Notes are printed during shutdown too, where a vanished terminal must not stop the cleanup.
    with suppress(OSError):
        _stderr().print(escape(message), style="dim", highlight=False)


def error(message: str) -> None:
    """Print ``error: <message>`` on stderr without exiting (the caller cleans up, then exits)."""
    with suppress(OSError):
        _stderr().print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit the command with ``code`` (non-zero)."""
    error(message)
    raise typer.Exit(code=code)


@contextmanager
def progress(label: str) -> Iterator[None]:
    """Show a spinner with ``label`` on stderr while the block runs, only if stderr is a TTY."""
    if not sys.stderr.isatty():
        yield
        return
    with _stderr().status(escape(label)):
        yield
