"""Ed25519 identities, libp2p PeerIds, and the persistent key file.

A PeerId for an Ed25519 key is the *identity* multihash of the protobuf-encoded
public key (libp2p peer-id spec), so anyone holding a PeerId also holds the key
that verifies its signatures: records and announcements need not carry a key.
This module is pure (no trio); the key file is plain blocking file I/O done once
at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import base58
import nacl.exceptions
import nacl.signing

from .durable import write_atomic
from .errors import BadSignature, IdentityError, MalformedMessage

# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, then multihash identity (0x00, len 36).
_PB_ED25519_PREFIX = b"\x08\x01\x12\x20"
_PEER_ID_PREFIX = b"\x00\x24" + _PB_ED25519_PREFIX
PEER_ID_BYTES = len(_PEER_ID_PREFIX) + 32
_KEY_FILE_MAGIC = b"cocoon-ed25519-seed-v1\n"


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """Return the binary libp2p PeerId of an Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return _PEER_ID_PREFIX + public_key


def public_key_from_peer_id(peer_id: bytes) -> bytes:
    """Extract the Ed25519 key inlined in a binary PeerId.

    Raises MalformedMessage for PeerIds of other key types or hashed keys: our
    protocol accepts Ed25519 identities only, so signatures verify offline.
    """
    if len(peer_id) != PEER_ID_BYTES or not peer_id.startswith(_PEER_ID_PREFIX):
        raise MalformedMessage("peer id is not an inlined Ed25519 key", code="bad-peer-id")
    return peer_id[len(_PEER_ID_PREFIX) :]


def peer_id_to_str(peer_id: bytes) -> str:
    """Base58btc text form (``12D3KooW...``), as libp2p prints it."""
    return str(base58.b58encode(peer_id).decode("ascii"))


def peer_id_from_str(text: str) -> bytes:
    """Parse the base58btc text form of an Ed25519 PeerId."""
    try:
        raw = base58.b58decode(text)
    except ValueError as exc:
        raise MalformedMessage(f"not a base58 peer id: {text!r}", code="bad-peer-id") from exc
    public_key_from_peer_id(raw)
    return bytes(raw)


def verify(peer_id: bytes, message: bytes, signature: bytes) -> None:
    """Check that ``peer_id``'s key signed ``message``; raise BadSignature if not."""
    key = public_key_from_peer_id(peer_id)
    if len(signature) != 64:
        raise BadSignature("an Ed25519 signature has 64 bytes")
    try:
        nacl.signing.VerifyKey(key).verify(message, signature)
    except nacl.exceptions.BadSignatureError as exc:
        raise BadSignature("signature does not verify under the sender's peer id") from exc


class Identity:
    """An Ed25519 key pair and the PeerId it defines (immutable)."""

    __slots__ = ("seed", "public_key", "peer_id", "_signing")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise IdentityError("an Ed25519 seed has 32 bytes")
        self._signing = nacl.signing.SigningKey(seed)
        self.seed = bytes(seed)
        self.public_key = bytes(self._signing.verify_key)
        self.peer_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(os.urandom(32))

    @property
    def peer_id_str(self) -> str:
        return peer_id_to_str(self.peer_id)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message`` (64 bytes)."""
        return bytes(self._signing.sign(message).signature)

    def __repr__(self) -> str:  # never print the seed
        return f"Identity(peer_id={self.peer_id_str})"


class KeyFileExposed(IdentityError):
    """A file holding a secret (a node key, a wallet's mnemonic) is open to other users."""

    code = "key-file-exposed"


def refuse_if_exposed(path: Path) -> None:
    """KeyFileExposed if group or others may read or write ``path``: whoever can read a
    secret key can sign as us (a node key) or spend our money (a wallet)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileExposed(f"{path} is readable by others (mode {mode:o}); chmod 600 it")


def load_or_create_identity(path: Path) -> Identity:
    """Load the identity stored at ``path``, creating it (mode 0600) on first use.

    The file is written to a temporary name, fsynced and renamed, so a crash
    never leaves a half-written key that would change the PeerId on restart.
    """
    path = Path(path)
    if path.exists():
        data = path.read_bytes()
        if not data.startswith(_KEY_FILE_MAGIC):
            raise IdentityError(f"{path} is not a cocoon key file")
        try:
            seed = bytes.fromhex(data[len(_KEY_FILE_MAGIC) :].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise IdentityError(f"{path} holds a damaged key") from exc
        refuse_if_exposed(path)
        return Identity(seed)
    identity = Identity.generate()
    write_atomic(path, _KEY_FILE_MAGIC + identity.seed.hex().encode("ascii") + b"\n", mode=0o600)
    return identity
