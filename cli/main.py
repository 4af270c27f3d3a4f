"""``sandboxctl``: the command line of the sandbox runtime.

Sub-commands live in one module each (``cli/stack.py`` for ``up``, ``cli/lease.py`` for
``lease ...`` and ``exec``); this module only assembles them.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sandboxctl",
    help="Run and drive the sandbox runtime: leases, boxes, planes.",
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
    """Console-script entry point."""
    _register()
    app()


if __name__ == "__main__":
    main()
