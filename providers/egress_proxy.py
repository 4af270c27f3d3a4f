"""The egress proxy of local boxes: HTTP and HTTPS ``CONNECT``, outside the box, on a unix socket per box.

A box has its own network namespace with nothing but ``lo``. Inside it, a forwarder listens on
``127.0.0.1:3128`` and passes each connection to a unix socket bound into the box; this proxy,
running in the worker process (on a thread of its own, so heavy transfers do not delay
activities), accepts on that socket and decides with :class:`sandbox.egress_policy.EgressPolicy`:

- ``CONNECT host:port`` (HTTPS and anything else tunnelled): checked, connected, answered
  ``200 Connection established``, then bytes are spliced both ways.
- ``GET http://host/path`` (plain HTTP, absolute-form): checked, connected, the request head is
  re-sent in origin form with ``Connection: close``, then bytes are spliced both ways. Every
  connection goes to the one upstream its first request chose.
- A refused destination gets ``403`` with a body that names ``SANDBOX_LOCAL_EGRESS_ALLOW``; the
  refusal is logged once per box and destination, as ``host:port`` only (never a path, a query
  string or a header).

HTTP parsing and serialisation use ``h11`` (the parser under httpx and httpcore: maintained,
strict, no I/O of its own), so this module only carries bytes and makes decisions. A full proxy
server (proxy.py, tinyproxy) was the alternative; it would have been a second process to supervise
per host with its own filtering language, where the policy must be ours (runtime endpoints, the
host's own addresses, DNS pinned to the checked address).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import h11

from sandbox.egress_policy import ALLOW_SETTING, EgressPolicy, IPAddress

__all__ = ["PROXY_PORT", "EgressGateway", "EgressProxy", "host_owns_address"]

PROXY_PORT: Final = 3128
"""Where the in-box forwarder listens (on the box's own loopback)."""

_log = logging.getLogger("sandbox.egress")
_HEAD_LIMIT: Final = 16 * 1024
_HEAD_TIMEOUT: Final = 30.0
_CONNECT_TIMEOUT: Final = 10.0
_CHUNK: Final = 64 * 1024
_MAX_CONNECTIONS_PER_BOX: Final = 256
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
T = TypeVar("T")


def host_owns_address(address: IPAddress) -> bool:
    """Whether ``address`` is one of this host's own: the kernel lets us bind to exactly those.

    Any error other than "address not available" counts as local, so a doubt refuses.
    """
    family = socket.AF_INET6 if isinstance(address, ipaddress.IPv6Address) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as err:
            return err.errno != errno.EADDRNOTAVAIL
    return True


class _Refused(Exception):
    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.body = body


class EgressProxy:
    """Serves the egress of boxes: one unix socket per box, one policy for all.

    Args:
        policy: The allowlist and the fixed refusals.
        is_local: Whether an address belongs to this host (tests may widen it; never narrow it).
        connect_timeout: Seconds to reach an upstream before answering 504.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        is_local: Callable[[IPAddress], bool] = host_owns_address,
        connect_timeout: float = _CONNECT_TIMEOUT,
    ) -> None:
        self.policy = policy
        self._is_local = is_local
        self._connect_timeout = connect_timeout
        self._logged: set[tuple[str, str, int]] = set()
        self.labels: dict[str, str] = {}
        """Names listeners were started under -> the box's name now (see ``EgressGateway.rekey``)."""
        self.refusals: list[tuple[str, str, int, str]] = []
        """Every refusal as ``(box, host, port, reason)``: what tests and ``describe`` read."""

    async def serve(self, path: Path, *, box: str, owner: tuple[int, int] | None = None) -> asyncio.Server:
        """Listen on the unix socket ``path`` for the box ``box`` (replacing a stale socket file).

        ``owner`` is the host ``(uid, gid)`` the socket is given to, so the box user can connect.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        limit = asyncio.Semaphore(_MAX_CONNECTIONS_PER_BOX)

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if limit.locked():
                writer.close()
                return
            async with limit:
                await self.handle(reader, writer, box=box)

        # Bound through the directory's descriptor: box directories can be deeper than the
        # 108 bytes a unix socket path may have.
        dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
            if owner is not None:
                os.chown(path.name, *owner, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(path, 0o600)
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(dir_fd)
        return await asyncio.start_unix_server(on_client, sock=sock, limit=_CHUNK)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, box: str) -> None:
        """Serve one client connection to its end; never raises."""
        upstream: asyncio.StreamWriter | None = None
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_HEAD_LIMIT)
            try:
                request = await asyncio.wait_for(_read_head(conn, reader), _HEAD_TIMEOUT)
            except (h11.RemoteProtocolError, TimeoutError):
                await _answer(writer, 400, "malformed or incomplete proxy request\n")
                return
            if request is None:
                return
            rest, _ = conn.trailing_data
            try:
                host, port, head = _target(request)
                up_reader, upstream = await self._open(host, port, box=box)
            except _Refused as refused:
                await _answer(writer, refused.status, refused.body)
                return
            if head is None:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream.write(head)
            if rest:
                upstream.write(rest)
            await _splice(reader, writer, up_reader, upstream)
        except Exception:  # a proxy connection must never take the proxy down
            _log.debug("egress connection of %s failed", box, exc_info=True)
        finally:
            for w in (upstream, writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()

    async def _open(self, host: str, port: int, *, box: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not self.policy.allows_name(host, port):
            self._refuse(box, host, port, "not in the allowlist")
            raise _Refused(
                403,
                "not allowed",
                f"sandbox egress: {host}:{port} is not allowed from this box.\n"
                f"An operator can allow it with {ALLOW_SETTING} (for example {host}:{port}).\n",
            )
        addresses = await self._resolve(host, port)
        if not addresses:
            raise _Refused(502, "unresolvable", f"sandbox egress: {host} does not resolve\n")
        reasons: list[str] = []
        for address in addresses:
            reason = self.policy.refusal(address, port, local=self._is_local(address))
            if reason is not None:
                reasons.append(reason)
                continue
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=_CHUNK), self._connect_timeout
                )
            except TimeoutError:
                raise _Refused(504, "timeout", f"sandbox egress: {host}:{port} did not answer in time\n") from None
            except OSError as err:
                raise _Refused(
                    502, "unreachable", f"sandbox egress: cannot reach {host}:{port}: {err.strerror}\n"
                ) from None
        self._refuse(box, host, port, reasons[0])
        raise _Refused(
            403,
            "refused",
            f"sandbox egress: {host}:{port} is refused: {reasons[0]}.\n"
            f"Boxes never reach the host, loopback, link-local addresses or the runtime's own services, "
            f"whatever {ALLOW_SETTING} says.\n",
        )

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return []
        seen: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
                if address not in seen:
                    seen.append(address)
        return seen

    def _refuse(self, box: str, host: str, port: int, reason: str) -> None:
        box = self.labels.get(box, box)
        self.refusals.append((box, host, port, reason))
        key = (box, host, port)
        if key not in self._logged:
            self._logged.add(key)
            _log.warning("egress refused for box %s: %s:%d (%s; see %s)", box, host, port, reason, ALLOW_SETTING)


async def _read_head(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            return None
        data = await reader.read(_CHUNK)
        conn.receive_data(data)
        if not data:
            event = conn.next_event()
            return event if isinstance(event, h11.Request) else None


def _target(request: h11.Request) -> tuple[str, int, bytes | None]:
    """The upstream host and port, and the head to send it (None for CONNECT)."""
    target = request.target.decode("ascii", "replace")
    if request.method == b"CONNECT":
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit() or not host or not 1 <= int(port_text) <= 65535:
            raise _Refused(400, "bad target", "sandbox egress: CONNECT needs host:port\n")
        return host.strip("[]").lower(), int(port_text), None
    split = urlsplit(target)
    if split.scheme != "http" or not split.hostname:
        raise _Refused(
            400,
            "bad target",
            "sandbox egress: send http://host/path to the proxy, or CONNECT host:port for anything else\n",
        )
    try:
        port = split.port or 80
    except ValueError:
        raise _Refused(400, "bad target", "sandbox egress: bad port\n") from None
    path = (split.path or "/") + (f"?{split.query}" if split.query else "")
    headers = [(name, value) for name, value in request.headers if name.lower() not in _HOP_BY_HOP]
    headers.append((b"connection", b"close"))
    client = h11.Connection(h11.CLIENT)
    head = client.send(h11.Request(method=request.method, target=path.encode(), headers=headers))
    assert head is not None
    return split.hostname.lower(), port, head


async def _answer(writer: asyncio.StreamWriter, status: int, body: str) -> None:
    data = body.encode()
    conn = h11.Connection(h11.SERVER)
    # h11 answers only after a request: feed it a minimal one of our own.
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    response = h11.Response(
        status_code=status,
        headers=[(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode()),
                 (b"connection", b"close")],
    )  # fmt: skip
    out = b"".join(
        x or b"" for x in (conn.send(response), conn.send(h11.Data(data=data)), conn.send(h11.EndOfMessage()))
    )
    with contextlib.suppress(OSError):
        writer.write(out)
        await writer.drain()


async def _splice(
    c_reader: asyncio.StreamReader,
    c_writer: asyncio.StreamWriter,
    u_reader: asyncio.StreamReader,
    u_writer: asyncio.StreamWriter,
) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(_CHUNK):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()

    await asyncio.gather(pump(c_reader, u_writer), pump(u_reader, c_writer))


def _someone_listens(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
        return True
    except OSError:
        return False
    finally:
        os.close(dir_fd)


class EgressGateway:
    """An :class:`EgressProxy` on an event loop of its own thread, with one listener per box.

    The worker's event loop stays free for activities; the provider calls :meth:`ensure` from any
    thread or loop when a box's namespace holder starts or is adopted, and :meth:`close_box` when
    the box is terminated.
    """

    def __init__(self, proxy: EgressProxy) -> None:
        self.proxy = proxy
        self._servers: dict[str, tuple[Path, asyncio.Server]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="sandbox-egress", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            loop = self._loop
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(timeout=30)

    def serves(self, box: str, path: Path) -> bool:
        """Whether this process serves the box's egress on ``path`` right now."""
        current = self._servers.get(box)
        return current is not None and current[0] == path and current[1].is_serving() and path.exists()

    def ensure(self, box: str, path: Path, *, owner: tuple[int, int] | None = None) -> None:
        """Make sure the box's egress is served on ``path``: by this process, unless another one already does.

        Another worker process (or a CLI's provider) may serve it; its socket is left alone while
        it accepts connections, and taken over once nobody answers on it.
        """
        if self.serves(box, path) or _someone_listens(path):
            return

        async def start() -> None:
            old = self._servers.pop(box, None)
            if old is not None:
                old[1].close()
            self._servers[box] = (path, await self.proxy.serve(path, box=box, owner=owner))

        self._run(start())

    def rekey(self, old: str, new: str, path: Path) -> None:
        """The box served as ``old`` is now ``new`` at ``path`` (a box made ahead was handed out and moved).

        The listening socket moved with its directory, so it keeps serving; refusals get the new name.
        """
        entry = self._servers.pop(old, None)
        if entry is not None:
            self._servers[new] = (path, entry[1])
        self.proxy.labels[old] = new

    def close_box(self, box: str) -> None:
        """Stop serving the box (its socket file goes with its directory)."""
        if box not in self._servers or self._loop is None:
            return

        async def stop() -> None:
            entry = self._servers.pop(box, None)
            if entry is not None:
                entry[1].close()

        self._run(stop())

    def close(self) -> None:
        """Stop every listener and the thread."""
        if self._loop is None:
            return

        async def stop_all() -> None:
            for _path, server in self._servers.values():
                server.close()
            self._servers.clear()

        self._run(stop_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop.close()
        self._loop = self._thread = None
