"""A paid job through real NATs, in each layout (issue 21): relay, hole punch, or both.

The internet of a :class:`~cocoon_p2p.testing.netlab.Lab` holds a bootstrap peer (a relay by
default) and the local TON chain; a worker sits behind an endpoint-independent NAT with
its default listen address (``0.0.0.0:4001``); a gateway (a paying client) sits on the
internet, behind another endpoint-independent NAT, or behind a symmetric one. Each layout
must serve paid jobs; how they travel is checked on the worker's own sockets:

* a direct TCP connection from the gateway's public address to the worker's port 4001
  that carries the jobs' bytes: DCUtR upgraded the relayed connection (cone NATs);
* none: the relay carries them (a symmetric NAT defeats hole punching).

Printed per layout: the path, the first request (which dials through the relay), how long
the upgrade took, and the median of the next requests.
"""

from __future__ import annotations

import enum
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoon_p2p.testing.localchain import localchain_dir
from cocoon_p2p.testing.netlab import Host, Lab, NatKind

from .test_netlab import Printed, start

pytestmark = pytest.mark.slow

CLI = ["-m", "cocoon_p2p.nodes.cli"]
JOBS = 6
UPGRADE_WAIT_S = 40.0  # three hole-punch rounds of 5 s each, a second apart, and their dials


class Route(enum.Enum):
    DIRECT = "direct"
    RELAYED = "relayed"


@dataclass(frozen=True)
class Layout:
    name: str
    client_nat: NatKind | None  # None: the gateway is on the internet
    path: Route


LAYOUTS = [
    Layout("public-gateway", None, Route.DIRECT),
    Layout("cone-cone", NatKind.ENDPOINT_INDEPENDENT, Route.DIRECT),
    Layout("cone-symmetric", NatKind.SYMMETRIC, Route.RELAYED),
]


@dataclass
class Internet:
    lab: Lab
    data: Path
    bootstrap_addr: str
    relay_ip: str  # the bootstrap peer's: it relays
    chain_url: str


@pytest.fixture(scope="module")
def internet(netlab: type[Lab], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    data = tmp_path_factory.mktemp("natjobs")
    with netlab() as lab:
        boot = lab.public_host("bootstrap")
        chain = lab.popen(
            boot, ["node", "server.mjs", "--host", boot.ip], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
            cwd=localchain_dir(),
        )  # fmt: skip
        assert chain.stdout is not None
        chain_url = chain.stdout.readline().decode().split()[1]
        b = start(lab, boot, ["bootstrap", "--data-dir", str(data / "boot"), "--listen", f"/ip4/{boot.ip}/tcp/4001"])
        yield Internet(lab, data, b.wait_for("listening").split()[1], boot.ip, chain_url)


GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"""
EMBED = """
import json, sys, time, urllib.request
body = json.dumps({"model": "minilm", "input": ["hello through two NATs"]}).encode()
times = []
for _ in range(int(sys.argv[1])):
    req = urllib.request.Request("http://127.0.0.1:8080/v1/embeddings", body, {"Content-Type": "application/json"})
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert len(json.load(resp)["data"][0]["embedding"]) == 384
    except urllib.error.HTTPError as exc:
        sys.exit(f"HTTP {exc.code}: {exc.read().decode()}")
    times.append((time.monotonic() - t) * 1000)
print(json.dumps(times))
"""


def metrics(lab: Lab, host: Host, url: str) -> dict[str, float]:
    out = lab.run(host, [sys.executable, "-c", GET, url])
    assert out.returncode == 0, out.stderr[-1000:]
    samples: dict[str, float] = {}
    for line in out.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def embed(lab: Lab, host: Host, n: int) -> list[float]:
    out = lab.run(host, [sys.executable, "-c", EMBED, str(n)], timeout_s=120)
    assert out.returncode == 0, out.stderr[-2000:]
    times: list[float] = json.loads(out.stdout)
    return times


def relayed_offer(lab: Lab, host: Host, internet: Internet, data: Path) -> bool:
    """Whether a peer on ``host`` finds a minilm worker announcing a relayed address."""
    out = lab.run(
        host,
        [sys.executable, *CLI, "find", "minilm", "--json", "--wait-s", "2", "--data-dir", str(data)]
        + ["--bootstrap", internet.bootstrap_addr],
        timeout_s=60,
    )
    return out.returncode == 0 and any(
        "/p2p-circuit/" in a for w in json.loads(out.stdout)["workers"] for a in w["addrs"]
    )


def sent_to(lab: Lab, host: Host, peer_ip: str) -> int | None:
    """Bytes ``host`` sent on its established TCP connections to ``peer_ip`` (None: it has none)."""
    out = lab.run(host, ["ss", "-tinH", "state", "established", "dst", peer_ip]).stdout
    if not out.strip():
        return None
    return sum(int(tok.split(":")[1]) for tok in out.split() if tok.startswith("bytes_sent:"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_a_paid_job_crosses_the_nats(internet: Internet, layout: Layout) -> None:
    started: list[Printed] = []
    try:
        run_layout(internet, layout, started)
    finally:  # the next layout's gateway must find only its own worker
        for node in started:
            node.proc.terminate()
        for node in started:
            node.proc.wait(timeout=30)


def run_layout(internet: Internet, layout: Layout, started: list[Printed]) -> None:
    lab, data = internet.lab, internet.data / layout.name
    n = LAYOUTS.index(layout)  # machine names are short (interface names): w0, g0, ...
    worker = lab.home_host(lab.home(f"wh{n}", NatKind.ENDPOINT_INDEPENDENT), f"w{n}")
    if layout.client_nat is None:
        client = lab.public_host(f"g{n}")
    else:
        client = lab.home_host(lab.home(f"gh{n}", layout.client_nat), f"g{n}")
    paid = ["--chain", internet.chain_url, "--local-chain", "--bootstrap", internet.bootstrap_addr]
    w = start(lab, worker, ["worker", "--data-dir", str(data / "w"), *paid, "--announce-interval-s", "1"]
              + ["--model", "minilm", "--backend", "onnxruntime", "--metrics", "127.0.0.1:9100"])  # fmt: skip
    started.append(w)
    w.wait_for("serving", timeout_s=120)
    # The network has its relayed address (gossip and the DHT) before the gateway asks.
    deadline = time.monotonic() + 60
    while not relayed_offer(lab, client, internet, data / "find"):
        assert time.monotonic() < deadline, "the worker's relayed address never reached the client's network"
    g = start(lab, client, ["gateway", "--data-dir", str(data / "g"), *paid, "--model", "minilm"]
              + ["--http", "127.0.0.1:8080", "--metrics", "127.0.0.1:9101"])  # fmt: skip
    started.append(g)
    g.wait_for("gateway http://", timeout_s=120)
    deadline = time.monotonic() + 30
    while "all-minilm" not in lab.run(client, [sys.executable, "-c", GET, "http://127.0.0.1:8080/v1/models"]).stdout:
        assert time.monotonic() < deadline, "the gateway never heard of the worker's model"
        time.sleep(0.5)

    [first_ms] = embed(lab, client, 1)  # finds the worker, dials it (through the relay), pays
    t0 = time.monotonic()
    while sent_to(lab, worker, client.public_ip) is None and time.monotonic() - t0 < UPGRADE_WAIT_S:
        time.sleep(0.2)
    upgrade_s = time.monotonic() - t0
    direct_before, relay_before = sent_to(lab, worker, client.public_ip), sent_to(lab, worker, internet.relay_ip)
    times = embed(lab, client, JOBS)
    direct_after, relay_after = sent_to(lab, worker, client.public_ip), sent_to(lab, worker, internet.relay_ip)
    # Each result is ~1.5 kB (384 floats): the path that carried them grew by about that much.
    results = JOBS * 1000
    if direct_before is not None and direct_after is not None and direct_after - direct_before > results:
        path = Route.DIRECT
    else:
        assert relay_before is not None and relay_after is not None and relay_after - relay_before > results
        path = Route.RELAYED
    deadline = time.monotonic() + 20  # the vouchers follow the results
    earned_key = "cocoon_channel_earned_unsettled_nanoton"
    while (earned := metrics(lab, worker, "http://127.0.0.1:9100/metrics")[earned_key]) <= 0:
        assert time.monotonic() < deadline, "the worker was not paid"
        time.sleep(0.5)
    print(
        f"{layout.name}: {path.value}"
        + (f" after {upgrade_s:.1f} s" if path is Route.DIRECT else "")
        + f"; first request (relayed dial + job) {first_ms:.0f} ms, then median {statistics.median(times):.0f} ms"
        + f" over {JOBS}; worker earned {earned:.0f} nanoton"
    )
    assert path is layout.path


def test_peers_on_one_lan_find_each_other_with_no_bootstrap_peer(internet: Internet) -> None:
    """mDNS: a worker and a client on the same home network, neither given a bootstrap peer."""
    lab, data = internet.lab, internet.data / "lan"
    home = lab.home("lan", NatKind.ENDPOINT_INDEPENDENT)
    worker, laptop = lab.home_host(home, "lanw"), lab.home_host(home, "lanc")
    w = start(lab, worker, ["worker", "--data-dir", str(data / "w"), "--announce-interval-s", "1"]
              + ["--model", "minilm", "--backend", "onnxruntime"])  # fmt: skip
    try:
        w.wait_for("serving", timeout_s=120)
        blind = lab.run(  # the control: without mDNS it has no way in
            laptop,
            [sys.executable, *CLI, "client", "embed", "x", "--wait-s", "3", "--no-mdns"]
            + ["--data-dir", str(data / "c0")],
            timeout_s=60,
        )
        assert blind.returncode != 0 and "served by" not in blind.stdout
        t = time.monotonic()
        out = lab.run(
            laptop,
            [sys.executable, *CLI, "client", "embed", "found on the LAN", "--wait-s", "15"]
            + ["--data-dir", str(data / "c")],
            timeout_s=90,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "served by" in out.stdout + out.stderr
        print(f"lan (mDNS, no bootstrap): found and served in {time.monotonic() - t:.1f} s")
    finally:
        w.proc.terminate()
        w.proc.wait(timeout=30)
