"""Real NATs in network namespaces (:mod:`cocoon_p2p.testing.netlab`), and our nodes across them.

Skipped, with the reason printed, where namespaces or iptables cannot be used (not root,
no ``ip``/``iptables``). The NAT tests prove the lab translates and filters as a home
router does; the node tests show a worker behind a NAT joining through a public bootstrap
peer, what works over the connection it opened, and a fresh public client reaching it through the
relay (the paid layouts, hole punching and mDNS: ``tests/test_nat_jobs.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cocoon_p2p.core.identity import load_or_create_identity
from cocoon_p2p.testing.netlab import Host, Lab, NatKind, NetlabUnavailable, remove_stale_labs

pytestmark = pytest.mark.slow

CLI = ["-m", "cocoon_p2p.nodes.cli"]
PORT = 7000
# Each connection is answered with the address the server saw it come from.
OBSERVER = f"""
import socket
srv = socket.create_server(("0.0.0.0", {PORT}))
print("ready", flush=True)
while True:
    conn, (ip, port) = srv.accept()
    conn.sendall(f"{{ip}} {{port}}".encode())
    conn.close()
"""
# argv: local port (0: any), then ip:port targets. Prints what each target saw, or
# "error <why>"; every connection stays open until the end, as a relay connection would.
DIALER = """
import socket, sys
held = []
for target in sys.argv[2:]:
    ip, port = target.split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.settimeout(1.0)
    try:
        s.bind(("0.0.0.0", int(sys.argv[1])))
        s.connect((ip, int(port)))
        print(s.recv(100).decode(), flush=True)
    except OSError as exc:
        print("error", type(exc).__name__, flush=True)
    held.append(s)
"""


@pytest.fixture
def lab(netlab: type[Lab]) -> Iterator[Lab]:
    with netlab() as built:
        yield built


def start_observer(lab: Lab, host: Host) -> None:
    proc = lab.python(host, ["-c", OBSERVER], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"


def dial(lab: Lab, host: Host, *targets: str, local_port: int = 0) -> list[str]:
    out = lab.run(host, [sys.executable, "-c", DIALER, str(local_port), *targets])
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def running() -> str:
    """The command lines of all processes (an ended one that nobody reaped yet shows as
    ``[sleep] <defunct>``)."""
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout


def test_a_failure_inside_the_lab_leaves_nothing_behind(netlab: type[Lab]) -> None:
    built: set[str] = set()
    with pytest.raises(RuntimeError), netlab() as lab:
        home = lab.home("home", NatKind.SYMMETRIC)
        # a stray: a grandchild the lab never saw, in a home host
        lab.popen(lab.home_host(home, "laptop"), ["sh", "-c", "sleep 600 & sleep 600"])
        built = set(lab.namespaces)
        raise RuntimeError("a test failed")
    assert len(built) == 3 and not built & namespaces()
    assert "sleep 600" not in running()


BUILD_AND_HANG = """
import sys
from cocoon_p2p.testing.netlab import Lab
lab = Lab().__enter__()
lab.popen(lab.public_host("server"), ["sleep", "600"])
print(" ".join(lab.namespaces), flush=True)
sys.stdin.read()
"""


@pytest.mark.usefixtures("netlab")
def test_the_next_lab_removes_what_a_killed_run_left() -> None:
    run = subprocess.Popen([sys.executable, "-c", BUILD_AND_HANG], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert run.stdout is not None
    left = set(run.stdout.readline().decode().split())
    run.kill()  # SIGKILL: no teardown ran
    run.wait()
    assert left <= namespaces()
    assert set(remove_stale_labs()) == left
    assert not left & namespaces()
    assert "sleep 600" not in running()


@pytest.mark.parametrize(("nat", "same_mapping"), [(NatKind.ENDPOINT_INDEPENDENT, True), (NatKind.SYMMETRIC, False)])
def test_nat_translates_to_the_router_address(lab: Lab, nat: NatKind, same_mapping: bool) -> None:
    servers = [lab.public_host("s1"), lab.public_host("s2")]
    home = lab.home("home", nat)
    laptop = lab.home_host(home, "laptop")
    for server in servers:
        start_observer(lab, server)
    seen = [line.split() for line in dial(lab, laptop, *(f"{s.ip}:{PORT}" for s in servers), local_port=40000)]
    assert [ip for ip, _ in seen] == [home.public_ip, home.public_ip]  # NAT happened: never 10.0.1.2
    ports = {int(port) for _, port in seen}
    # One private ip:port seen as one public port by everybody (Linux also keeps the
    # port itself) is what hole punching needs; a symmetric NAT maps each flow anew.
    assert ports == {40000} if same_mapping else len(ports) == 2


@pytest.mark.parametrize("nat", list(NatKind))
def test_nat_drops_unsolicited_inbound(lab: Lab, nat: NatKind) -> None:
    outsider, other = lab.public_host("outsider"), lab.public_host("other")
    home = lab.home("home", nat)
    laptop, neighbour = lab.home_host(home, "laptop"), lab.home_host(home, "neighbour")
    start_observer(lab, laptop)
    start_observer(lab, outsider)
    assert dial(lab, neighbour, f"{laptop.ip}:{PORT}")[0].split()[0] == neighbour.ip  # the LAN reaches it
    assert dial(lab, outsider, f"{home.public_ip}:{PORT}") == ["error TimeoutError"]  # dropped, silently
    # An attacker on the router's own link routes to the private range: still dropped.
    subprocess.run(["ip", "-n", outsider.netns, "route", "add", "10.0.0.0/8", "via", home.public_ip], check=True)
    assert dial(lab, outsider, f"{laptop.ip}:{PORT}") == ["error TimeoutError"]
    # The laptop's flow out (its conntrack entry, and so its mapping, outlives the
    # connection by minutes) opens no door for anybody else: not full-cone.
    [(ip, port)] = [line.split() for line in dial(lab, laptop, f"{outsider.ip}:{PORT}", local_port=40000)]
    assert ip == home.public_ip
    assert dial(lab, other, f"{home.public_ip}:{port}") == ["error TimeoutError"]


# argv: the peer's ip:port, what to say. Connects from port 40000 (the port it would
# listen on), as DCUtR does: TCP simultaneous open.
PUNCH = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", 40000))
s.settimeout(4)
ip, port = sys.argv[1].split(":")
try:
    s.connect((ip, int(port)))
    s.sendall(sys.argv[2].encode())
    print("heard", s.recv(100).decode(), flush=True)
except OSError as exc:
    print("error", type(exc).__name__, flush=True)
"""


@pytest.mark.parametrize(
    ("nats", "punched"),
    [
        ((NatKind.ENDPOINT_INDEPENDENT, NatKind.ENDPOINT_INDEPENDENT), True),
        ((NatKind.ENDPOINT_INDEPENDENT, NatKind.SYMMETRIC), False),
    ],
)
def test_tcp_hole_punch_crosses_cone_nats_only(lab: Lab, nats: tuple[NatKind, NatKind], punched: bool) -> None:
    homes = [lab.home(f"home{i}", nat) for i, nat in enumerate(nats)]
    a, b = (lab.home_host(home, f"peer{i}") for i, home in enumerate(homes))
    # Each dials the other's router at the port it dials from (a port-preserving NAT's
    # mapping): the first SYN out opens its own NAT for the other's SYN.
    procs = [
        lab.python(me, ["-c", PUNCH, f"{other.public_ip}:40000", me.name], stdout=subprocess.PIPE)
        for me, other in ((a, b), (b, a))
    ]
    heard = [proc.communicate(timeout=30)[0].decode().strip() for proc in procs]
    assert heard == (["heard peer1", "heard peer0"] if punched else ["error TimeoutError"] * 2)


CONNECT_S = """
import socket, sys, time
t = time.monotonic()
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
print(time.monotonic() - t)
"""


@pytest.mark.parametrize(("delay_ms", "rate_kbit", "qdisc"), [(0, 1000, "tbf"), (40, 0, "netem")])
def test_shape_puts_a_qdisc_on_the_uplink(lab: Lab, delay_ms: float, rate_kbit: int, qdisc: str) -> None:
    a, b = lab.public_host("a"), lab.public_host("b")
    try:
        lab.shape(a, delay_ms=delay_ms, rate_kbit=rate_kbit)
    except NetlabUnavailable as exc:  # netem is a module many minimal kernels leave out
        pytest.skip(str(exc))
    assert f"qdisc {qdisc}" in lab.run(a, ["tc", "qdisc", "show", "dev", a.iface]).stdout
    start_observer(lab, b)
    took_s = float(lab.run(a, [sys.executable, "-c", CONNECT_S, b.ip, str(PORT)]).stdout)
    assert took_s >= delay_ms / 1000  # the SYN waited on a's uplink (a lower bound only)
    lab.shape(a)  # back to no shaping
    assert f"qdisc {qdisc}" not in lab.run(a, ["tc", "qdisc", "show", "dev", a.iface]).stdout


# -- cocoon nodes across a NAT ---------------------------------------------------


@dataclass
class Printed:
    """What a node process prints on stdout, line by line, read by a thread (a full
    pipe would block the node)."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode().rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, word: str, timeout_s: float = 60.0) -> str:
        """The first line that starts with ``word`` (waiting for it)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                found = [line for line in self.lines if line.startswith(word)]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {word!r} line; printed: {self.lines}")
                self.cond.wait(min(left, 0.5))


@dataclass
class NatNetwork:
    """A bootstrap peer and a gateway on the internet; a worker behind an
    endpoint-independent NAT that bootstraps to both."""

    lab: Lab
    data: Path
    bootstrap: Host
    gateway: Host
    client: Host
    worker: Host
    bootstrap_addr: str
    worker_peer: str
    connect_s: float  # worker started -> its connection seen at the bootstrap peer


def start(lab: Lab, host: Host, args: list[str]) -> Printed:
    return Printed(lab.python(host, [*CLI, *args, "--log-level", "WARNING"], stdout=subprocess.PIPE))


def listen(host: Host) -> str:
    """Its own address, at kubo's port."""
    return f"/ip4/{host.ip}/tcp/4001"


def established(lab: Lab, host: Host) -> list[tuple[str, str]]:
    """(local, peer) address:port pairs of ``host``'s established TCP connections."""
    out = lab.run(host, ["ss", "-tnH", "state", "established"]).stdout
    return [(cols[-2], cols[-1]) for cols in (line.split() for line in out.splitlines())]


@pytest.fixture(scope="module")
def natnet(netlab: type[Lab], tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatNetwork]:
    data = tmp_path_factory.mktemp("netlab")
    with netlab() as lab:
        bootstrap, gateway, client = lab.public_host("bootstrap"), lab.public_host("gateway"), lab.public_host("client")
        home = lab.home("home", NatKind.ENDPOINT_INDEPENDENT)
        worker = lab.home_host(home, "worker")
        b = start(lab, bootstrap, ["bootstrap", "--data-dir", str(data / "b"), "--listen", listen(bootstrap)])
        bootstrap_addr = b.wait_for("listening").split()[1]
        g_args = ["--data-dir", str(data / "g"), "--listen", listen(gateway), "--bootstrap", bootstrap_addr]
        g = start(lab, gateway, ["gateway", *g_args, "--model", "minilm"])
        gateway_addr = g.wait_for("listening").split()[1]
        g.wait_for("gateway http://")
        worker_peer = load_or_create_identity(data / "w" / "node.key").peer_id_str
        started = time.monotonic()
        w = start(
            lab,
            worker,
            ["worker", "--data-dir", str(data / "w"), "--listen", listen(worker)]
            + ["--bootstrap", bootstrap_addr, "--bootstrap", gateway_addr, "--announce-interval-s", "1"]
            + ["--model", "minilm", "--backend", "onnxruntime"],
        )
        deadline = started + 60
        while not any(peer.startswith(f"{home.public_ip}:") for _, peer in established(lab, bootstrap)):
            assert time.monotonic() < deadline, "the worker never reached the bootstrap peer"
            time.sleep(0.1)
        connect_s = time.monotonic() - started
        w.wait_for("serving")
        yield NatNetwork(lab, data, bootstrap, gateway, client, worker, bootstrap_addr, worker_peer, connect_s)


def test_worker_behind_nat_connects_out_through_the_router(natnet: NatNetwork) -> None:
    router = natnet.worker.public_ip
    for public in (natnet.bootstrap, natnet.gateway):
        peers = [peer.split(":")[0] for local, peer in established(natnet.lab, public) if local.endswith(":4001")]
        assert router in peers and natnet.worker.ip not in peers  # seen as the router, never as 10.0.1.2
    print(f"worker connected out through the NAT {natnet.connect_s:.2f} s after it started")


def test_a_public_peer_finds_the_natted_workers_offer(natnet: NatNetwork) -> None:
    out = natnet.lab.run(
        natnet.client,
        [sys.executable, *CLI, "find", "minilm", "--json", "--wait-s", "2", "--data-dir", str(natnet.data / "f")]
        + ["--listen", listen(natnet.client), "--bootstrap", natnet.bootstrap_addr],
        timeout_s=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    [row] = json.loads(out.stdout)["workers"]
    assert row["peer_id"] == natnet.worker_peer
    print(f"offer seen on the internet, via {row['sources']}, announcing {row['addrs']}")


EMBED = """
import json, sys, time, urllib.request
body = json.dumps({"model": "minilm", "input": ["hello through a NAT"]}).encode()
req = urllib.request.Request("http://127.0.0.1:8080/v1/embeddings", body, {"Content-Type": "application/json"})
t = time.monotonic()
with urllib.request.urlopen(req, timeout=30) as resp:
    reply = json.load(resp)
print(json.dumps({"dims": len(reply["data"][0]["embedding"]), "ms": (time.monotonic() - t) * 1000}))
"""


def test_gateway_runs_a_job_over_the_connection_the_worker_opened(natnet: NatNetwork) -> None:
    # The gateway cannot dial 10.0.1.2; the worker dialed it (--bootstrap), and a job
    # stream can be opened from either end of a connection.
    out = natnet.lab.run(natnet.gateway, [sys.executable, "-c", EMBED], timeout_s=60)
    assert out.returncode == 0, out.stderr[-2000:]
    reply = json.loads(out.stdout)
    assert reply["dims"] == 384
    print(f"job over the worker's own connection: {reply['ms']:.0f} ms")


def test_a_fresh_public_client_runs_a_job_on_the_natted_worker(natnet: NatNetwork) -> None:
    # Nothing can dial the worker's own address: it announces a relayed one (a slot on the
    # bootstrap peer), which the client dials through the relay.
    out = natnet.lab.run(
        natnet.client,
        [sys.executable, *CLI, "client", "embed", "hello", "--wait-s", "10", "--data-dir", str(natnet.data / "c")]
        + ["--bootstrap", natnet.bootstrap_addr],
        timeout_s=60,
    )
    print(out.stderr[-600:])
    assert out.returncode == 0
