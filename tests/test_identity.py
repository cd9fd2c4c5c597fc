import os
import stat

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from cocoon_p2p.core.errors import BadSignature, IdentityError, MalformedMessage
from cocoon_p2p.core.identity import (
    Identity,
    load_or_create_identity,
    peer_id_from_str,
    peer_id_to_str,
    public_key_from_peer_id,
    verify,
)


def test_peer_id_matches_libp2p_derivation() -> None:
    for n in range(5):
        ident = Identity(bytes([n + 1]) * 32)
        libp2p_id = ID.from_pubkey(create_new_key_pair(ident.seed).public_key)
        assert ident.peer_id == libp2p_id.to_bytes()
        assert ident.peer_id_str == libp2p_id.pretty()
        assert ident.peer_id_str.startswith("12D3KooW")
        assert peer_id_from_str(ident.peer_id_str) == ident.peer_id


def test_sign_and_verify() -> None:
    a, b = Identity(b"\x01" * 32), Identity(b"\x02" * 32)
    sig = a.sign(b"hello")
    verify(a.peer_id, b"hello", sig)
    with pytest.raises(BadSignature):
        verify(a.peer_id, b"hellO", sig)
    with pytest.raises(BadSignature):
        verify(b.peer_id, b"hello", sig)
    with pytest.raises(BadSignature):
        verify(a.peer_id, b"hello", sig[:63])


@pytest.mark.parametrize("bad", [b"", b"\x00\x24" + b"\x00" * 36, b"\x12\x20" + b"\x00" * 32, b"\x00" * 38])
def test_non_ed25519_peer_ids_are_rejected(bad: bytes) -> None:
    with pytest.raises(MalformedMessage):
        public_key_from_peer_id(bad)


def test_peer_id_from_str_rejects_garbage() -> None:
    for text in ["", "0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", peer_id_to_str(b"\x00" * 38)]:
        with pytest.raises(MalformedMessage):
            peer_id_from_str(text)


def test_key_file_created_private_and_reused(tmp_path) -> None:
    path = tmp_path / "sub" / "node.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(path)
    assert again.peer_id == first.peer_id
    assert first.seed.hex() not in repr(first)
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp files left


def test_key_file_refused_when_readable_by_others(tmp_path) -> None:
    path = tmp_path / "node.key"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)


@pytest.mark.parametrize("content", [b"", b"not a key", b"cocoon-ed25519-seed-v1\nzz", b"cocoon-ed25519-seed-v1\n00"])
def test_damaged_key_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError):
        load_or_create_identity(path)
