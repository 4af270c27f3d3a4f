"""``python -m sandbox.edge desktop|terminal``: start one plane's edge (run by the in-box scripts)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen edge until it is terminated."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.edge", description=__doc__)
    parser.add_argument("plane", choices=("desktop", "terminal"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--any-port", action="store_true", help="fall back to any free port if --port is taken")
    parser.add_argument("--port-file", type=Path, required=True, help="where to write the port once listening")
    parser.add_argument("--unix-target", type=Path, required=True, help="the plane's unix socket")
    parser.add_argument("--key-file", type=Path, required=True, help="the box's derived key (64 hex digits)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    options = {
        "port": args.port,
        "any_port": args.any_port,
        "port_file": args.port_file,
        "unix_target": args.unix_target,
        "key_file": args.key_file,
        "host": args.host,
    }
    try:
        if args.plane == "desktop":
            from sandbox.edge.desktop import serve_desktop_edge

            serve_desktop_edge(**options)
        else:
            from sandbox.edge.terminal import serve_terminal_edge

            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            serve_terminal_edge(**options)
    except OSError as err:
        print(f"edge: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 13 if args.plane == "desktop" else 14
    return 0


if __name__ == "__main__":
    sys.exit(main())
