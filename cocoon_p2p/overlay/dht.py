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
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import ProtocolError
from cocoon_p2p.core.metrics import Metric, metric

from . import capability, protocols
from .capability import CapabilityRecord

log = logging.getLogger(__name__)
ALPHA = 3  # Kademlia's query concurrency


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
            capability.decode_for_key(key, value, now_ms=now_ms())
        except ProtocolError:
            self._stats.records_rejected += 1
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        now = now_ms()
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
            records.append(capability.decode_for_key(key, value, now_ms=now_ms()))
        except ProtocolError as err:
            stats.records_rejected += 1
            log.info("bad capability record at %s: %s", key, err)

    async with trio.open_nursery() as nursery:
        for pid, info in providers.items():
            nursery.start_soon(fetch, pid, info)
    return records


class CapabilityDht:
    """The node's Kademlia DHT, holding capability records (``async with`` runs it).

    Cancellation: leaving the block stops py-libp2p's DHT service; a publish or
    lookup cancelled half-way leaves nothing of ours half-written (records are
    whole values, each put independently).
    """

    def __init__(self, host: Any, *, server: bool) -> None:
        self.stats = DhtStats()
        self.kad = KadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT)
        self.kad.register_validator(protocols.DHT_NAMESPACE, CapabilityValidator(self.stats))
        self._service: Any = None

    async def __aenter__(self) -> CapabilityDht:
        self._service = background_trio_service(self.kad)
        await self._service.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        service, self._service = self._service, None
        if service is not None:
            await service.__aexit__(*exc)

    async def publish(self, record: CapabilityRecord) -> bool:
        """Store ``record`` and provide its model; False when the DHT refused (no peer yet...)."""
        try:
            await publish(self.kad, record)
        except Exception as exc:  # e.g. no DHT peer yet: the next round retries
            log.info("DHT publish of %s failed: %s", record.model_id.hex()[:12], exc)
            return False
        self.stats.records_published += 1
        return True

    async def lookup(self, model_id: bytes) -> list[CapabilityRecord]:
        """The verified records of every provider of ``model_id``."""
        return await lookup(self.kad, model_id, self.stats)

    async def add_peer(self, peer_id: bytes) -> None:
        await self.kad.routing_table.add_peer(ID(peer_id))

    async def meet_neighbours(self, local_peer_id: bytes) -> None:
        """Kademlia's join step: a lookup of our own id meets the peers closest to us."""
        await self.kad.peer_routing.find_closest_peers_network(local_peer_id)

    def metrics(self) -> list[Metric]:
        return [
            metric("cocoon_dht_lookups_total", "counter", "DHT capability lookups", self.stats.lookups),
            metric("cocoon_dht_records_rejected_total", "counter", "Invalid DHT records", self.stats.records_rejected),
            metric(
                "cocoon_dht_records_published_total",
                "counter",
                "Capability records stored",
                self.stats.records_published,
            ),
        ]
