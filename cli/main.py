"""``sandboxctl``: the command line of the sandbox runtime.

Sub-commands live in one module each (``cli/stack.py`` for ``up``, ``cli/lease.py`` for
``lease ...`` and ``exec``); this module only assembles them.
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from cli.exits import exit_codes_epilog

app = typer.Typer(
    name="sandboxctl",
    help="Run and drive the sandbox runtime: leases, boxes, planes.",
    epilog=exit_codes_epilog(),
    rich_markup_mode=None,
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Run and drive the sandbox runtime: leases, boxes, planes."""


def _register() -> None:
    # Imported here so each module can import `app` helpers without cycles.
    from cli import channel_a, computer_use, lease, machines, planes, providers, recording, snapshots, stack

    stack.register(app)
    lease.register(app)
    channel_a.register(app)
    machines.register(app)
    snapshots.register(app)
    planes.register(app)
    recording.register(app)
    computer_use.register(app)
    providers.register(app)


def main() -> None:
    """Console-script entry point.

    Ends the process with ``os._exit`` once the command has finished and its output is flushed:
    the Temporal SDK's native runtime threads can still call into the interpreter while it
    finalizes, which aborted about one command in ten ("PyGILState_Release ... must be current")
    after the command itself had succeeded. Every command's own cleanup (``finally`` blocks,
    stopping child processes) has run by then.
    """
    _register()
    try:
        app()
        code = 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:
            print(done.code, file=sys.stderr)
            code = 1
    with contextlib.suppress(Exception):
        from client.connection import flush_traces

        flush_traces()  # os._exit skips the exporter's own shutdown
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
