"""The ``none`` provider: described like every backend, but it never has a box.

The coroutine methods are driven with ``asyncio.run`` so these pure tests need no event-loop fixture.
"""

from __future__ import annotations

import asyncio

import pytest

from providers.none import NoneProvider
from sandbox.box import BoxSpec, Envelope, Provider
from sandbox.descriptors import CAPABILITY_DESCRIPTORS
from sandbox.errors import ProviderError, Unsupported

SPEC = BoxSpec(lease_id="lease/ws-1/grp-1", workspace_id="ws-1", group_id="grp-1", epoch=3)
ENVELOPE = Envelope(backend_id="none", instance_id="never-created")


def test_implements_the_provider_protocol() -> None:
    provider: Provider = NoneProvider()
    assert isinstance(provider, Provider)


def test_describes_itself_as_the_none_backend() -> None:
    provider = NoneProvider()
    assert provider.descriptor is CAPABILITY_DESCRIPTORS["none"]
    assert provider.backend_id == provider.descriptor.backend_id == "none"
    caps = provider.descriptor.capabilities
    assert not any(
        cell.available for cell in (caps.file_system, caps.terminal, caps.git, caps.desktop_stream, caps.recording)
    )


def test_needs_no_credentials() -> None:
    NoneProvider().validate_credentials()  # raises SandboxConfigError if it wanted settings


def test_create_is_refused_with_a_pointer_to_a_real_backend() -> None:
    with pytest.raises(Unsupported) as err:
        asyncio.run(NoneProvider().create(SPEC, idempotency_key="lease/ws-1/grp-1#3"))
    assert isinstance(err.value, ProviderError)
    assert err.value.retryable is False
    assert "`none` backend has no box" in err.value.message
    assert "local" in err.value.message


def test_resume_is_refused_not_reported_as_box_not_found() -> None:
    # Unsupported, not BoxNotFound: a NotFound would license a cold restore that can never succeed.
    with pytest.raises(Unsupported) as err:
        asyncio.run(NoneProvider().resume(ENVELOPE))
    assert type(err.value) is Unsupported
    assert "`none` backend has no box" in err.value.message
    assert "local" in err.value.message


def test_terminate_is_an_idempotent_no_op() -> None:
    provider = NoneProvider()

    async def terminate_twice() -> None:
        await provider.terminate(ENVELOPE)
        await provider.terminate(ENVELOPE)  # a second terminate of a gone box is not an error

    asyncio.run(terminate_twice())


def test_owns_no_boxes() -> None:
    assert asyncio.run(NoneProvider().list_owned()) == []
