"""Every typed error survives the Temporal boundary: type, message, attributes and retryable.

Each class of :mod:`sandbox.errors` (found by walking the hierarchy, so a new class is covered
without touching this file) is encoded as an activity encodes it, passed through the runtime's
real data converter (pydantic JSON, AES-GCM payload codec, encrypted failure attributes) to a
serialized ``Failure`` proto and back, and decoded as the client decodes it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from typing import Any

import pytest
from temporalio.api.failure.v1 import Failure
from temporalio.converter import DefaultFailureConverter
from temporalio.exceptions import ActivityError, ApplicationError, RetryState

from activities.provider_errors import maps_provider_errors
from sandbox import errors
from sandbox.failures import (
    CAUSE_LINKS_KEPT,
    FAILURE_LINKS_KEPT,
    FAILURE_TEXT_KEPT,
    application_error_in,
    cut_cause_cycles,
    from_application_error,
    to_application_error,
)
from sandbox.payload_codec import PayloadKeys, data_converter_for

CONVERTER = data_converter_for(PayloadKeys.generate("failures-test"))


def _all() -> list[type[errors.SandboxError]]:
    out: list[type[errors.SandboxError]] = []
    stack: list[type[errors.SandboxError]] = [errors.SandboxError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def _documented(cls: type[errors.SandboxError]) -> set[str]:
    """The names under ``Attributes:`` in the docstrings of ``cls`` and its sandbox-error bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, errors.SandboxError)):
            continue
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        section = re.search(r"^Attributes:\n((?:    .*\n?|\n)*)", doc, re.MULTILINE)
        if section:
            names |= set(re.findall(r"^    (\w+):", section.group(1), re.MULTILINE))
    return names - {"message", "retryable"}


def _non_default(name: str, hint: Any, default: Any) -> Any:
    """A JSON value of type ``hint`` that differs from ``default``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, type(int | None)) and args:
        hint = args[0]
    if hint is bool:
        return not default
    if hint is int:
        return 4242
    if hint is float:
        return 12.5
    if hint is str:
        return f"{name}-non-default"
    if typing.get_origin(hint) is dict:
        return {"agent_id": "a1", name: "x"}
    raise AssertionError(f"attribute {name} has a type the wire cannot carry: {hint!r}")


def _non_default_instance(cls: type[errors.SandboxError]) -> errors.SandboxError:
    """An instance whose every attribute, and retryable, differs from the class default."""
    err = errors.SandboxError.__new__(cls)
    errors.SandboxError.__init__(err, f"{cls.__name__}: what happened; what to do", retryable=not cls.default_retryable)
    hints = typing.get_type_hints(cls)
    for name in cls.attribute_names():
        setattr(err, name, _non_default(name, hints[name], getattr(cls, name)))
    return err


async def _through_the_converter(exc: BaseException) -> tuple[BaseException, bytes]:
    failure = Failure()
    await CONVERTER.encode_failure(exc, failure)
    wire = failure.SerializeToString()
    received = Failure()
    received.ParseFromString(wire)
    return await CONVERTER.decode_failure(received), wire


def _encoded(err: errors.SandboxError) -> ApplicationError:
    """The encoder's output as it is raised: ``raise to_application_error(err) from err``."""
    try:
        try:
            raise err
        except errors.SandboxError as caught:
            raise to_application_error(caught) from caught
    except ApplicationError as app:
        return app


async def _raised_by_an_activity(err: BaseException) -> ApplicationError:
    @maps_provider_errors
    async def activity() -> None:
        raise err

    with pytest.raises(ApplicationError) as info:
        await activity()
    return info.value


def _assert_same(got: errors.SandboxError, sent: errors.SandboxError) -> None:
    assert type(got) is type(sent)
    assert got.message == sent.message and str(got) == sent.message
    assert got.retryable is sent.retryable
    assert got.attributes() == sent.attributes()
    for name in type(sent).attribute_names():
        assert getattr(got, name) == getattr(sent, name), name


def _chain_has_a_cycle(exc: BaseException) -> bool:
    """Whether any exception reachable through ``__cause__``/``__context__`` reaches itself again."""

    def links(e: BaseException) -> list[BaseException]:
        return [x for x in (e.__cause__, e.__context__) if x is not None]

    def reaches(start: BaseException, target: BaseException) -> bool:
        seen: set[int] = set()
        todo = links(start)
        while todo:
            e = todo.pop()
            if e is target:
                return True
            if id(e) not in seen:
                seen.add(id(e))
                todo.extend(links(e))
        return False

    everything: list[BaseException] = [exc]
    seen_ids: set[int] = set()
    while everything:
        e = everything.pop()
        if id(e) in seen_ids:
            continue
        seen_ids.add(id(e))
        if reaches(e, e):
            return True
        everything.extend(links(e))
    return False


CLASSES = _all()


def test_every_attribute_is_documented_declared_with_a_default_and_json_safe() -> None:
    for cls in CLASSES:
        assert set(cls.attribute_names()) == _documented(cls), (
            f"{cls.__name__}: declare each attribute on the class with its default and document it under Attributes:"
        )
        defaults = {name: getattr(cls, name) for name in cls.attribute_names()}
        assert json.loads(json.dumps(defaults)) == defaults, cls.__name__


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
async def test_round_trip_through_the_runtime_converter(cls: type[errors.SandboxError]) -> None:
    sent = _non_default_instance(cls)
    for name in cls.attribute_names():  # the instance really differs from the defaults it could fall back on
        assert getattr(sent, name) != getattr(cls, name), name
    encoded = _encoded(sent)
    assert encoded.type == cls.error_type
    assert encoded.non_retryable is (not sent.retryable)
    assert list(encoded.details) == [sent.attributes()]
    assert json.loads(json.dumps(encoded.details[0])) == sent.attributes()

    received, wire = await _through_the_converter(encoded)
    assert sent.message.encode() not in wire  # the message travels encrypted
    for value in sent.attributes().values():
        if isinstance(value, str):
            assert value.encode() not in wire  # and so do the details
    assert isinstance(received, ApplicationError)
    decoded = from_application_error(received)
    _assert_same(decoded, sent)

    assert not _chain_has_a_cycle(encoded)
    assert not _chain_has_a_cycle(received)
    assert not _chain_has_a_cycle(decoded)


@pytest.mark.parametrize(
    "sent",
    [
        errors.DisplayStackError("x11vnc did not start", stage="x11vnc", retryable=True),
        errors.TerminalServerError("ttyd exited", stage="ttyd"),
        errors.PathNotFound("no such file: notes.txt", path="/workspace/notes.txt"),
        errors.ChannelANotFound("no such path", path="src/missing.py"),
        errors.ExecTimeout("sleep ran past its 0.5 s timeout", timeout=0.5),
        errors.UnknownBackend("nope", ["local", "modal"]),
        errors.RouteUnresolvable("the agent is offline", code="offline_enrollment", retryable=True),
        errors.SelfhostedControlError(
            "draining", code=9, retryable=True, draining=True, control_request_id="r-1", detail={"retries": "2"}
        ),
        errors.AgentOffline("no answer", agent_id="laptop", reason="agent_reconnecting"),
        errors.ProvisionFailed("the probe failed", retryable=False),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_errors_built_by_their_constructors_survive_an_activity_failure(sent: errors.SandboxError) -> None:
    """As the lease workflow sees it: an ``ActivityError`` whose cause is the encoded error."""
    encoded = await _raised_by_an_activity(sent)
    activity_error = ActivityError(
        "activity failed",
        scheduled_event_id=5,
        started_event_id=6,
        identity="worker",
        activity_type="exec_in_box",
        activity_id="7",
        retry_state=RetryState.NON_RETRYABLE_FAILURE,
    )
    activity_error.__cause__ = encoded
    received, _ = await _through_the_converter(activity_error)
    app = application_error_in(received)
    assert app is not None
    _assert_same(from_application_error(app), sent)


async def test_a_recorded_error_without_details_decodes_to_its_class_with_defaults() -> None:
    """Histories recorded before details were sent: type right, attributes and retryable the class defaults."""
    old = ApplicationError("x11vnc did not start", type="DisplayStackError", non_retryable=True)
    received, _ = await _through_the_converter(old)
    assert isinstance(received, ApplicationError)
    decoded = from_application_error(received)
    assert type(decoded) is errors.DisplayStackError
    assert (decoded.message, decoded.stage, decoded.retryable) == ("x11vnc did not start", "unknown", False)
    provision = from_application_error(ApplicationError("probe failed", type="ProvisionFailed", non_retryable=True))
    assert type(provision) is errors.ProvisionFailed and provision.retryable is True
    control = from_application_error(ApplicationError("refused", type="SelfhostedControlError"))
    assert isinstance(control, errors.SelfhostedControlError)
    assert (control.code, control.detail, control.never_sent) == (0, {}, False)


def test_details_of_the_wrong_shape_keep_the_defaults() -> None:
    app = ApplicationError(
        "bad",
        {"stage": 3, "retryable": True, "message": "no", "__class__": "x"},
        type="DisplayStackError",
        non_retryable=True,
    )
    decoded = from_application_error(app)
    assert type(decoded) is errors.DisplayStackError
    assert (decoded.stage, decoded.message, decoded.retryable) == ("unknown", "bad", False)
    detail = from_application_error(
        ApplicationError("x", {"code": True, "detail": {"a": 1}}, type="SelfhostedControlError")
    )
    assert isinstance(detail, errors.SelfhostedControlError)
    assert (detail.code, detail.detail) == (0, {})
    timeout = from_application_error(ApplicationError("x", {"timeout": 30}, type="ExecTimeout"))
    assert isinstance(timeout, errors.ExecTimeout) and timeout.timeout == 30.0
    assert isinstance(timeout.timeout, float)


def test_an_unknown_type_is_a_plain_sandbox_error() -> None:
    decoded = from_application_error(ApplicationError("boom", {"path": "x"}, type="KeyError"))
    assert type(decoded) is errors.SandboxError and decoded.message == "boom"


def test_decoding_does_not_share_mutable_defaults() -> None:
    first = from_application_error(ApplicationError("a", type="SelfhostedControlError"))
    assert isinstance(first, errors.SelfhostedControlError)
    first.detail["mutated"] = "yes"
    assert errors.SelfhostedControlError.detail == {}
    sent = errors.SelfhostedControlError("b", code=1, detail={"k": "v"})
    encoded = to_application_error(sent)
    encoded.details[0]["detail"]["k"] = "changed"
    assert sent.detail == {"k": "v"}


async def test_a_cause_cycle_is_cut_before_it_reaches_the_converter() -> None:
    """An error that is (transitively) its own cause made the failure converter recurse without end."""
    inner = errors.ProviderUnavailable("the agent went away")
    outer = errors.SelfhostedControlError("refused", code=5, reason="agent_offline", agent_offline=True)
    outer.__cause__ = inner
    inner.__cause__ = outer
    assert _chain_has_a_cycle(outer)
    encoded = await _raised_by_an_activity(outer)
    assert not _chain_has_a_cycle(encoded)
    received, _ = await _through_the_converter(encoded)
    assert isinstance(received, ApplicationError)
    decoded = from_application_error(received)
    assert type(decoded) is errors.AgentOffline and decoded.retryable  # the table's offline mapping
    assert decoded.reason == "agent_offline"

    context_loop = errors.BoxNotFound("gone")
    middle = RuntimeError("lookup failed")
    context_loop.__context__ = middle
    middle.__context__ = context_loop
    assert cut_cause_cycles(context_loop) is context_loop
    assert not _chain_has_a_cycle(context_loop)
    assert context_loop.__context__ is middle  # only the closing link is dropped


# The server keeps at most 4 KiB of an activity's last failure (2 KiB draws a warning); a bigger one
# becomes "Failure exceeds size limit." and, with the codec on, its message is lost.
SERVER_FAILURE_LIMIT = 4096


def _raised_deep(err: BaseException, depth: int) -> BaseException:
    def descend(n: int) -> None:
        if n == 0:
            raise err
        descend(n - 1)

    try:
        descend(depth)
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")


def _deep_chain(links: int, depth: int) -> errors.SandboxError:
    """A provider error ``links`` causes long, each raised ``depth`` frames down."""
    inner: BaseException = _raised_deep(RuntimeError("the socket closed"), depth)
    for n in range(links - 1):
        outer = errors.ProviderUnavailable(f"attempt {n} failed")
        outer.__cause__ = inner
        inner = _raised_deep(outer, depth)
    top = errors.SelfhostedControlError(
        "no agent responded (offline)", code=5, reason="agent_offline", agent_offline=True
    )
    top.__cause__ = inner
    return typing.cast(errors.SandboxError, _raised_deep(top, depth))


def _chain_length(err: BaseException | None) -> int:
    n = 0
    while err is not None:
        n += 1
        err = err.cause if isinstance(err, ApplicationError | ActivityError) else err.__cause__
    return n


async def test_a_deep_failure_is_compacted_to_fit_the_server_limit() -> None:
    # Positive control: the same chain encoded without compaction is over the server's limit.
    raw = _deep_chain(links=8, depth=40)
    _, uncompacted = await _through_the_converter(_encoded(raw))
    assert len(uncompacted) > SERVER_FAILURE_LIMIT

    encoded = await _raised_by_an_activity(_deep_chain(links=8, depth=40))
    received, wire = await _through_the_converter(encoded)
    assert len(wire) < SERVER_FAILURE_LIMIT // 2
    assert isinstance(received, ApplicationError)
    decoded = from_application_error(received)
    assert type(decoded) is errors.AgentOffline and decoded.message == "no agent responded (offline)"
    assert _chain_length(received) <= CAUSE_LINKS_KEPT + 1  # the ApplicationError and its kept causes
    # The frames kept are where each error was raised.
    assert received.cause is not None and "descend" in (
        received.cause.failure.stack_trace if received.cause.failure else ""
    )


# The server's payload limit (limit.blobSize.error): a workflow task answering with a bigger message
# (an update's rejection carries its failure) fails again and again.
SERVER_PAYLOAD_LIMIT = 2 * 1024 * 1024


def _decoding_failure(elements: int) -> RuntimeError:
    """What the SDK raises for an update input it cannot decode: pydantic lists every bad element."""
    from pydantic import ValidationError

    from workflows.models.lease import ExecRequest

    try:
        try:
            ExecRequest.model_validate({"cmd": [1] * elements})
        except ValidationError as err:
            raise RuntimeError("Failed decoding arguments") from err
    except RuntimeError as caught:
        return caught
    raise AssertionError("unreachable")


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
async def test_every_failure_is_bounded_whatever_an_exception_says(encrypted: bool) -> None:
    """A 40 KB input that pydantic refuses element by element gives a 7 MB message; what leaves the
    converter stays far under the server's limit, cut where it says so, still encrypted."""
    converter = data_converter_for(PayloadKeys.generate("bounded") if encrypted else None)
    # Positive control: Temporal's own converter sends it whole, over the limit.
    unbounded = Failure()
    await dataclasses.replace(converter, failure_converter_class=DefaultFailureConverter).encode_failure(
        _decoding_failure(20_000), unbounded
    )
    assert unbounded.ByteSize() > SERVER_PAYLOAD_LIMIT

    failure = Failure()
    await converter.encode_failure(_decoding_failure(20_000), failure)
    assert failure.ByteSize() < 4 * FAILURE_TEXT_KEPT + 16 * 1024
    assert (b"input_value=1" not in failure.SerializeToString()) is encrypted
    decoded = await converter.decode_failure(failure)
    assert isinstance(decoded, ApplicationError) and decoded.message == "Failed decoding arguments"
    cause = decoded.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ValidationError"
    assert cause.message.startswith("20000 validation errors for ExecRequest\ncmd.0\n")
    assert cause.message.endswith("more characters cut)") and len(cause.message) < FAILURE_TEXT_KEPT + 100

    # A short failure passes unchanged.
    small = Failure()
    await converter.encode_failure(_decoding_failure(2), small)
    short = await converter.decode_failure(small)
    assert isinstance(short.cause, ApplicationError) and "cut" not in short.cause.message
    assert short.cause.message.startswith("2 validation errors for ExecRequest\ncmd.0\n")


def _raised_in_long_trace(err: BaseException, depth: int) -> BaseException:
    """``err`` raised ``depth`` frames down, alternating two functions (Python folds repeated frames)."""

    def ping(n: int) -> None:
        if n == 0:
            raise err
        pong(n - 1)

    def pong(n: int) -> None:
        ping(n)

    try:
        ping(depth)
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")


async def test_a_long_cause_chain_is_cut_to_its_first_links_and_stays_small() -> None:
    """The worst case: many links, each with a long message of characters JSON writes as six."""
    chain: BaseException = _raised_in_long_trace(RuntimeError("innermost"), 100)
    for n in range(3 * FAILURE_LINKS_KEPT):
        outer = RuntimeError(f"link {n} " + "\x00" * 100_000)
        outer.__cause__ = chain
        chain = _raised_in_long_trace(outer, 100)
    received, wire = await _through_the_converter(chain)
    assert len(wire) < 400 * 1024
    assert isinstance(received, ApplicationError) and received.message.startswith(f"link {3 * FAILURE_LINKS_KEPT - 1} ")
    assert _chain_length(received) == FAILURE_LINKS_KEPT
    # The stack trace keeps its innermost frames, where the error was raised.
    assert received.failure is not None and received.failure.stack_trace.startswith("(")
    assert received.failure.stack_trace.rstrip().endswith("raise err")
