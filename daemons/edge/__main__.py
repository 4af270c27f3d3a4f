"""``python -m daemons.edge desktop|terminal``: start one plane's edge.

The in-box scripts run it inside boxes of remote backends; the worker runs it on the host for
local boxes (:mod:`daemons.edge.host`), where it reaches the box's sockets through the box's
``/tmp`` on the host.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

_WATCH_INTERVAL_SECONDS = 2.0


def _exit_when_gone(directory: Path, interval: float = _WATCH_INTERVAL_SECONDS) -> None:
    """Exit the process once ``directory`` no longer exists (the box it serves is gone)."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not directory.is_dir():
                logging.getLogger("daemons.edge").info("%s is gone: the box is gone, exiting", directory)
                os._exit(0)

    threading.Thread(target=watch, name="edge-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen edge until it is terminated."""
    parser = argparse.ArgumentParser(prog="python -m daemons.edge", description=__doc__)
    parser.add_argument("plane", choices=("desktop", "terminal"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--any-port", action="store_true", help="fall back to any free port if --port is taken")
    parser.add_argument("--port-file", type=Path, required=True, help="where to write the port once listening")
    parser.add_argument(
        "--unix-target", type=Path, required=True, help="the plane's unix socket for control tokens (input allowed)"
    )
    parser.add_argument(
        "--view-target", type=Path, required=True, help="the plane's view-only unix socket, for view tokens"
    )
    parser.add_argument("--key-file", type=Path, required=True, help="the box's derived key (64 hex digits)")
    parser.add_argument("--epoch", type=int, required=True, help="the lease epoch served; other tokens are refused")
    parser.add_argument(
        "--watch-dir", type=Path, help="exit when this directory disappears (a host edge watches its box's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if args.epoch < 0:
        parser.error("--epoch must be >= 0")
    if args.watch_dir is not None:
        _exit_when_gone(args.watch_dir)
    options = {
        "port": args.port,
        "any_port": args.any_port,
        "port_file": args.port_file,
        "unix_target": args.unix_target,
        "view_target": args.view_target,
        "key_file": args.key_file,
        "epoch": args.epoch,
        "host": args.host,
    }
    try:
        if args.plane == "desktop":
            from daemons.edge.desktop import serve_desktop_edge

            serve_desktop_edge(**options)
        else:
            from daemons.edge.terminal import serve_terminal_edge

            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            serve_terminal_edge(**options)
    except OSError as err:
        print(f"edge: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 13 if args.plane == "desktop" else 14
    return 0


if __name__ == "__main__":
    sys.exit(main())
