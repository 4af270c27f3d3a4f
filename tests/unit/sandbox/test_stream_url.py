"""Stream URLs: upstream conformance and the rules of ``build_stream_url``."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from sandbox.box import Endpoint
from sandbox.errors import ProviderError, StreamPortUnavailable
from sandbox.stream_url import build_stream_url
from tests.upstream_vectors import vectors_dir

VECTOR_FILE = "stream_url.json"
EXPECTED_COUNT = 43

# Endpoints upstream turns into a URL only because JavaScript accepts any number as a port, brackets
# any host with a ':' and reads fields by truthiness. A provider returning these is broken, so we
# refuse them with StreamPortUnavailable, which the caller degrades to "no stream".
STRICTER_THAN_UPSTREAM = {
    "host:port string gets bracketed (quirk)": "a host with ':' must be an IPv6 literal",
    "path non-string ignored": "path must be a string",
    "tls truthy string -> wss": "tls must be a bool",
    "tls 0 (falsy) -> ws, default 80": "tls must be a bool",
    "port 0 accepted (number)": "port must be an int in 1..65535",
    "port -1 accepted (number)": "port must be an int in 1..65535",
    "port 1.5 accepted (number)": "port must be an int in 1..65535",
    "port NaN": "port must be an int in 1..65535",
    "port 65536 accepted (number)": "port must be an int in 1..65535",
    "port 1e21 (String() exponent form)": "port must be an int in 1..65535",
    "port Infinity": "port must be an int in 1..65535",
}


def load_vectors() -> list[dict[str, Any]]:
    path = vectors_dir() / VECTOR_FILE
    if not path.is_file():
        pytest.fail(
            f"upstream vectors not found: {path} is missing. Point SANDBOX_VECTORS_DIR at the folder "
            "holding the upstream-vectors JSON files."
        )
    return list(json.loads(path.read_text(encoding="utf-8")))


def vector_params() -> list[Any]:
    path = vectors_dir() / VECTOR_FILE
    if not path.is_file():
        return [pytest.param(None, id=f"{VECTOR_FILE}-missing")]
    return [pytest.param(v, id=f"{i:02d}-{v['note'][:60]}") for i, v in enumerate(load_vectors())]


def decode_markers(value: Any) -> Any:
    if isinstance(value, dict):
        if "$number" in value:
            return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "-0": -0.0}[value["$number"]]
        return {k: decode_markers(v) for k, v in value.items() if v != {"$undefined": True}}
    return value


@pytest.mark.parametrize("vector", vector_params())
def test_stream_url_matches_upstream(vector: dict[str, Any] | None) -> None:
    if vector is None:
        load_vectors()  # fails with the explanation
        return
    (endpoint,) = decode_markers(vector["args"])
    expect = vector["expect"]
    if vector["note"] in STRICTER_THAN_UPSTREAM:
        assert "ok" in expect, "vector no longer documents an upstream leniency"
        with pytest.raises(StreamPortUnavailable):
            build_stream_url(endpoint)
    elif "error" in expect:
        assert expect["error"]["name"] == "StreamPortUnavailableError"
        with pytest.raises(StreamPortUnavailable, match="malformed exposed-port endpoint"):
            build_stream_url(endpoint)
    else:
        assert build_stream_url(endpoint) == expect["ok"]
        if isinstance(endpoint.get("host"), str) and type(endpoint.get("port")) is int:
            # Our providers return Endpoint; it must give the same URL as the upstream shape.
            ours = Endpoint(
                host=endpoint["host"],
                port=endpoint["port"],
                tls=bool(endpoint.get("tls")),
                path=endpoint.get("path") or "/",
                query=endpoint.get("query") or "",
            )
            assert build_stream_url(ours) == expect["ok"]


def test_vector_file_has_every_stream_url_vector() -> None:
    vectors = load_vectors()
    assert len(vectors) == EXPECTED_COUNT
    assert set(STRICTER_THAN_UPSTREAM) <= {v["note"] for v in vectors}


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        (Endpoint(host="box.internal", port=6080), "ws://box.internal:6080/"),
        (Endpoint(host="box.internal", port=443, tls=True), "wss://box.internal/"),
        (Endpoint(host="box.internal", port=443), "ws://box.internal:443/"),
        (Endpoint(host="box.internal", port=80), "ws://box.internal/"),
        (Endpoint(host="box.internal", port=80, tls=True), "wss://box.internal:80/"),
        (Endpoint(host="::1", port=7681), "ws://[::1]:7681/"),
        (Endpoint(host="[2001:db8::1]", port=443, tls=True), "wss://[2001:db8::1]/"),
        (Endpoint(host="fe80::1%eth0", port=6080), "ws://[fe80::1%eth0]:6080/"),
        (Endpoint(host="127.0.0.1", port=65535), "ws://127.0.0.1:65535/"),
        (Endpoint(host="h", port=1, path="stream"), "ws://h:1/stream"),
        (Endpoint(host="h", port=6080, path=""), "ws://h:6080/"),
        (
            Endpoint(host="x.bl.run", port=443, tls=True, query="bl_preview_token=a%2Fb&x="),
            "wss://x.bl.run/?bl_preview_token=a%2Fb&x=",
        ),
        (Endpoint(host="relay", port=443, tls=True, path="/stream", query="ch=1"), "wss://relay/stream?ch=1"),
        ({"host": "h", "port": 6080, "tls": None, "path": None, "query": None}, "ws://h:6080/"),
    ],
)
def test_stream_url_table(endpoint: Any, url: str) -> None:
    assert build_stream_url(endpoint) == url


@pytest.mark.parametrize(
    "endpoint",
    [
        Endpoint(host="", port=6080),
        Endpoint(host="h", port=0),
        Endpoint(host="h", port=65536),
        Endpoint(host="h", port=True),
        Endpoint(host="evil.example/x?", port=6080),
        Endpoint(host="user@h", port=6080),
        Endpoint(host="h h", port=6080),
        Endpoint(host="[::1", port=6080),
        Endpoint(host="[not-ipv6]", port=6080),
        Endpoint(host="h", port=6080, path="/a#frag"),
        Endpoint(host="h", port=6080, path="/a b"),
        Endpoint(host="h", port=6080, query="t=1\r\nHost: x"),
        {"host": "h", "port": 6080, "query": 5},
        {"host": "h", "port": 6080.0},
        None,
        "ws://h:6080/",
    ],
)
def test_malformed_endpoints_raise_stream_port_unavailable(endpoint: Any) -> None:
    with pytest.raises(StreamPortUnavailable) as info:
        build_stream_url(endpoint)
    assert isinstance(info.value, ProviderError)


def test_error_never_echoes_the_provider_query() -> None:
    with pytest.raises(StreamPortUnavailable) as info:
        build_stream_url(Endpoint(host="h", port=0, query="bl_preview_token=SECRET"))
    assert "SECRET" not in str(info.value)
