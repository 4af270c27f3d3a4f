"""One table of SDK errors per cloud adapter, applied in one place.

Modelled on httpx's ``HTTPCORE_EXC_MAP`` with ``map_httpcore_exceptions()`` and modal-client's
``_STATUS_TO_EXCEPTION``: each adapter declares, at module level, an :class:`ErrorTable` whose rows
say which SDK failure (an exception class, with an HTTP status, an error code or a test where the
class alone does not tell) becomes which :mod:`sandbox.errors` class, with what message.
:meth:`ErrorTable.translate` applies it; :meth:`ErrorTable.mapped` is the context manager around
SDK calls, and :func:`confirmed` the one around box operations whose failure the adapter first
checks against the control plane (a data-plane 404 is not proof that a box is gone).

Rows are tried in order and the first that matches wins, so specific classes and transient
signals come first, as in the adapters' docstring tables. A row marked ``box`` holds only when the
call is about an existing box (``box_op``): a 404 on create names an image or a template, never a
box, so there the row is skipped and a later one applies. Our own errors pass through unchanged.

Messages are :meth:`str.format` templates over ``text`` (the table's description of the error:
``str(err)``, or its class name when that is empty), ``err`` (``str(err)``), ``name`` (the class
name), ``exc`` (the error itself, for ``{exc.path}``) and the fields a call passes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from sandbox.errors import ProviderError, SandboxError

__all__ = ["SERVER_ERRORS", "ErrorTable", "Row", "confirmed", "status_attribute"]

SERVER_ERRORS: Final = range(500, 1000)
"""Every 5xx status (and the non-standard ones above), for a row that matches "status >= 500"."""

ErrorFactory = type[ProviderError] | Callable[[str, BaseException], ProviderError]
"""Our error class (called with the message), or a function of (message, SDK error) for extra fields."""


@dataclass(frozen=True)
class Row:
    """One line of an adapter's table: SDK failures of this shape are raised as ``error``.

    Attributes:
        sdk: The SDK (or transport) exception class or classes; ``BaseException`` for any.
        error: Our error class, or a factory of (message, SDK error).
        message: The message template (see the module docstring for its fields).
        status: The row holds only for these HTTP statuses (the table's ``status_of``).
        code: The row holds only for these error codes (the table's ``code_of``).
        test: The row holds only when this returns True for the error.
        box: The row holds only when the call is about an existing box.
    """

    sdk: type[BaseException] | tuple[type[BaseException], ...]
    error: ErrorFactory
    message: str
    status: Collection[int] | None = None
    code: Collection[str] | None = None
    test: Callable[[BaseException], bool] | None = None
    box: bool = False


def status_attribute(*names: str) -> Callable[[BaseException], int | None]:
    """A ``status_of`` that reads the first of ``names`` that holds an int (``status_code``, ``status``)."""

    def status_of(err: BaseException) -> int | None:
        for name in names:
            value = getattr(err, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    return status_of


def _no_code(err: BaseException) -> str | None:
    del err
    return None


def _text(err: BaseException) -> str:
    return str(err) or type(err).__name__


class ErrorTable:
    """An adapter's SDK errors → our errors, applied by :meth:`translate` and :meth:`mapped`.

    Args:
        rows: The rows, in order; or a function returning them, called once on first use (for an
            adapter that imports its SDK lazily).
        default: The message of the :class:`ProviderError` raised when no row matches.
        status_of: The HTTP status an SDK error carries, if any.
        code_of: The error code an SDK error carries, if any (normalised as the rows spell them).
        describe: The ``text`` of a message (default ``str(err)``, or the class name when empty).
        unwrap: An SDK error that only wraps another (the one to translate instead), or None.
    """

    def __init__(
        self,
        rows: Sequence[Row] | Callable[[], Sequence[Row]],
        *,
        default: str,
        status_of: Callable[[BaseException], int | None] = status_attribute("status_code"),
        code_of: Callable[[BaseException], str | None] = _no_code,
        describe: Callable[[BaseException], str] = _text,
        unwrap: Callable[[BaseException], BaseException | None] | None = None,
    ) -> None:
        self._rows = rows
        self.default = default
        self.status_of = status_of
        self.code_of = code_of
        self.describe = describe
        self.unwrap = unwrap

    @functools.cached_property
    def rows(self) -> tuple[Row, ...]:
        """The rows, built on first use when they were given as a function."""
        return tuple(self._rows() if callable(self._rows) else self._rows)

    def _matches(self, row: Row, err: BaseException, box_op: bool) -> bool:
        if not isinstance(err, row.sdk) or (row.box and not box_op):
            return False
        if row.status is not None and self.status_of(err) not in row.status:
            return False
        if row.code is not None and self.code_of(err) not in row.code:
            return False
        return row.test is None or row.test(err)

    def translate(self, err: BaseException, *, box_op: bool = True, **fields: object) -> ProviderError:
        """Our error for ``err`` by the first matching row (a :class:`ProviderError` is returned as it is).

        Args:
            err: What the SDK (or its transport) raised.
            box_op: Whether the call is about an existing box (rows marked ``box`` apply only then).
            fields: More message fields (e.g. the subject of the call).
        """
        if isinstance(err, ProviderError):
            return err
        inner = self.unwrap(err) if self.unwrap is not None else None
        if inner is not None:
            return self.translate(inner, box_op=box_op, **fields)
        values = {"text": self.describe(err), "err": str(err), "name": type(err).__name__, "exc": err, **fields}
        for row in self.rows:
            if self._matches(row, err, box_op):
                message = row.message.format(**values)
                made: ProviderError = row.error(message) if isinstance(row.error, type) else row.error(message, err)
                return made
        return ProviderError(self.default.format(**values))

    @contextlib.contextmanager
    def mapped(
        self,
        *,
        box_op: bool = True,
        catch: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        **fields: object,
    ) -> Iterator[None]:
        """Raise what the block raises as our error: :meth:`translate` of it, chained to it.

        Our own errors (:class:`~sandbox.errors.SandboxError`) pass through; only ``catch`` is
        translated (everything else propagates as it is).
        """
        try:
            yield
        except SandboxError:
            raise
        except catch as err:
            raise self.translate(err, box_op=box_op, **fields) from err


@contextlib.asynccontextmanager
async def confirmed(failed: Callable[[BaseException], Awaitable[ProviderError]]) -> AsyncIterator[None]:
    """Raise ``await failed(err)`` for what the block raises, chained to it; our own errors pass through.

    ``failed`` is the adapter's translation of a box operation's failure that first asks the
    control plane whether the box is still there (only that proves it gone).
    """
    try:
        yield
    except SandboxError:
        raise
    except Exception as err:
        raise await failed(err) from err
