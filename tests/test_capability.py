import dataclasses
import json
from pathlib import Path

import msgpack
import pytest

from cocoon_p2p.core import wire
from cocoon_p2p.core.errors import (
    BadSignature,
    ExpiredMessage,
    ForeignKey,
    MalformedMessage,
    MessageTooLarge,
    RemoteProtocolError,
)
from cocoon_p2p.overlay import capability
from cocoon_p2p.overlay.capability import CapabilityRecord, decode, decode_for_key, dht_key, provider_key, select_newest

from .helpers import MODEL, MODEL_B, NOW, ident, record

VECTORS = Path(__file__).parent / "vectors" / "capability.json"


def test_round_trip() -> None:
    rec = record(ident(1))
    assert decode(rec.encode(), now_ms=NOW + 1) == rec
    assert decode_for_key(rec.dht_key(), rec.encode(), now_ms=NOW) == rec
    assert len(rec.encode()) < 400


def test_golden_vector() -> None:
    """Fixed seed and fields -> exact bytes: the wire format and the signed
    payload may not change without a version bump."""
    vec = json.loads(VECTORS.read_text())
    rec = record(ident(vec["seed_byte"]), now=vec["now_ms"], ttl=vec["ttl_ms"])
    assert rec.encode().hex() == vec["encoded_hex"]
    assert rec.dht_key() == vec["dht_key"]
    assert provider_key(rec.model_id) == vec["provider_key"]


def _resign(rec: CapabilityRecord, **changes: object) -> bytes:
    """Change fields *after* signing: the signature no longer covers them."""
    return dataclasses.replace(rec, **changes).encode()


@pytest.mark.parametrize(
    "changes",
    [{"price_nanoton": 1}, {"capacity": 99}, {"addrs": ("/ip4/6.6.6.6/tcp/1",)}, {"expires_at_ms": NOW + 90_000}],
)
def test_tampered_fields_fail_signature(changes: dict[str, object]) -> None:
    rec = record(ident(1))
    with pytest.raises(BadSignature):
        decode(_resign(rec, **changes), now_ms=NOW)


def test_signature_by_another_key_is_rejected() -> None:
    rec = record(ident(1))
    forged = dataclasses.replace(rec, signature=record(ident(2)).signature)
    with pytest.raises(BadSignature):
        decode(forged.encode(), now_ms=NOW)


@pytest.mark.parametrize(
    ("now", "error"),
    [(NOW + 60_000, ExpiredMessage), (NOW + 10**9, ExpiredMessage), (NOW - 120_000, ExpiredMessage)],
)
def test_validity_window(now: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(record(ident(1)).encode(), now_ms=now)


def test_lifetime_is_capped() -> None:
    rec = record(ident(1), ttl=capability.MAX_TTL_MS + 1)
    with pytest.raises(MalformedMessage, match="lifetime"):
        decode(rec.encode(), now_ms=NOW)


def test_foreign_keys() -> None:
    a, b = ident(1), ident(2)
    rec = record(a)
    for key in [dht_key(MODEL, b.peer_id), dht_key(MODEL_B, a.peer_id), "/other/x/y", "/cocoon/zz/" + a.peer_id_str]:
        with pytest.raises(RemoteProtocolError):
            decode_for_key(key, rec.encode(), now_ms=NOW)
    with pytest.raises(ForeignKey):
        decode_for_key(dht_key(MODEL, b.peer_id), rec.encode(), now_ms=NOW)


def test_non_canonical_encoding_is_rejected() -> None:
    rec = record(ident(1))
    fields = msgpack.unpackb(rec.encode())
    # same values, but the version as a uint64 instead of a fixint
    body = (
        b"\x9e" + b"\xcf" + (1).to_bytes(8, "big") + b"".join(msgpack.packb(f, use_bin_type=True) for f in fields[1:])
    )
    with pytest.raises(MalformedMessage, match="canonical"):
        decode(body, now_ms=NOW)


def test_size_limit_and_field_limits() -> None:
    with pytest.raises(MessageTooLarge):
        decode(b"\x00" * (capability.MAX_RECORD_BYTES + 1), now_ms=NOW)
    with pytest.raises(MalformedMessage):
        record(ident(1), addrs=tuple(f"/ip4/1.1.1.{i}/tcp/1" for i in range(capability.MAX_ADDRS + 1)))
    with pytest.raises(MalformedMessage):
        record(ident(1), unit="x" * 65)
    with pytest.raises(MalformedMessage):
        record(ident(1), capacity=0)


def test_wrong_types_and_versions() -> None:
    rec = record(ident(1))
    fields = msgpack.unpackb(rec.encode())
    for index, value in [(0, 2), (3, 7), (5, -1), (7, "free"), (10, "addr"), (11, True), (13, b"short")]:
        bad = list(fields)
        bad[index] = value
        with pytest.raises(MalformedMessage):
            decode(wire.pack(bad), now_ms=NOW)


def test_select_newest() -> None:
    a = ident(1)
    recs = [record(a, now=NOW), record(a, now=NOW + 5), record(a, now=NOW + 2)]
    assert select_newest(recs) == 1
