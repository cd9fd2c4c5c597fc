"""Scenario files: one TOML format for both fidelities (model and emulation).

Every section and key is optional; defaults describe a small healthy network.
``--param section.key=value`` overrides (the sweep's grid) go through
:func:`override`, and unknown keys are errors, so a typo never runs silently.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ScenarioError(ValueError):
    """A scenario file or override that cannot be used."""


@dataclass
class Network:
    relays: int = 0  # peers that only relay gossip and serve the DHT
    rtt_ms_median: float = 40.0  # per-link round trip, lognormal
    rtt_sigma: float = 0.5
    bandwidth_mbps: float = 100.0
    loss: float = 0.0  # per message; a lost job message costs a TCP retransmission timeout
    rto_s: float = 0.2


@dataclass
class Gossip:
    D: int = 6  # noqa: N815 (gossipsub's own names)
    D_lo: int = 4  # noqa: N815
    D_hi: int = 12  # noqa: N815
    heartbeat_s: float = 1.0
    announce_interval_s: float = 10.0
    announce_ttl_s: float = 50.0
    load_announce_gap_s: float = 0.5  # load changes are announced at most this often (the node's rate)
    hop_delay_ms: float = 1.0  # validation and queueing at each relay
    epoch_s: float = 60.0  # the mesh's delays are recomputed this often (and at joins)


@dataclass
class Dht:
    k: int = 20
    alpha: int = 3
    rpc_timeout_s: float = 2.0
    rpc_overhead_ms: float = 4.0  # per query, beyond the round trip: a new stream + protocol negotiation
    # (4.1 ms p50 measured for a new-stream RPC in py-libp2p on loopback, benchmarks/overlay)
    refresh_s: float = 600.0  # workers republish records; routing tables are rebuilt
    record_ttl_s: float = 1800.0
    id_bits: int = 64
    lookup_on_join: bool = False  # every (re)joining client looks its model up (to measure the DHT)


@dataclass
class WorkerGroup:
    count: int = 10
    gpu: str = "H100"
    model: str = "minilm"
    job_s: float = 0.05  # service time of one unit at speed 1
    speed: float = 1.0
    service_cv: float = 0.0  # coefficient of variation of service times (0: deterministic)
    capacity: int = 8  # jobs admitted at once; more are refused as busy
    # Also busy while a job runs and one more would wait longer than this (0: off). Modelled
    # only (experiment (g)): a worker that knows its own speed turns the herd away early.
    max_wait_s: float = 0.0
    price_nanoton: int = 1000


@dataclass
class ClientGroup:
    count: int = 10
    model: str = "minilm"
    rate_per_s: float = 1.0  # Poisson job arrivals per client
    units: int = 1  # units of work per job (items, tokens)
    max_price_nanoton: int = 10_000
    request_bytes: int = 2_000
    result_bytes: int = 2_000


@dataclass
class Load:
    target: float = 0.0  # >0: client rates are set so arrivals use this share of worker capacity


@dataclass
class Churn:
    fraction: float = 0.0  # share of workers and clients that come and go
    session_mean_s: float = 600.0
    offline_mean_s: float = 120.0


@dataclass
class Adversaries:
    drop_fraction: float = 0.0  # workers that accept jobs and never answer
    overcharge_fraction: float = 0.0  # workers that bill more than price x usage
    stale_fraction: float = 0.0  # workers that vanish for good, leaving their records behind


@dataclass
class Routing:
    # cocoon | random | oracle (a central join-the-shortest-queue) | oracle-wait (shortest expected wait)
    rule: str = "cocoon"
    choices: int = 2  # the cocoon rule's sample size (power of d choices); 0: the library's default
    attempts: int = 3
    timeout_s: float = 30.0  # for a job, all attempts together (as JobClient)
    # The worker's queue length rides on each JobAccepted; the client routes on it where it is
    # fresher than the last announcement it holds (a proposal, modelled only: EXPERIMENTS.md).
    job_path_load: bool = False


@dataclass
class Settlement:
    deposit_nanoton: int = 1_000_000_000
    reserve_fraction: float = 0.02
    settle_above_nanoton: int = 0  # 0: no limit
    idle_close_s: float = 3600.0
    quarantine_s: float = 3600.0
    watch_s: float = 60.0
    vouchers: bool = True  # sign and check real vouchers (costs ~80 us a job)


@dataclass
class Tee:
    """TEE attestation (issue 17): who carries a claim, who requires one, what checking costs."""

    attested_share: float = 0.0  # share of workers whose announcements carry an attestation claim
    require_share: float = 0.0  # share of clients whose jobs go to attested workers only
    verify_ms: float = 1.0  # the client's check of one quote (dcap-qvl 0.7.0 on a real TDX quote: ~1 ms)
    evidence_kb: float = 10.0  # quote + collateral references, sent once per (client, worker) pair
    verdict_ttl_s: float = 3600.0  # a client trusts a verdict this long, then asks again

    @property
    def in_use(self) -> bool:
        return self.attested_share > 0 or self.require_share > 0


@dataclass
class Cheat:
    """Wrong results (issue 18): who cheats, how often, and the clients' spot checks against it."""

    share: float = 0.0  # share of the workers that cheat
    rate: float = 0.0  # share of a cheater's jobs (spot-check runs included) that return a wrong result
    check_rate: float = 0.0  # share of results a client checks (drawn after the result arrived)
    # A check's compute as a share of the job's: a verify job (one teacher-forced pass) for a
    # generation, measured at ~8%; 1.0 is a full re-run (embeddings, tensors). Below 1 the
    # client runs the generation's flow (verifier, second verifier), at 1 the re-run flow
    # (reference, tie-breaker).
    verify_cost: float = 0.08
    proof_trust_share: float = 1.0  # share of clients that act on a gossiped fraud proof (ban the accused)
    honest_false_alarm: float = 0.0  # chance that a check of a right result finds it wrong

    @property
    def in_use(self) -> bool:
        return self.share > 0 or self.check_rate > 0


@dataclass
class Scale:
    """How the model fidelity keeps a large run affordable (simulations/views.py)."""

    view: str = "auto"  # full | sampled | auto (sampled when a model has more than sampled_above workers)
    sampled_above: int = 100
    delay_sources: int = 8  # sampled view: exact mesh delays from this many peers an epoch (Mesh.delay)
    # sampled view: the mesh's delays are recomputed at most this often (the full view's: gossip.epoch_s);
    # rows follow joins in between (Mesh.graft), departures wait for the next epoch
    epoch_s: float = 300.0
    lookup_records: int = 64  # sampled view: a DHT lookup leaves at most this many records with its client

    def sampled(self, workers_per_model: int) -> bool:
        """Whether a run with this many workers of one model uses the sampled view."""
        return self.view == "sampled" or (self.view == "auto" and workers_per_model > self.sampled_above)


@dataclass
class Emulation:
    duration_cap_s: float = 120.0  # an emulation never runs longer than this
    job_model: str = "tiny"  # the ONNX model the emulated workers serve


@dataclass
class Scenario:
    name: str = "scenario"
    seed: int = 1
    duration_s: float = 600.0
    warmup_s: float = 30.0  # jobs issued before this are not counted
    sample_s: float = 10.0  # time-series resolution
    network: Network = field(default_factory=Network)
    gossip: Gossip = field(default_factory=Gossip)
    dht: Dht = field(default_factory=Dht)
    workers: list[WorkerGroup] = field(default_factory=lambda: [WorkerGroup()])
    clients: list[ClientGroup] = field(default_factory=lambda: [ClientGroup()])
    load: Load = field(default_factory=Load)
    churn: Churn = field(default_factory=Churn)
    adversaries: Adversaries = field(default_factory=Adversaries)
    routing: Routing = field(default_factory=Routing)
    settlement: Settlement = field(default_factory=Settlement)
    tee: Tee = field(default_factory=Tee)
    cheat: Cheat = field(default_factory=Cheat)
    scale: Scale = field(default_factory=Scale)
    emulation: Emulation = field(default_factory=Emulation)

    @property
    def peers(self) -> int:
        return self.network.relays + sum(w.count for w in self.workers) + sum(c.count for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "network": Network,
    "gossip": Gossip,
    "dht": Dht,
    "load": Load,
    "churn": Churn,
    "adversaries": Adversaries,
    "routing": Routing,
    "settlement": Settlement,
    "tee": Tee,
    "cheat": Cheat,
    "scale": Scale,
    "emulation": Emulation,
}
_LISTS: dict[str, type] = {"workers": WorkerGroup, "clients": ClientGroup}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    return cls(**values)


def from_dict(data: dict[str, Any]) -> Scenario:
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            top[key] = _build(_SECTIONS[key], value, key)
        elif key in _LISTS:
            top[key] = [_build(_LISTS[key], v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            top[key] = value
    sc: Scenario = _build(Scenario, top, "scenario")
    validate(sc)
    return sc


def load(path: Path, overrides: Sequence[str] = ()) -> Scenario:
    """Read a scenario file and apply ``section.key=value`` overrides."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read {path}: {exc}") from exc
    data.setdefault("name", Path(path).stem)
    for item in overrides:
        override(data, item)
    return from_dict(data)


def override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=value`` (value parsed as TOML, else kept as a string); ``workers.0.speed`` indexes lists."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ScenarioError(f"override {item!r} is not key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    if parts[0] in _LISTS:  # workers.speed=2: every group; workers.1.speed=2: the second
        items = data.setdefault(parts[0], [{}])
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < len(items):
            items[int(parts[1])][parts[2]] = value
        elif len(parts) == 2:
            for it in items:
                it[parts[1]] = value
        else:
            raise ScenarioError(f"override {key!r}: use {parts[0]}.KEY or {parts[0]}.INDEX.KEY")
        return
    node: Any = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def validate(sc: Scenario) -> None:
    if sc.duration_s <= 0 or sc.warmup_s < 0 or sc.warmup_s >= sc.duration_s:
        raise ScenarioError("need 0 <= warmup_s < duration_s")
    if not sc.workers or not sc.clients:
        raise ScenarioError("a scenario needs at least one worker group and one client group")
    if sc.routing.rule not in ("cocoon", "random", "oracle", "oracle-wait"):
        raise ScenarioError(f"routing.rule must be cocoon, random, oracle or oracle-wait, not {sc.routing.rule!r}")
    if sc.routing.attempts < 1 or sc.routing.timeout_s <= 0:
        raise ScenarioError("need routing.attempts >= 1 and routing.timeout_s > 0")
    if not 0 <= sc.churn.fraction <= 1:
        raise ScenarioError("churn.fraction is a share (0..1)")
    t = sc.tee
    for f in dataclasses.fields(t):
        v = getattr(t, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ScenarioError(f"tee.{f.name} must be a number, not {v!r}")
    if not (0 <= t.attested_share <= 1 and 0 <= t.require_share <= 1):
        raise ScenarioError("tee.attested_share and tee.require_share are shares (0..1)")
    if t.verify_ms < 0 or t.evidence_kb < 0 or t.verdict_ttl_s <= 0:
        raise ScenarioError("need tee.verify_ms >= 0, tee.evidence_kb >= 0 and tee.verdict_ttl_s > 0")
    _validate_cheat(sc.cheat)
    if sc.scale.view not in ("auto", "full", "sampled"):
        raise ScenarioError(f"scale.view must be auto, full or sampled, not {sc.scale.view!r}")
    if sc.scale.delay_sources < 1 or sc.scale.lookup_records < 1 or sc.scale.sampled_above < 0:
        raise ScenarioError("need scale.delay_sources >= 1, scale.lookup_records >= 1 and scale.sampled_above >= 0")
    if sc.scale.epoch_s <= 0:
        raise ScenarioError("need scale.epoch_s > 0")
    g = sc.gossip
    if not 1 <= g.D_lo <= g.D <= g.D_hi:
        raise ScenarioError("need 1 <= D_lo <= D <= D_hi")
    for w in sc.workers:
        if w.capacity < 1 or w.max_wait_s < 0:
            raise ScenarioError(f"workers: need capacity >= 1 and max_wait_s >= 0, not {w.capacity}, {w.max_wait_s}")
    served = {w.model for w in sc.workers}
    for c in sc.clients:
        if c.model not in served:
            raise ScenarioError(f"clients ask for {c.model!r}, which no worker group serves")


def _validate_cheat(ch: Cheat) -> None:
    for f in dataclasses.fields(ch):
        v = getattr(ch, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ScenarioError(f"cheat.{f.name} must be a number, not {v!r}")
        if f.name != "verify_cost" and not 0 <= v <= 1:
            raise ScenarioError(f"cheat.{f.name} is a share (0..1), not {v!r}")
    if not 0 < ch.verify_cost <= 1:
        raise ScenarioError(f"cheat.verify_cost is a share of a job's compute (0 < x <= 1), not {ch.verify_cost!r}")
