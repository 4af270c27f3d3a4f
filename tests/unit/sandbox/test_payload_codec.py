"""The payload codec: round trip, tampering, rotation, pass-through, key configuration and files."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from temporalio.api.common.v1 import Payload

from sandbox.errors import PayloadKeyUnknown, PayloadTampered, SandboxConfigError
from sandbox.payload_codec import (
    ENCODING,
    KEY_ID_METADATA,
    PayloadEncryptionCodec,
    PayloadKeys,
    data_converter,
    data_converter_for,
    ensure_payload_keys,
    load_payload_keys,
)
from sandbox.settings import Settings

KEYS = PayloadKeys.generate("k1")
CODEC = PayloadEncryptionCodec(KEYS)

payloads = st.builds(
    lambda metadata, data: Payload(metadata=metadata, data=data),
    st.dictionaries(st.text(min_size=1, max_size=20), st.binary(max_size=64), max_size=5),
    st.binary(max_size=4096),
)


@given(payloads)
@settings(max_examples=200, deadline=None)
def test_round_trip_of_any_payload(payload: Payload) -> None:
    """Any bytes and metadata come back exactly; the sealed form carries neither in clear."""
    sealed = CODEC.encrypt(payload)
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID_METADATA] == b"k1"
    assert set(sealed.metadata) == {"encoding", KEY_ID_METADATA}
    if len(payload.data) >= 8:
        assert payload.data not in sealed.data
    assert CODEC.decrypt(sealed) == payload


@given(payloads, st.data())
@settings(max_examples=200, deadline=None)
def test_any_flipped_bit_is_refused(payload: Payload, data: st.DataObject) -> None:
    """Flipping any one bit of the sealed bytes (nonce, ciphertext or tag) fails authentication."""
    sealed = CODEC.encrypt(payload)
    position = data.draw(st.integers(0, len(sealed.data) * 8 - 1))
    tampered = bytearray(sealed.data)
    tampered[position // 8] ^= 1 << (position % 8)
    sealed.data = bytes(tampered)
    with pytest.raises(PayloadTampered, match="'k1' failed authentication"):
        CODEC.decrypt(sealed)


def test_truncated_payload_is_refused() -> None:
    sealed = CODEC.encrypt(Payload(metadata={"encoding": b"json/plain"}, data=b"{}"))
    sealed.data = sealed.data[:5]
    with pytest.raises(PayloadTampered):
        CODEC.decrypt(sealed)


def test_key_id_is_authenticated() -> None:
    """Relabelling a payload with another known key id fails (the id is GCM associated data)."""
    ring = KEYS.rotated("k2")
    both = PayloadEncryptionCodec(PayloadKeys(current="k1", keys=ring.keys))
    sealed = both.encrypt(Payload(data=b"secret"))
    sealed.metadata[KEY_ID_METADATA] = b"k2"
    with pytest.raises(PayloadTampered):
        both.decrypt(sealed)


def test_a_different_key_under_the_same_id_is_refused() -> None:
    impostor = PayloadEncryptionCodec(PayloadKeys.generate("k1"))
    with pytest.raises(PayloadTampered):
        impostor.decrypt(CODEC.encrypt(Payload(data=b"secret")))


def test_unknown_key_id_says_which_key_to_add() -> None:
    sealed = PayloadEncryptionCodec(PayloadKeys.generate("retired")).encrypt(Payload(data=b"x"))
    with pytest.raises(PayloadKeyUnknown) as caught:
        CODEC.decrypt(sealed)
    assert "'retired'" in caught.value.message and "SANDBOX_PAYLOAD_KEYS" in caught.value.message


def test_rotation_encrypts_with_the_new_key_and_decrypts_the_old() -> None:
    old = PayloadEncryptionCodec(KEYS)
    rotated_keys = KEYS.rotated("k2")
    new = PayloadEncryptionCodec(rotated_keys)
    before = old.encrypt(Payload(data=b"written before rotation"))
    after = new.encrypt(Payload(data=b"written after rotation"))
    assert after.metadata[KEY_ID_METADATA] == b"k2"
    assert new.decrypt(before).data == b"written before rotation"
    with pytest.raises(PayloadKeyUnknown):  # control: the old ring cannot read the new key's payloads
        old.decrypt(after)
    # The ring survives its JSON form (what SANDBOX_PAYLOAD_KEYS and the keys file hold).
    assert PayloadKeys.from_json(rotated_keys.to_json()) == rotated_keys


def test_payloads_that_are_not_ours_pass_through() -> None:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"cmd": ["ls"]}')
    foreign = Payload(metadata={"encoding": ENCODING, "encryption-key-id": b"theirs"}, data=b"opaque")
    assert asyncio.run(CODEC.decode([plain, foreign])) == [plain, foreign]


def test_codec_batches_keep_order() -> None:
    batch = [Payload(data=bytes([i]) * i) for i in range(10)]
    assert asyncio.run(CODEC.decode(asyncio.run(CODEC.encode(batch)))) == batch


def test_repr_shows_key_ids_never_key_material() -> None:
    secret = base64.b64encode(KEYS.keys["k1"]).decode()
    assert repr(KEYS) == "PayloadKeys(current='k1', ids=['k1'])"
    assert secret not in repr(KEYS) and secret not in str(KEYS)
    assert secret not in repr(Settings(payload_keys=KEYS.to_json()))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", "not valid payload keys"),
        ('{"current": "a", "keys": {"a": "!!"}}', "not valid payload keys"),
        ('{"current": "a", "keys": {"a": "' + base64.b64encode(b"short").decode() + '"}}', "is 5 bytes"),
        ('{"current": "b", "keys": {"a": "' + base64.b64encode(bytes(32)).decode() + '"}}', "'b' is not among"),
        ('{"current": "a", "keys": {}}', "holds no key"),
    ],
)
def test_malformed_keys_name_the_setting(text: str, expected: str) -> None:
    with pytest.raises(SandboxConfigError, match=expected) as caught:
        PayloadKeys.from_json(text)
    assert "SANDBOX_PAYLOAD_KEYS" in caught.value.message
    assert caught.value.__cause__ is None


def test_keys_file_is_made_once_private_and_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, payload_keys=None)
    first = ensure_payload_keys(settings)
    path = tmp_path / "secrets" / "payload-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_payload_keys(settings) == first and load_payload_keys(settings) == first
    assert [p.name for p in path.parent.iterdir()] == ["payload-keys.json"]  # no temporary left


def test_concurrent_first_use_agrees_on_one_ring(tmp_path: Path) -> None:
    """The worker and the codec server start together: both must end up with the same key."""
    settings = Settings(data_dir=tmp_path, payload_keys=None)
    rings: list[PayloadKeys] = []
    threads = [threading.Thread(target=lambda: rings.append(ensure_payload_keys(settings))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(rings) == 8 and all(ring == rings[0] for ring in rings)


def test_keys_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, payload_keys=None)
    ensure_payload_keys(settings)
    settings.payload_keys_file().chmod(0o644)
    with pytest.raises(SandboxConfigError, match="chmod 600"):
        load_payload_keys(settings)


def test_malformed_keys_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "payload-keys.json"
    path.parent.mkdir(mode=0o700)
    path.write_text(json.dumps({"current": "a"}))
    path.chmod(0o600)
    with pytest.raises(SandboxConfigError, match="payload keys file .*payload-keys.json"):
        load_payload_keys(Settings(data_dir=tmp_path, payload_keys=None))


def test_keys_file_that_cannot_be_opened_says_what_to_do(tmp_path: Path) -> None:
    """A symlink in place of the file is refused (never followed: it could point at another ring)."""
    settings = Settings(data_dir=tmp_path, payload_keys=None)
    ensure_payload_keys(settings)
    path = settings.payload_keys_file()
    path.rename(path.with_name("elsewhere.json"))
    path.symlink_to(path.with_name("elsewhere.json"))
    with pytest.raises(SandboxConfigError, match="cannot read or create the payload keys at .*fix its permissions"):
        ensure_payload_keys(settings)
    with pytest.raises(SandboxConfigError, match="cannot read the payload keys at .*fix its permissions"):
        load_payload_keys(settings)  # a client is refused the same way


def test_a_client_never_makes_keys_and_says_how_to_get_them(tmp_path: Path) -> None:
    """Without the setting and the file, reading the keys (a client's side) is refused and creates nothing.

    A ring a client made up would hold a key the worker does not have; the error names the setting
    and the file and says to start the stack. Positive control: once the worker side made the file,
    the same read returns its ring.
    """
    data = tmp_path / "data"
    settings = Settings(data_dir=data, payload_keys=None)
    with pytest.raises(SandboxConfigError) as caught:
        load_payload_keys(settings)
    message = caught.value.message
    assert "SANDBOX_PAYLOAD_KEYS" in message and str(data / "secrets" / "payload-keys.json") in message
    assert "sandboxctl up" in message
    assert not data.exists()
    with pytest.raises(SandboxConfigError, match="SANDBOX_PAYLOAD_KEYS"):
        data_converter(settings)  # the converter every client connects with reads the same way
    assert not data.exists()

    made = ensure_payload_keys(settings)
    assert load_payload_keys(settings) == made
    codec = data_converter(settings).payload_codec
    assert isinstance(codec, PayloadEncryptionCodec) and codec.keys == made


def test_setting_wins_over_the_file_and_encryption_can_be_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, payload_keys=KEYS.to_json())
    assert load_payload_keys(settings) == KEYS
    assert not (tmp_path / "secrets").exists()
    codec = data_converter(settings).payload_codec
    assert isinstance(codec, PayloadEncryptionCodec) and codec.keys == KEYS
    assert data_converter(Settings(data_dir=tmp_path, payload_encryption=False)).payload_codec is None
    assert data_converter_for(None).payload_codec is None


async def test_converter_encrypts_values_and_failure_messages() -> None:
    """What the SDK writes through the converter: values and failure messages are ciphertext."""
    from temporalio.api.failure.v1 import Failure
    from temporalio.exceptions import ApplicationError

    converter = data_converter_for(KEYS)
    [sealed] = await converter.encode([{"cmd": ["echo", "marker-value"]}])
    assert b"marker-value" not in sealed.SerializeToString()
    assert await converter.decode([sealed], [dict]) == [{"cmd": ["echo", "marker-value"]}]
    failure = Failure()
    await converter.encode_failure(ApplicationError("stderr said marker-failure", type="ExecTimeout"), failure)
    assert b"marker-failure" not in failure.SerializeToString()
    decoded = await converter.decode_failure(failure)
    assert "marker-failure" in str(decoded)
