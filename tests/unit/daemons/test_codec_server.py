"""The codec server's protocol and who it answers (aiohttp's test server on a real loopback port)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from daemons.codec_server import build_app
from sandbox.payload_codec import PayloadEncryptionCodec, PayloadKeys
from tests.conftest import free_port

UI = "http://127.0.0.1:8233"
CODEC = PayloadEncryptionCodec(PayloadKeys.generate("k1"))
PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=b'{"cmd": ["echo", "s3cret"]}')


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    port = free_port()
    test_server = TestServer(
        build_app(CODEC, ui_origin=UI, namespace="default", port=port), host="127.0.0.1", port=port
    )
    await test_server.start_server()
    async with aiohttp.ClientSession() as session:
        yield f"http://127.0.0.1:{port}", session
    await test_server.close()


def body(*payloads: Payload) -> dict[str, Any]:
    return json_format.MessageToDict(Payloads(payloads=list(payloads)))


HEADERS = {"X-Namespace": "default", "Origin": UI}


async def test_decode_and_encode_round_trip_for_the_ui(server: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = server
    async with session.post(f"{url}/encode", json=body(PLAIN), headers=HEADERS) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == UI
        encoded = json_format.ParseDict(await response.json(), Payloads())
    assert b"s3cret" not in encoded.payloads[0].SerializeToString()
    async with session.post(f"{url}/decode", json=body(*encoded.payloads), headers=HEADERS) as response:
        assert response.status == 200
        decoded = json_format.ParseDict(await response.json(), Payloads())
    assert list(decoded.payloads) == [PLAIN]


async def test_preflight_allows_the_ui_origin_only(server: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = server
    preflight = {"Origin": UI, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-namespace"}
    async with session.options(f"{url}/decode", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == UI
        assert "X-Namespace" in response.headers["Access-Control-Allow-Headers"]
    async with session.options(f"{url}/decode", headers={**preflight, "Origin": "http://evil.example"}) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("headers", "status", "why"),
    [
        ({"Origin": "http://evil.example"}, 403, "Origin"),
        ({"X-Namespace": "other"}, 403, "X-Namespace"),
        ({"X-Namespace": None}, 403, "X-Namespace"),
        ({"Host": "rebound.example:80"}, 403, "Host"),
    ],
)
async def test_refused_requests_decrypt_nothing(
    server: tuple[str, aiohttp.ClientSession], headers: dict[str, str | None], status: int, why: str
) -> None:
    url, session = server
    sent = {k: v for k, v in {**HEADERS, **headers}.items() if v is not None}
    async with session.post(f"{url}/decode", json=body(CODEC.encrypt(PLAIN)), headers=sent) as response:
        assert response.status == status
        answer = await response.json()
    assert why in answer["error"] and "payloads" not in answer


async def test_a_simple_cross_site_request_is_refused(server: tuple[str, aiohttp.ClientSession]) -> None:
    """A text/plain POST needs no CORS preflight, so it is refused outright."""
    url, session = server
    data = json_format.MessageToJson(Payloads(payloads=[CODEC.encrypt(PLAIN)]))
    headers = {"X-Namespace": "default", "Content-Type": "text/plain"}
    async with session.post(f"{url}/decode", data=data, headers=headers) as response:
        assert response.status == 415


async def test_unknown_key_and_bad_json_are_clear_errors(server: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = server
    foreign = PayloadEncryptionCodec(PayloadKeys.generate("retired")).encrypt(PLAIN)
    async with session.post(f"{url}/decode", json=body(foreign), headers=HEADERS) as response:
        assert response.status == 422
        assert "'retired'" in (await response.json())["error"]
    async with session.post(f"{url}/decode", json={"payloads": "not a list"}, headers=HEADERS) as response:
        assert response.status == 400


async def test_payloads_not_ours_come_back_unchanged(server: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = server
    async with session.post(f"{url}/decode", json=body(PLAIN), headers=HEADERS) as response:
        decoded = json_format.ParseDict(await response.json(), Payloads())
    assert list(decoded.payloads) == [PLAIN]
    assert base64.b64decode(body(PLAIN)["payloads"][0]["data"]) == PLAIN.data
