"""A network lab of real Linux network namespaces: public hosts, and homes behind NATs.

The "internet" is one namespace holding a bridge (``br0``) on 203.0.113.0/24 (TEST-NET-3,
a documentation range). A public host is a namespace with a veth into that bridge. A home
is a router namespace with a WAN veth into the bridge (its public address) and a LAN
bridge (10.0.N.0/24) that the home's hosts plug into; the router forwards LAN -> WAN,
MASQUERADEs onto its public address and silently drops whatever arrives unsolicited on its
WAN side, forwarded or aimed at itself, as home routers do. (Silence matters: a router that
answers a stray SYN with a reset kills a TCP hole punch whose first SYN arrives early.)
Python's ``ipaddress`` calls TEST-NET addresses private (``is_global`` is False): code
that tells public addresses from private ones must be told to accept them in the lab.

NAT kinds, as Linux gives them (RFC 4787 terms):

* :attr:`NatKind.ENDPOINT_INDEPENDENT`: ``-j MASQUERADE``. Linux conntrack keeps the
  source port when the (source, destination) tuple it would make is free, so one private
  ip:port maps to the same public port whatever the destination: endpoint-independent
  *mapping*. Filtering is address-and-port-dependent (a reply is admitted only from the
  endpoint the flow went to; mainline Linux has no full-cone NAT): a "port-restricted
  cone", the kind that TCP hole punching (simultaneous open) gets through. When two LAN
  hosts use one source port towards one destination, the second is remapped.
* :attr:`NatKind.SYMMETRIC`: ``-j MASQUERADE --random-fully``. Every new flow gets a
  random public port, so the port a peer learns through a relay or identify's observed
  address (the mapping towards *that* peer) is not the one used towards anybody else:
  a hole-punching peer aims its SYN at a port with no mapping behind it, and the router
  drops it. Only a relay can carry traffic to such a host.

Processes run in a host with ``ip netns exec`` (:meth:`Lab.popen`); :meth:`Lab.shape`
puts ``tc netem`` (delay, loss) or ``tbf`` (rate) on a host's uplink. Everything, stray
processes included, is torn down when the :class:`Lab` exits, even after a failure; labs
left behind by a killed run are removed when the next one starts. Needs root, iproute2
(``ip``, ``tc``, ``ss``) and iptables: :class:`NetlabUnavailable` says what is missing.
"""

from __future__ import annotations

import enum
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from cocoon_p2p.core.errors import CocoonError

INTERNET_PREFIX = "203.0.113."  # TEST-NET-3 (RFC 5737): never routed on the real internet
PUBLIC_HOSTS_FROM = 10  # public hosts get .10, .11, ...; routers .100, .101, ...
ROUTERS_FROM = 100
LAB_NAME = re.compile(r"^clab(\d+)-")
_labs = itertools.count()


class NetlabError(CocoonError):
    """A command that builds the lab failed (the message has its stderr)."""


class NetlabUnavailable(NetlabError):
    """Network namespaces, iptables or tc cannot be used here; the message says why
    (tests skip with it)."""


class NatKind(enum.Enum):
    """How a home router translates (see the module docstring)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    SYMMETRIC = "symmetric"


@dataclass(frozen=True)
class Router:
    """A home's NAT router: ``public_ip`` on the internet, ``lan_ip`` for its hosts."""

    name: str
    netns: str
    public_ip: str
    lan_ip: str
    lan_prefix: str  # "10.0.1." : its hosts take .2, .3, ...
    nat: NatKind


@dataclass(frozen=True)
class Host:
    """A machine: its namespace, its address and the address the internet sees it by
    (its own for a public host, its router's for a home host)."""

    name: str
    netns: str
    ip: str
    public_ip: str
    iface: str  # its uplink, in its namespace
    router: Router | None = None

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NetlabError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


@functools.cache
def unavailable_reason() -> str | None:
    """Why a lab cannot be built here (None: it can): root, ``ip``, ``iptables``, and a
    trial namespace with a NAT rule in it. Checked once per process."""
    if os.geteuid() != 0:
        return "netlab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network namespaces"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"netlab needs `{tool}` (Debian package {package})"
    probe = f"clab{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1"])
            _run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"])
        finally:
            _run(["ip", "netns", "del", probe], check=False)
    except (NetlabError, OSError, subprocess.TimeoutExpired) as exc:
        return f"netlab cannot create a namespace with NAT rules here: {exc}"
    return None


def check_available() -> None:
    """Raise :class:`NetlabUnavailable` when a lab cannot be built here."""
    reason = unavailable_reason()
    if reason is not None:
        raise NetlabUnavailable(reason)


def _end_processes(namespaces: list[str]) -> None:
    """SIGTERM, then SIGKILL, every process still in ``namespaces`` (all of them at once)."""

    def pids() -> list[int]:
        return [int(p) for ns in namespaces for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]

    for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)


def remove_stale_labs() -> list[str]:
    """Delete the namespaces of labs whose process is gone (a killed test run); return them."""
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = LAB_NAME.match(name)
        if m is not None and not Path(f"/proc/{m.group(1)}").exists():
            removed.append(name)
    _end_processes(removed)
    for name in removed:
        _run(["ip", "netns", "del", name], check=False)
    return removed


class Lab:
    """A topology under construction and in use; a context manager that tears it down.

    >>> with Lab() as lab:
    ...     server = lab.public_host("server")
    ...     home = lab.home("home", NatKind.SYMMETRIC)
    ...     laptop = lab.home_host(home, "laptop")
    ...     web = lab.python(server, ["-m", "http.server", "8000"])
    ...     fetch = f"import urllib.request as u; print(u.urlopen('http://{server.ip}:8000/').status)"
    ...     lab.run(laptop, [sys.executable, "-c", fetch])  # the server saw home.public_ip
    """

    def __init__(self) -> None:
        self.prefix = f"clab{os.getpid()}-{next(_labs)}-"
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Router] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._links = itertools.count()
        self._public = itertools.count(PUBLIC_HOSTS_FROM)
        self._routers = itertools.count(ROUTERS_FROM)
        self.internet = ""

    def __enter__(self) -> Lab:
        check_available()
        remove_stale_labs()
        try:
            self.internet = self._netns("internet")
            self._ip(self.internet, "link", "add", "br0", "type", "bridge")
            self._ip(self.internet, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The network namespaces the lab has made (``ip netns`` names), the internet first."""
        return tuple(self._namespaces)

    # -- building -------------------------------------------------------------

    def public_host(self, name: str) -> Host:
        """A host on the internet with its own public address."""
        netns = self._netns(name)
        ip = f"{INTERNET_PREFIX}{next(self._public)}"
        self._plug(netns, "eth0", self.internet, "br0", f"{ip}/24")
        return self._add(Host(name, netns, ip, ip, "eth0"))

    def home(self, name: str, nat: NatKind) -> Router:
        """A home network (10.0.N.0/24) behind a NAT router of kind ``nat``."""
        netns = self._netns(name)
        public_ip = f"{INTERNET_PREFIX}{next(self._routers)}"
        lan_prefix = f"10.0.{len(self.routers) + 1}."
        self._plug(netns, "wan", self.internet, "br0", f"{public_ip}/24")
        self._ip(netns, "link", "add", "lan", "type", "bridge")
        self._ip(netns, "addr", "add", f"{lan_prefix}1/24", "dev", "lan")
        self._ip(netns, "link", "set", "lan", "up")
        self._exec(netns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if nat is NatKind.SYMMETRIC else [])
        nat_rule = ["-t", "nat", "-A", "POSTROUTING", "-s", f"{lan_prefix}0/24", "-o", "wan", *masquerade]
        for rule in (
            nat_rule,
            ["-A", "FORWARD", "-i", "lan", "-j", "ACCEPT"],  # out, and LAN to LAN (br_netfilter)
            ["-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-P", "FORWARD", "DROP"],  # unsolicited inbound, even aimed at a private address, is dropped
            # ... and so is what is aimed at the router itself, silently, as home routers do: a
            # reset would kill a hole punch whose SYN arrives before the peer's SYN made the way.
            ["-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "wan", "-j", "DROP"],
        ):
            self._exec(netns, ["iptables", *rule])
        router = Router(name, netns, public_ip, f"{lan_prefix}1", lan_prefix, nat)
        self.routers[name] = router
        return router

    def home_host(self, router: Router, name: str) -> Host:
        """A host on ``router``'s LAN, its default route through the router."""
        netns = self._netns(name)
        ip = f"{router.lan_prefix}{2 + sum(1 for h in self.hosts.values() if h.router == router)}"
        self._plug(netns, "eth0", router.netns, "lan", f"{ip}/24")
        self._ip(netns, "route", "add", "default", "via", router.lan_ip)
        return self._add(Host(name, netns, ip, router.public_ip, "eth0", router))

    def shape(
        self, host: Host, *, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0, rate_kbit: int = 0
    ) -> None:
        """Shape what ``host`` sends on its uplink (one way: shape both ends for both
        directions): ``tc netem`` for delay, jitter and loss (and rate with them), ``tbf``
        for a rate alone. Raises :class:`NetlabUnavailable` when the kernel lacks it."""
        if delay_ms or jitter_ms or loss_pct:
            qdisc = ["netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_pct}%"]
            qdisc += ["rate", f"{rate_kbit}kbit"] if rate_kbit else []
        elif rate_kbit:
            burst = max(1600, rate_kbit * 1000 // 8 // 100)  # bytes: 10 ms at the rate, at least a packet
            qdisc = ["tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst), "latency", "400ms"]
        else:
            qdisc = []
        cmd = ["tc", "qdisc", "replace" if qdisc else "del", "dev", host.iface, "root", *qdisc]
        out = _run(host.argv(cmd), check=False)
        if out.returncode != 0 and qdisc:
            raise NetlabUnavailable(f"tc {qdisc[0]} is not available here: {out.stderr.strip()}")

    # -- running --------------------------------------------------------------

    def popen(
        self,
        host: Host,
        argv: list[str],
        *,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``'s namespace; the lab ends it on exit. It gets this
        process's environment less ``$COCOON_LISTEN`` (a host of its own: node programs
        take their usual listen addresses there)."""
        env = {k: v for k, v in os.environ.items() if k != "COCOON_LISTEN"}
        proc = subprocess.Popen(host.argv(argv), stdout=stdout, stderr=stderr, stdin=stdin, env=env, cwd=cwd)
        self._procs.append(proc)
        return proc

    def python(
        self, host: Host, args: list[str], *, stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None
    ) -> subprocess.Popen[bytes]:
        """This interpreter (the project's venv) with ``args``, inside ``host``."""
        return self.popen(host, [sys.executable, *args], stdout=stdout, stderr=stderr)

    def run(self, host: Host, argv: list[str], *, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` to the end and return what it printed."""
        env = {k: v for k, v in os.environ.items() if k != "COCOON_LISTEN"}
        return subprocess.run(host.argv(argv), capture_output=True, text=True, timeout=timeout_s, env=env)

    def close(self) -> None:
        """End every process in the lab's namespaces (those it started, and any they left
        behind), then delete the namespaces: their interfaces, bridges and rules go too."""
        _end_processes(self._namespaces)
        for proc in self._procs:
            if proc.poll() is None:  # still `ip netns exec`, not yet in its namespace
                proc.kill()
            proc.wait()
        for netns in reversed(self._namespaces):
            _run(["ip", "netns", "del", netns], check=False)
        self._procs.clear()
        self._namespaces.clear()

    # -- plumbing -------------------------------------------------------------

    def _add(self, host: Host) -> Host:
        self.hosts[host.name] = host
        return host

    def _netns(self, name: str) -> str:
        netns = self.prefix + name
        if netns in self._namespaces:
            raise NetlabError(f"the lab already has a machine named {name!r}")
        _run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        self._ip(netns, "link", "set", "lo", "up")
        return netns

    def _plug(self, netns: str, iface: str, into_netns: str, bridge: str, cidr: str) -> None:
        """A veth from ``netns`` (named ``iface``, addressed ``cidr``) into ``bridge``."""
        port = f"p{next(self._links)}"
        peer = ["peer", "name", port, "netns", into_netns]
        _run(["ip", "link", "add", "name", iface, "netns", netns, "type", "veth", *peer])
        self._ip(into_netns, "link", "set", port, "master", bridge)
        self._ip(into_netns, "link", "set", port, "up")
        self._ip(netns, "addr", "add", cidr, "dev", iface)
        self._ip(netns, "link", "set", iface, "up")

    def _ip(self, netns: str, *args: str) -> None:
        _run(["ip", "-n", netns, *args])

    def _exec(self, netns: str, argv: list[str]) -> None:
        _run(["ip", "netns", "exec", netns, *argv])
