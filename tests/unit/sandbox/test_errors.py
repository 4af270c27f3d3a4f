"""The error hierarchy: every class has a unique wire type and survives the Temporal boundary."""

from __future__ import annotations

import pytest

from sandbox import errors


def _all() -> list[type[errors.SandboxError]]:
    out: list[type[errors.SandboxError]] = []
    stack: list[type[errors.SandboxError]] = [errors.SandboxError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def test_error_types_are_unique_and_drawn_in_the_docstring() -> None:
    types = [cls.error_type for cls in _all()]
    assert len(types) == len(set(types)), types
    doc = errors.__doc__ or ""
    missing = [cls.__name__ for cls in _all() if cls.__name__ not in doc]
    assert not missing, f"add these to the tree in sandbox/errors.py's docstring: {missing}"


@pytest.mark.parametrize("cls", _all(), ids=lambda c: c.__name__)
def test_error_from_type_rebuilds_the_class(cls: type[errors.SandboxError]) -> None:
    rebuilt = errors.error_from_type(cls.error_type, "what happened; what to do")
    assert type(rebuilt) is cls
    assert rebuilt.message == "what happened; what to do"
    assert rebuilt.retryable == cls.default_retryable


def test_unknown_type_is_still_a_sandbox_error() -> None:
    err = errors.error_from_type("SomethingElse", "boom")
    assert type(err) is errors.SandboxError and err.message == "boom"


def test_retryability_defaults() -> None:
    assert errors.ProviderUnavailable("x").retryable
    assert not errors.BoxNotFound("x").retryable
    assert not errors.StaleEpoch("x").retryable
    assert errors.ProvisionFailed("x", retryable=False).retryable is False
