"""The worker directory and announcements: table-driven, no I/O."""

import contextlib
import dataclasses
import functools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cocoon_p2p.core import signed, wire
from cocoon_p2p.core.errors import (
    BadSignature,
    ExpiredMessage,
    ForeignKey,
    MalformedMessage,
    RateLimited,
    RemoteProtocolError,
    ReplayedMessage,
)
from cocoon_p2p.core.pricing import Price
from cocoon_p2p.overlay import announcement as ann_mod
from cocoon_p2p.overlay import capability
from cocoon_p2p.overlay.catalog import CatalogEntry
from cocoon_p2p.overlay.directory import WorkerDirectory
from cocoon_p2p.overlay.joblimits import JobLimits, JobSize

from .helpers import MODEL, MODEL_B, NOW, announcement, ident, offer, record


def test_announcement_round_trip_and_limits() -> None:
    a = announcement(ident(1), offers=(offer(), offer(MODEL_B, price_nanoton=5)))
    assert ann_mod.decode(a.encode(), now_ms=NOW) == a
    with pytest.raises(MalformedMessage):  # free capacity above capacity
        announcement(ident(1), offers=(offer(free_capacity=9),))
    too_many = tuple(offer(bytes([i]) * 32) for i in range(ann_mod.MAX_OFFERS + 1))
    with pytest.raises(MalformedMessage):
        ann_mod.decode(dataclasses.replace(a, offers=too_many).encode(), now_ms=NOW)


def test_offers_carry_their_job_limits_and_older_offers_without_them_still_decode() -> None:
    limits = JobLimits(max_items=256, max_text_chars=8192, max_total_chars=65536)
    a = announcement(ident(1), offers=(offer(limits=limits), offer(MODEL_B)))
    back = ann_mod.decode(a.encode(), now_ms=NOW)
    assert back == a and back.offers[0].limits == limits and back.offers[1].limits is None
    d = WorkerDirectory()
    d.receive_announcement(a.encode(), origin=ident(1).peer_id, now_ms=NOW)
    assert [w.limits for w in d.workers_for(MODEL, now_ms=NOW)] == [limits]
    for bad in ([0, 1, 1, 0], [1, 1, 1], [1, 1, 1, -1], "limits"):  # refused, not half-read
        forged = dataclasses.replace(a, offers=(offer(),))
        raw = forged._unsigned()
        raw[3] = [[*offer()._fields(), bad]]
        with pytest.raises(MalformedMessage):
            ann_mod.decode(wire.pack([*raw, signed.sign(ident(1), ann_mod.DOMAIN, raw)]), now_ms=NOW)


@pytest.mark.parametrize(
    ("size", "why"),
    [
        (JobSize.of(texts=("x",) * 257), "257 items: at most 256"),
        (JobSize.of(texts=("x" * 8193,)), "a text of 8193 characters: at most 8192"),
        (JobSize.of(texts=("x" * 8000,) * 9), "72000 characters in all: at most 65536"),
        (JobSize.of(texts=("x",), new_tokens=10**6), None),  # 0: no generation limit said
        (JobSize.of(rows=256), None),
    ],
)
def test_job_limits_say_why_a_job_is_beyond_them(size: JobSize, why: str | None) -> None:
    assert JobLimits(256, 8192, 65536).refusal(size) == why
    assert JobLimits(1, 100, 100, max_new_tokens=64).refusal(JobSize.of(texts=("hi",), new_tokens=65)) is not None


def test_tampered_announcement() -> None:
    a = announcement(ident(1))
    with pytest.raises(BadSignature):
        ann_mod.decode(dataclasses.replace(a, running_jobs=0).encode(), now_ms=NOW)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (sender, issued_at offset, receive-time offset, origin) -> outcome
        ([(1, 0, 0, 1)], ["ok"]),
        ([(1, 0, 0, 1), (1, 0, 1000, 1)], ["ok", ReplayedMessage]),
        ([(1, 0, 0, 1), (1, -5, 1000, 1)], ["ok", ReplayedMessage]),
        # Bunched delivery (a cache replayed to a new peer) is accepted up to max_burst...
        ([(1, 0, 0, 1), (1, 10, 10, 1)], ["ok", "ok"]),
        ([(1, 10 * i, 10 * i, 1) for i in range(5)], ["ok"] * 4 + [RateLimited]),
        # ...and the sustained rate stays one per min_interval_ms.
        (
            [(1, 0, 0, 1)] + [(1, 10 * i, 10 * i, 1) for i in range(1, 4)] + [(1, 250, 250, 1), (1, 260, 260, 1)],
            ["ok"] * 5 + [RateLimited],
        ),  # fmt: skip
        ([(1, 0, 0, 1), (1, 300, 300, 1)], ["ok", "ok"]),
        ([(1, 0, 0, 2)], [ForeignKey]),
        ([(1, 0, 40_000, 1)], [ExpiredMessage]),
        ([(1, 0, 0, 1), (2, 0, 0, 2)], ["ok", "ok"]),
    ],
)
def test_receive_announcement_table(steps: list[tuple[int, int, int, int]], expected: list[object]) -> None:
    d = WorkerDirectory()
    for (sender, issued, received, origin), want in zip(steps, expected, strict=True):
        data = announcement(ident(sender), now=NOW + issued).encode()
        if want == "ok":
            d.receive_announcement(data, origin=ident(origin).peer_id, now_ms=NOW + received)
        else:
            with pytest.raises(want):  # type: ignore[call-overload]
                d.receive_announcement(data, origin=ident(origin).peer_id, now_ms=NOW + received)


def test_merge_gossip_and_dht_freshest_first() -> None:
    d = WorkerDirectory()
    a, b, c = ident(1), ident(2), ident(3)
    d.receive_announcement(announcement(a, now=NOW).encode(), origin=a.peer_id, now_ms=NOW)
    d.receive_announcement(announcement(b, now=NOW + 10).encode(), origin=b.peer_id, now_ms=NOW + 10)
    recs = [
        record(a, now=NOW + 50, price_nanoton=777),  # newer than a's announcement: its terms win
        record(b, now=NOW - 100, price_nanoton=1),  # older than b's announcement: gossip terms stay
        record(c, now=NOW + 5),  # only in the DHT
        record(c, now=NOW + 5, model=MODEL_B),  # another model: not listed
    ]
    rows = d.workers_for(MODEL, now_ms=NOW + 60, extra=recs)
    assert [r.peer_id for r in rows] == [a.peer_id, b.peer_id, c.peer_id]
    by = {r.peer_id: r for r in rows}
    assert by[a.peer_id].price_nanoton == 777 and by[a.peer_id].free_capacity == 3
    assert by[a.peer_id].sources == {"gossip", "dht"}
    assert by[b.peer_id].price_nanoton == 1000 and by[b.peer_id].sources == {"gossip", "dht"}
    assert by[c.peer_id].free_capacity is None and by[c.peer_id].sources == {"dht"}
    assert len(d.workers_for(MODEL, now_ms=NOW + 60, extra=recs)) == 3  # the same records twice: no duplicates


def test_expiry_and_forget() -> None:
    d = WorkerDirectory()
    a = ident(1)
    d.receive_announcement(announcement(a, ttl=1000).encode(), origin=a.peer_id, now_ms=NOW)
    d.add_record(record(a, ttl=5000))
    assert len(d.workers_for(MODEL, now_ms=NOW + 500)) == 1
    assert d.workers_for(MODEL, now_ms=NOW + 2000)[0].sources == {"dht"}
    assert d.workers_for(MODEL, now_ms=NOW + 6000) == []
    d.add_record(record(a, ttl=5000))
    assert d.addrs_of(a.peer_id) == list(d.announcement_of(a.peer_id).addrs) != []  # type: ignore[union-attr]
    d.forget(a.peer_id)
    assert d.workers_for(MODEL, now_ms=NOW) == []
    assert d.addrs_of(a.peer_id) == []


def test_memory_is_bounded() -> None:
    d = WorkerDirectory(max_workers=3)
    for n in range(1, 6):
        who = ident(n)
        d.receive_announcement(announcement(who, now=NOW + n).encode(), origin=who.peer_id, now_ms=NOW + n)
    assert len(d.known_peers(NOW + 10)) == 3
    assert [a.peer_id for a in d.known_peers(NOW + 10)] == [ident(n).peer_id for n in (5, 4, 3)]


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["announce", "record", "forget", "expire", "query"]),
        st.integers(1, 3),  # worker
        st.integers(0, 1),  # model
        st.sampled_from([500, 3000, 20_000]),  # ttl
        st.integers(0, 2500),  # time passing before the step
    ),
    max_size=40,
)


@functools.cache
def _signed(who: int, model: int, now: int, ttl: int, kind: str) -> Any:
    m = (MODEL, MODEL_B)[model]
    if kind == "announce":
        return announcement(ident(who), now=now, ttl=ttl, offers=(offer(m, price_nanoton=now % 997),))
    return record(ident(who), now=now, ttl=ttl, model=m, price_nanoton=now % 991)


@settings(max_examples=150, deadline=None)
@given(_OPS, st.sampled_from([10_000, 2]))
def test_cached_offers_always_equal_a_fresh_scan(ops: list[tuple[str, int, int, int, int]], room: int) -> None:
    """A client asks for offers on every job, so they are cached and patched one worker at a
    time: whatever happens in between (announcements, records, bans, expiry, time, workers
    pushed out of a full directory), the answer is the scan's."""
    d = WorkerDirectory(min_interval_ms=0, max_workers=room)
    now = NOW
    for kind, who, model, ttl, wait in ops:
        now += wait
        if kind in ("announce", "record"):
            item = _signed(who, model, now, ttl, kind)
            if kind == "record":
                d.add_record(item)
            else:
                with contextlib.suppress(RemoteProtocolError):
                    d.accept(item, origin=None, now_ms=now)
        elif kind == "forget":
            d.forget(ident(who).peer_id)
        elif kind == "expire":
            d.expire(now)
        for m in (MODEL, MODEL_B):
            fresh = dataclasses.replace(d, _offers={}).workers_for(m, now_ms=now)
            assert d.workers_for(m, now_ms=now) == fresh


def test_a_worker_pushed_out_of_a_full_directory_leaves_the_cached_offers() -> None:
    d = WorkerDirectory(min_interval_ms=0, max_workers=2)
    d.accept(announcement(ident(1), ttl=10_000), origin=None, now_ms=NOW)
    d.accept(announcement(ident(2), ttl=20_000), origin=None, now_ms=NOW)
    d.expire(NOW)  # the next expiry is known: the eviction below runs no expiry pass
    assert {w.peer_id for w in d.workers_for(MODEL, now_ms=NOW)} == {ident(1).peer_id, ident(2).peer_id}
    d.accept(announcement(ident(3), ttl=30_000), origin=None, now_ms=NOW + 1)  # ident(1), first to expire, goes
    assert {w.peer_id for w in d.workers_for(MODEL, now_ms=NOW + 1)} == {ident(2).peer_id, ident(3).peer_id}


def test_a_new_announcement_patches_the_cached_offers_freshest_first() -> None:
    d = WorkerDirectory(min_interval_ms=0)
    for n in (1, 2, 3):
        d.accept(announcement(ident(n), now=NOW + n, running_jobs=0), origin=None, now_ms=NOW + 3)
    before = d.workers_for(MODEL, now_ms=NOW + 3)
    assert [w.peer_id for w in before] == [ident(n).peer_id for n in (3, 2, 1)]
    d.accept(announcement(ident(1), now=NOW + 4, running_jobs=5), origin=None, now_ms=NOW + 4)
    after = d.workers_for(MODEL, now_ms=NOW + 4)
    assert [w.peer_id for w in after] == [ident(n).peer_id for n in (1, 3, 2)]
    assert after[0].running_jobs == 5 and after[1] is before[0]  # the other rows kept, not rebuilt


def test_offers_carry_a_completion_price_through_gossip_and_the_dht() -> None:
    """A second price per generated token travels in announcements and DHT records, and
    the merged offer and the catalog row say both; a flat offer's bytes are unchanged."""
    two = offer(price_nanoton=2, completion_price_nanoton=7, catalog=CatalogEntry("m", "fp32"))
    a = announcement(ident(1), offers=(two,))
    back = ann_mod.decode(a.encode(), now_ms=NOW)
    assert back == a and back.offers[0].price == Price(2, 7) and back.offers[0].price.highest == 7
    no_catalog = dataclasses.replace(two, catalog=None)  # the catalog slot is nil then
    assert ann_mod.decode(announcement(ident(1), offers=(no_catalog,)).encode(), now_ms=NOW).offers == (no_catalog,)
    assert len(offer()._fields()) == ann_mod._OFFER_FIELDS  # flat: as every older offer
    d = WorkerDirectory()
    d.receive_announcement(a.encode(), origin=ident(1).peer_id, now_ms=NOW)
    (w,) = d.workers_for(MODEL, now_ms=NOW)
    assert w.price == Price(2, 7)
    (row,) = d.catalog(NOW)
    assert (row.min_price_nanoton, row.min_completion_price_nanoton) == (2, 7)
    rec = record(ident(2), completion_price_nanoton=9)
    assert capability.decode(rec.encode(), now_ms=NOW).price == Price(rec.price_nanoton, 9)
    prices = {w.peer_id: w.price for w in d.workers_for(MODEL, now_ms=NOW, extra=[rec])}
    assert prices == {ident(1).peer_id: Price(2, 7), ident(2).peer_id: Price(rec.price_nanoton, 9)}


def test_a_forgotten_peers_older_announcement_replayed_later_stays_out() -> None:
    """Gossip caches replay old announcements: once a peer is forgotten (banned, lost), an
    older one arriving later must not bring its stale terms back; a newer one is welcome."""
    d = WorkerDirectory()
    old, new = announcement(ident(1), now=NOW), announcement(ident(1), now=NOW + 1000)
    d.receive_announcement(new.encode(), origin=ident(1).peer_id, now_ms=NOW + 1000)
    d.forget(ident(1).peer_id)
    with pytest.raises(ReplayedMessage):
        d.receive_announcement(old.encode(), origin=ident(1).peer_id, now_ms=NOW + 1000)
    assert d.workers_for(MODEL, now_ms=NOW + 1000) == []
    newer = announcement(ident(1), now=NOW + 2000)
    d.receive_announcement(newer.encode(), origin=ident(1).peer_id, now_ms=NOW + 2000)
    assert [w.issued_at_ms for w in d.workers_for(MODEL, now_ms=NOW + 2000)] == [NOW + 2000]
