"""DCUtR's direct dial before a hole punch, as go-libp2p does it (trio side).

Before it punches, py-libp2p 0.8.1's DCUtR dials every non-relayed address the
peerstore holds for the peer and waits for all of them, up to its dial timeout,
even after one worked. A peer behind a NAT announces its private LAN address,
which never answers from outside: each upgrade waited the whole timeout for it
before punching. Here only addresses outside any LAN are dialed (go-libp2p dials
only public ones), nothing is waited for when none is left, and the first
verified direct connection ends the other dials.
"""

from __future__ import annotations

import logging

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from multiaddr import Multiaddr

from .addresses import is_lan, is_relayed

log = logging.getLogger(__name__)


def direct_candidates(addrs: list[Multiaddr]) -> list[Multiaddr]:
    """The addresses in ``addrs`` worth a direct dial from another network: not relayed, not LAN."""
    return [a for a in addrs if not is_relayed(str(a)) and not is_lan(a)]


async def upgrade_directly(dcutr: DCUtRProtocol, peer_id: ID) -> bool:
    """Dial ``peer_id``'s direct candidates at once; True when a direct connection to it
    is open. Stops at the first that verifies (the others are cancelled: a cancelled
    dial leaves no connection), or after ``dcutr.dial_timeout``."""
    try:
        addrs = direct_candidates(list(dcutr.host.get_peerstore().addrs(peer_id)))
    except Exception:  # the peerstore no longer knows the peer
        return False
    if not addrs:
        return False

    async def dial(addr: Multiaddr, race: trio.Nursery) -> None:
        await dcutr._dial_peer(peer_id, addr)  # logs and swallows its own failures
        if await dcutr._verify_direct_connection(peer_id):
            race.cancel_scope.cancel()

    try:
        with trio.move_on_after(dcutr.dial_timeout):
            async with trio.open_nursery() as race:
                for addr in addrs:
                    race.start_soon(dial, addr, race)
    except Exception as exc:  # as py-libp2p's own: a failed dial means a hole punch next
        log.debug("direct dial to %s failed: %s", peer_id, exc)
    ok: bool = await dcutr._verify_direct_connection(peer_id)
    log.debug("direct dial to %s before hole punching: %s", peer_id, "ok" if ok else "failed")
    return ok


def dial_public_first(dcutr: DCUtRProtocol) -> None:
    """Make ``dcutr``'s dial before a hole punch :func:`upgrade_directly` (instance attribute:
    this DCUtR only)."""

    async def try_unilateral_upgrade(peer_id: ID) -> bool:
        return await upgrade_directly(dcutr, peer_id)

    dcutr._try_unilateral_upgrade = try_unilateral_upgrade  # type: ignore[method-assign]
