"""The binding of a TDX quote to a libp2p peer: what REPORTDATA must hold.

Construction, version 1 (``cocoon-attest-v1``)::

    report_data = SHA-512( b"cocoon/attest/1\\0" || protobuf(PublicKey) )

where ``protobuf(PublicKey)`` is the libp2p protobuf encoding of the peer's Ed25519
public key (``08 01 12 20`` followed by the 32 key bytes): the key the Noise
handshake authenticates and that the PeerId inlines. SHA-512 fills the 64 bytes
of REPORTDATA exactly. The domain tag keeps this digest from ever matching one
made for another purpose; the version is in the tag, so a new construction is a
new tag. A quote made for one peer therefore fails the check for every other:
replaying another worker's quote gains nothing. Pure.
"""

from __future__ import annotations

import hashlib

from cocoon_p2p.core.identity import public_key_from_peer_id

BINDING_VERSION = 1
DOMAIN = b"cocoon/attest/1\x00"
_PB_ED25519_PREFIX = b"\x08\x01\x12\x20"  # protobuf PublicKey{Type: Ed25519, Data: 32 bytes}
REPORT_DATA_BYTES = 64


def report_data_for_key(public_key: bytes) -> bytes:
    """The 64 bytes a quote for the peer with this Ed25519 ``public_key`` carries."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return hashlib.sha512(DOMAIN + _PB_ED25519_PREFIX + public_key).digest()


def report_data_for_peer(peer_id: bytes) -> bytes:
    """The 64 bytes a quote for this (binary, Ed25519) PeerId carries."""
    return report_data_for_key(public_key_from_peer_id(peer_id))
