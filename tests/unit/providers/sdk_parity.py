"""Signature parity of a fake SDK with the real one, so a fake cannot drift from the SDK it stands in for."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

_BOUND = ("self", "cls")
_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)


def assert_fake_signature_matches(fake: Callable[..., Any], real: Callable[..., Any]) -> None:
    """Assert every parameter of ``fake`` exists on ``real`` (same kind, same positional order), and vice versa
    for the required ones; a fake takes ``**kwargs`` only where the SDK does."""
    name = fake.__qualname__
    fake_params = inspect.signature(fake).parameters
    real_params = inspect.signature(real).parameters
    real_named = [p for p in real_params.values() if p.name not in _BOUND]
    for param in fake_params.values():
        if param.name in _BOUND or param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert param.name in real_params, f"{name}: the SDK has no parameter {param.name!r}"
        assert real_params[param.name].kind == param.kind, f"{name}: {param.name!r} is passed differently"
    positional = [
        p.name
        for p in fake_params.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name not in _BOUND
    ]
    assert positional == [p.name for p in real_named[: len(positional)]], f"{name}: positional order differs"
    for param in real_named:
        if param.default is inspect.Parameter.empty and param.kind not in _VARIADIC:
            assert param.name in fake_params, f"{name}: the fake lacks the required {param.name!r}"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in real_params.values()):
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in fake_params.values()), name
