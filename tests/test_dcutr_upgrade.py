"""DCUtR's direct dial before a hole punch (cocoon_p2p/transport/dcutr_upgrade.py): only
addresses outside any LAN, nothing when none is left, the first verified connection wins.
A DCUtR stand-in records the dials; trio's MockClock measures the waits exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from multiaddr import Multiaddr

from cocoon_p2p.transport.dcutr_upgrade import direct_candidates, upgrade_directly

PUBLIC_A, PUBLIC_B = "/ip4/203.0.113.7/tcp/4001", "/ip4/198.51.100.9/tcp/4001"
LAN = "/ip4/10.0.2.2/tcp/4001"
RELAYED = "/ip4/203.0.113.10/tcp/4001/p2p/12D3KooWETKtDqj787zetihuT13M8RVannT161Gx2xzDwEHdy6FV/p2p-circuit"


@dataclass
class Peerstore:
    known: list[Multiaddr]

    def addrs(self, peer: object) -> list[Multiaddr]:
        return self.known


@dataclass
class Host:
    store: Peerstore

    def get_peerstore(self) -> Peerstore:
        return self.store


@dataclass
class FakeDCUtR:
    """The two DCUtR methods the upgrade calls: a dial answers after its delay, or never."""

    host: Host
    answers_after: dict[str, float]
    dial_timeout: float = 2.0
    direct: bool = False
    dialed: list[str] = field(default_factory=list)

    async def _dial_peer(self, peer: object, addr: Multiaddr) -> None:
        self.dialed.append(str(addr))
        delay = self.answers_after.get(str(addr))
        if delay is None:
            await trio.sleep_forever()
        await trio.sleep(delay)
        self.direct = True

    async def _verify_direct_connection(self, peer: object) -> bool:
        return self.direct


def fake(addrs: list[str], answers_after: dict[str, float]) -> FakeDCUtR:
    return FakeDCUtR(Host(Peerstore([Multiaddr(a) for a in addrs])), answers_after)


@pytest.mark.parametrize(
    ("addrs", "answers_after", "ok", "dialed", "waited"),
    [
        ([LAN, RELAYED, "/ip4/0.0.0.0/tcp/4001"], {}, False, [], 0.0),  # nothing worth a dial: at once
        ([LAN, PUBLIC_A, PUBLIC_B, RELAYED], {PUBLIC_A: 0.3}, True, [PUBLIC_A, PUBLIC_B], 0.3),  # first wins
        ([PUBLIC_A], {}, False, [PUBLIC_A], 2.0),  # none answers: the dial timeout
    ],
)
def test_the_direct_dial_tries_public_addresses_only_and_stops_at_the_first(
    addrs: list[str], answers_after: dict[str, float], ok: bool, dialed: list[str], waited: float
) -> None:
    dcutr = fake(addrs, answers_after)

    async def main() -> tuple[bool, float]:
        t0 = trio.current_time()
        result = await upgrade_directly(dcutr, "peer")  # type: ignore[arg-type]
        return result, trio.current_time() - t0

    result, took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert result is ok and sorted(dcutr.dialed) == sorted(dialed)
    assert took == pytest.approx(waited, abs=1e-9)


def test_direct_candidates_drop_relayed_and_lan_addresses() -> None:
    got = direct_candidates([Multiaddr(a) for a in (LAN, PUBLIC_A, RELAYED, "/ip4/127.0.0.1/tcp/1", PUBLIC_B)])
    assert [str(a) for a in got] == [PUBLIC_A, PUBLIC_B]
