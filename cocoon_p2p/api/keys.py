"""API keys for the gateway: who may spend its node's money.

Keys come from a file (one per line; blank lines and ``#`` comments skipped, so a key
cannot contain ``#`` or whitespace) and from the environment variable
:data:`ENV_VAR` (comma separated). A request presents one as OpenAI clients do,
``Authorization: Bearer <key>``. The check compares SHA-256 digests of equal length with
:func:`hmac.compare_digest` against every key, with no early exit, so neither the time nor
the length of a key leaks which key (or how much of one) matched.

A gateway bound to an address other than loopback must have keys: see
:func:`check_exposure`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cocoon_p2p.core.errors import ConfigError

ENV_VAR = "COCOON_API_KEYS"
MIN_KEY_CHARS = 16  # shorter keys are guessable by a patient client


@dataclass(frozen=True)
class ApiKeys:
    """The keys a gateway accepts, kept as digests."""

    digests: tuple[bytes, ...]

    @classmethod
    def of(cls, keys: Iterable[str]) -> ApiKeys:
        """These keys (ConfigError for one too short or with whitespace in it)."""
        out = []
        for key in keys:
            if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
                raise ConfigError(f"an API key must be at least {MIN_KEY_CHARS} characters, without spaces")
            out.append(hashlib.sha256(key.encode()).digest())
        return cls(tuple(dict.fromkeys(out)))

    @classmethod
    def load(cls, path: Path | None = None, environ: Mapping[str, str] | None = None) -> ApiKeys:
        """The keys of ``path`` (when given) and of :data:`ENV_VAR` in ``environ`` (default:
        this process's environment). A key file that holds no key is an error: it must not
        silently mean "no authentication"."""
        keys: list[str] = []
        if path is not None:
            try:
                lines = Path(path).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read the API key file {path}: {exc}") from exc
            from_file = [line.split("#", 1)[0].strip() for line in lines]
            from_file = [k for k in from_file if k]
            if not from_file:
                raise ConfigError(f"the API key file {path} holds no key")
            keys += from_file
        env = os.environ if environ is None else environ
        keys += [k.strip() for k in env.get(ENV_VAR, "").split(",") if k.strip()]
        return cls.of(keys)

    def __bool__(self) -> bool:
        return bool(self.digests)

    def __len__(self) -> int:
        return len(self.digests)

    def check(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys."""
        if authorization is None:
            return False
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = hashlib.sha256(key.strip().encode()).digest()
        found = False
        for digest in self.digests:  # every key compared: the time does not say which matched
            found |= hmac.compare_digest(presented, digest)
        return found


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any address


def check_exposure(host: str, keys: ApiKeys, *, insecure_no_auth: bool = False) -> None:
    """Refuse (ConfigError) to serve on a non-loopback ``host`` without keys: anyone who
    reaches it could spend the node's money. ``insecure_no_auth`` overrides it."""
    if keys or is_loopback(host) or insecure_no_auth:
        return
    raise ConfigError(
        f"the gateway would listen on {host} without API keys, so anyone who reaches it could spend this "
        f"node's money: give --api-key-file (or {ENV_VAR}), listen on 127.0.0.1, or pass --insecure-no-auth"
    )
