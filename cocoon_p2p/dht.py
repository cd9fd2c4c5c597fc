"""Capability records in py-libp2p's Kademlia DHT (trio side).

Each worker stores one signed record per model under
``/cocoon/<model-hex>/<peer-id>`` and provides the model's sha2-256
multihash; a lookup finds the providers, then reads and verifies each one's
record. Two py-libp2p 0.8.1 defects are handled here:

* ``find_providers`` returns the local provider store alone whenever it holds
  any provider: a DHT server that happens to store one worker's provider
  record never asks the network for the others. :func:`find_providers` always
  merges the local store with a query of the k closest peers.
* it returns the same provider many times: results are deduplicated by PeerId.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator

from . import capability
from .capability import CapabilityRecord
from .errors import ProtocolError

log = logging.getLogger("cocoon_p2p.dht")
ALPHA = 3  # Kademlia's query concurrency


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class DhtStats:
    records_published: int = 0
    records_rejected: int = 0
    lookups: int = 0


class CapabilityValidator(Validator):
    """Validator for the ``/cocoon/`` namespace. py-libp2p runs it on our puts,
    on records other peers store on us (invalid ones are refused), and on
    values returned to our lookups."""

    def __init__(self, stats: DhtStats) -> None:
        self._stats = stats

    def validate(self, key: str, value: bytes) -> None:
        try:
            capability.decode_for_key(key, value, now_ms=_now_ms())
        except ProtocolError:
            self._stats.records_rejected += 1
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        now = _now_ms()
        best, best_at = 0, -1
        for i, v in enumerate(values):
            try:
                at = capability.decode_for_key(key, v, now_ms=now).issued_at_ms
            except ProtocolError:
                continue
            if at > best_at:
                best, best_at = i, at
        return best


async def publish(dht: KadDHT, rec: CapabilityRecord) -> None:
    """Store ``rec`` and provide its model's key. Raises when the DHT refuses."""
    await dht.put_value(rec.dht_key(), rec.encode())
    await dht.provide(capability.provider_key(rec.model_id))


async def find_providers(dht: KadDHT, model_id: bytes) -> dict[bytes, PeerInfo]:
    """Every provider of ``model_id`` known locally or to the k closest peers."""
    key = bytes.fromhex(capability.provider_key(model_id))
    store = dht.provider_store
    found: dict[bytes, PeerInfo] = {p.peer_id.to_bytes(): p for p in store.get_providers(key)}
    closest = await dht.peer_routing.find_closest_peers_network(key)
    limiter = trio.Semaphore(ALPHA)

    async def ask(peer: ID) -> None:
        async with limiter:
            try:
                with trio.move_on_after(5):
                    providers, _closer = await store._get_providers_from_peer_with_closers(peer, key)
            except Exception as exc:  # one silent peer must not fail the lookup
                log.debug("GET_PROVIDERS to %s failed: %s", peer, exc)
                return
            for p in providers:
                found.setdefault(p.peer_id.to_bytes(), p)

    async with trio.open_nursery() as nursery:
        for peer in closest:
            if peer != dht.local_peer_id:
                nursery.start_soon(ask, peer)
    return found


async def lookup(dht: KadDHT, model_id: bytes, stats: DhtStats) -> list[CapabilityRecord]:
    """The verified capability records of every provider of ``model_id``."""
    stats.lookups += 1
    providers = await find_providers(dht, model_id)
    records: list[CapabilityRecord] = []
    limiter = trio.Semaphore(8)

    async def fetch(peer_id: bytes, info: PeerInfo) -> None:
        if info.addrs:  # so that a later job stream can dial it
            dht.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
        key = capability.dht_key(model_id, peer_id)
        async with limiter:
            try:
                value = await dht.get_value(key)
            except Exception as exc:
                log.debug("DHT get %s failed: %s", key, exc)
                return
        if value is None:
            return
        try:
            records.append(capability.decode_for_key(key, value, now_ms=_now_ms()))
        except ProtocolError as err:
            stats.records_rejected += 1
            log.info("bad capability record at %s: %s", key, err)

    async with trio.open_nursery() as nursery:
        for pid, info in providers.items():
            nursery.start_soon(fetch, pid, info)
    return records
