"""Where a worker's evidence comes from: quote sources, the refresh schedule, the GPU claim.

No machine here is a TDX guest, so the configfs-tsm source runs against a
temporary directory that mimics a report entry. On real configfs the kernel
creates an entry's attribute files on ``mkdir``, bumps ``generation`` on each
write, makes the quote when ``outblob`` is read and drops the attributes with
the entry on ``rmdir``; a plain directory does none of that, so the test copies
a template entry (``provider``, ``generation``, ``outblob`` holding the real
sample quote) in a fake ``mkdir`` and emulates the rest through the
:class:`~cocoon_p2p.attestation.sources.TsmFs` seam of the source.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cocoon_p2p.attestation import gpu as gpu_module
from cocoon_p2p.attestation.binding import report_data_for_key
from cocoon_p2p.attestation.errors import EvidenceUnavailable
from cocoon_p2p.attestation.evidence import MAX_GPU_CLAIM_BYTES
from cocoon_p2p.attestation.gpu import GpuCcClaim, GpuCcMode, collect_gpu_claim
from cocoon_p2p.attestation.refresh import EvidenceSchedule, EvidenceState, RefreshPolicy
from cocoon_p2p.attestation.sources import (
    DstackSource,
    FileSource,
    TsmFs,
    TsmReportSource,
    available,
    source_from_name,
)
from cocoon_p2p.core.errors import ConfigError, MalformedMessage

# Real quotes (dcap-qvl's samples), kept with the test vectors.
SAMPLES = Path(__file__).resolve().parent / "vectors" / "attestation"
TDX_QUOTE = SAMPLES / "tdx_quote"
REPORT_DATA = report_data_for_key(bytes(range(32)))


# --- configfs-tsm ----------------------------------------------------------------------------------


class FakeConfigfs(TsmFs):
    """configfs-tsm emulated on a plain directory: what the kernel does on each operation."""

    def __init__(self, template: Path) -> None:
        self.template = template
        self.extra_writes = 0  # writes by "another process" per inblob write: a race
        self.fail: dict[str, OSError] = {}  # operation or attribute name -> error to raise
        self.inblobs: list[bytes] = []
        self.made: list[Path] = []

    def mkdir(self, path: Path) -> None:
        if "mkdir" in self.fail:
            raise self.fail["mkdir"]
        shutil.copytree(self.template, path)  # the kernel creates the attributes
        self.made.append(path)

    def rmdir(self, path: Path) -> None:
        if "rmdir" in self.fail:
            raise self.fail["rmdir"]
        shutil.rmtree(path)  # the attributes go with the entry

    def read(self, path: Path) -> bytes:
        if path.name in self.fail:
            raise self.fail[path.name]
        return super().read(path)

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        if path.name == "inblob":
            self.inblobs.append(data)
            gen = path.parent / "generation"
            gen.write_text(f"{int(gen.read_text()) + 1 + self.extra_writes}\n")


@pytest.fixture
def tsm(tmp_path: Path) -> tuple[TsmReportSource, FakeConfigfs]:
    template = tmp_path / "template"
    template.mkdir()
    (template / "provider").write_text("tdx_guest\n")
    (template / "generation").write_text("0\n")
    shutil.copyfile(TDX_QUOTE, template / "outblob")
    root = tmp_path / "config" / "tsm" / "report"
    root.mkdir(parents=True)
    fake = FakeConfigfs(template)
    return TsmReportSource(root=root, fs=fake), fake


def test_tsm_returns_outblob_and_removes_the_entry(tsm: tuple[TsmReportSource, FakeConfigfs]) -> None:
    source, fake = tsm
    assert source.available() is None
    assert source.quote(REPORT_DATA) == TDX_QUOTE.read_bytes()
    assert fake.inblobs == [REPORT_DATA]
    assert len(fake.made) == 1 and fake.made[0].parent == source.root
    assert list(source.root.iterdir()) == []
    source.quote(REPORT_DATA)
    assert len(set(fake.made)) == 2, "each quote gets a fresh entry"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f, t: (t / "provider").write_text("sev_guest\n"), "'sev_guest', not 'tdx_guest'"),
        (lambda f, t: setattr(f, "extra_writes", 1), "generation 0 -> 2, expected 1"),
        (lambda f, t: (t / "outblob").write_bytes(b""), "empty outblob"),
        (lambda f, t: (t / "generation").write_text("x\n"), "not a number"),
        (lambda f, t: f.fail.update(outblob=OSError(errno.EIO, "I/O error")), "GetQuote request (is its quote"),
        (lambda f, t: f.fail.update(outblob=OSError(errno.EBUSY, "busy")), "still in flight"),
        (lambda f, t: f.fail.update(provider=OSError(errno.ENXIO, "no dev")), "no TSM provider is registered"),
    ],
    ids=["wrong-provider", "generation-race", "empty-outblob", "bad-generation", "host-eio", "busy", "no-provider"],
)
def test_tsm_refusals_clean_up(tsm: tuple[TsmReportSource, FakeConfigfs], setup: Any, message: str) -> None:
    source, fake = tsm
    setup(fake, fake.template)
    with pytest.raises(EvidenceUnavailable, match=re.escape(message)):
        source.quote(REPORT_DATA)
    assert list(source.root.iterdir()) == [], "the entry is removed whatever failed"


def test_tsm_permission_denied_says_root(tsm: tuple[TsmReportSource, FakeConfigfs]) -> None:
    source, fake = tsm
    fake.fail["mkdir"] = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(EvidenceUnavailable, match="permission denied: quotes through configfs-tsm need root"):
        source.quote(REPORT_DATA)


def test_tsm_failed_rmdir_does_not_hide_the_quote(tsm: tuple[TsmReportSource, FakeConfigfs]) -> None:
    source, fake = tsm
    fake.fail["rmdir"] = OSError(errno.EBUSY, "busy")
    assert source.quote(REPORT_DATA) == TDX_QUOTE.read_bytes()


def test_tsm_wants_exactly_64_bytes(tsm: tuple[TsmReportSource, FakeConfigfs]) -> None:
    source, fake = tsm
    for bad in (b"", REPORT_DATA[:32], REPORT_DATA + b"\0"):
        with pytest.raises(ValueError, match="exactly 64 bytes"):
            source.quote(bad)
    assert fake.made == []


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("nothing", "the kernel lacks configfs-tsm (Linux 6.7+, CONFIG_TSM_REPORTS)"),
        ("configfs-empty", "configfs is not mounted at"),
        ("no-tsm", "or this is not a confidential guest"),
    ],
)
def test_missing_root_says_why(tmp_path: Path, layout: str, message: str) -> None:
    config = tmp_path / "config"
    if layout != "nothing":
        config.mkdir()
    if layout == "no-tsm":
        (config / "other-subsystem").mkdir()
    root = config / "tsm" / "report"
    why = available(root)
    assert why is not None and message in why
    with pytest.raises(EvidenceUnavailable, match=re.escape(message)):
        TsmReportSource(root=root).quote(REPORT_DATA)


def test_default_root_is_not_usable_here() -> None:
    """This machine is no TDX guest: the real default path explains itself instead of failing oddly."""
    if available() is None:
        pytest.skip("configfs-tsm is present: a confidential guest")
    with pytest.raises(EvidenceUnavailable, match="configfs"):
        TsmReportSource().quote(REPORT_DATA)


# --- file and dstack -------------------------------------------------------------------------------


def test_file_source_serves_the_real_quote(tmp_path: Path) -> None:
    source = FileSource(TDX_QUOTE)
    assert (source.name, source.tee) == ("file", "tdx")
    assert source.quote(REPORT_DATA) == TDX_QUOTE.read_bytes()
    with pytest.raises(EvidenceUnavailable, match="cannot read the quote file"):
        FileSource(tmp_path / "absent").quote(REPORT_DATA)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(EvidenceUnavailable, match="is empty"):
        FileSource(tmp_path / "empty").quote(REPORT_DATA)


def test_dstack_without_the_sdk_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dstack_sdk", None)  # import fails, installed or not
    with pytest.raises(EvidenceUnavailable, match="pip install dstack-sdk"):
        DstackSource().quote(REPORT_DATA)
    with pytest.raises(ValueError, match="1 to 64 bytes"):
        DstackSource().quote(REPORT_DATA + b"\0")


@pytest.fixture
def guest_agent() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in for dstack's guest agent: its GetQuote RPC over real HTTP on 127.0.0.1."""
    seen: list[dict[str, Any]] = []
    quote_hex = TDX_QUOTE.read_bytes().hex()

    class Agent(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            reply = json.dumps({"quote": quote_hex, "event_log": "[]", "report_data": body["report_data"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_dstack_through_the_real_sdk(guest_agent: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    pytest.importorskip("dstack_sdk", reason="dstack-sdk is an optional dependency")
    url, seen = guest_agent
    assert DstackSource(endpoint=url).quote(REPORT_DATA) == TDX_QUOTE.read_bytes()
    assert seen == [{"path": "/GetQuote", "report_data": REPORT_DATA.hex()}]
    with pytest.raises(EvidenceUnavailable, match="no guest agent socket"):
        DstackSource(endpoint=str(tmp_path / "dstack.sock")).quote(REPORT_DATA)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(EvidenceUnavailable, match="GetQuote at http://127.0.0.1"):
        DstackSource(endpoint=closed, timeout=2).quote(REPORT_DATA)


# --- source_from_name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "kind", "fields"),
    [
        ("configfs-tsm", {}, TsmReportSource, {"root": Path("/sys/kernel/config/tsm/report")}),
        ("configfs-tsm", {"root": Path("/tmp/r")}, TsmReportSource, {"root": Path("/tmp/r")}),
        ("dstack", {}, DstackSource, {"endpoint": None}),
        ("dstack", {"endpoint": "/run/dstack.sock"}, DstackSource, {"endpoint": "/run/dstack.sock"}),
        (f"file:{TDX_QUOTE}", {}, FileSource, {"quote_path": TDX_QUOTE}),
    ],
)
def test_source_from_name(name: str, options: dict[str, Any], kind: type, fields: dict[str, Any]) -> None:
    source = source_from_name(name, **options)
    assert isinstance(source, kind)
    assert source.tee == "tdx" and source.name == name.split(":")[0]
    assert {k: getattr(source, k) for k in fields} == fields


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("sgx", {}, "unknown quote source 'sgx'; known: configfs-tsm, dstack, file:<path>"),
        ("", {}, "unknown quote source"),
        ("file:", {}, "needs a path"),
        ("configfs-tsm", {"endpoint": "/run/dstack.sock"}, "endpoint applies only to the dstack"),
        ("dstack", {"root": Path("/tmp")}, "root applies only to the configfs-tsm"),
    ],
)
def test_source_from_name_refuses(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        source_from_name(name, **options)


# --- the refresh schedule --------------------------------------------------------------------------

POLICY = RefreshPolicy(lifetime_s=100, refresh_before_s=20, retry_s=5)

# (event at time, then at that time: state, due, valid, wait_s). Events: None (just look), "ok", "fail".
SCHEDULE: list[tuple[float, str | None, EvidenceState, bool, bool, float]] = [
    (0, None, EvidenceState.MISSING, True, False, 0),
    (0, "fail", EvidenceState.MISSING, False, False, 5),  # first retry after retry_s
    (4, None, EvidenceState.MISSING, False, False, 1),
    (5, "fail", EvidenceState.MISSING, False, False, 10),  # doubled
    (15, "fail", EvidenceState.MISSING, False, False, 20),
    (35, "fail", EvidenceState.MISSING, False, False, 25),  # capped at lifetime / 4
    (60, "fail", EvidenceState.MISSING, False, False, 25),
    (85, "ok", EvidenceState.FRESH, False, True, 80),  # expires at 185, refresh from 165
    (164, None, EvidenceState.FRESH, False, True, 1),
    (165, None, EvidenceState.STALE, True, True, 0),
    (165, "fail", EvidenceState.STALE, False, True, 5),  # backoff restarts from retry_s after a success
    (170, None, EvidenceState.STALE, True, True, 0),
    (184.9, None, EvidenceState.STALE, True, True, 0),
    (185, None, EvidenceState.EXPIRED, True, False, 0),
    (185, "fail", EvidenceState.EXPIRED, False, False, 10),
    (200, "ok", EvidenceState.FRESH, False, True, 80),
]


def test_refresh_schedule_over_time() -> None:
    schedule = EvidenceSchedule(POLICY)
    for now, event, state, due, valid, wait in SCHEDULE:
        if event == "ok":
            schedule.produced(now)
        elif event == "fail":
            schedule.failed(now)
        got = (schedule.state(now), schedule.due(now), schedule.valid(now), schedule.wait_s(now))
        assert got == (state, due, valid, pytest.approx(wait)), f"at {now} after {event}"
    assert schedule.expires_at == 300 and schedule.failures == 0 and schedule.retry_at is None


@pytest.mark.parametrize(
    "kwargs",
    [{"lifetime_s": 0}, {"refresh_before_s": 3600}, {"refresh_before_s": -1}, {"retry_s": 0}],
)
def test_refresh_policy_validates(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RefreshPolicy(**kwargs)


def test_refresh_defaults_and_long_outages() -> None:
    policy = RefreshPolicy()
    assert (policy.lifetime_s, policy.refresh_before_s, policy.retry_s) == (3600, 600, 30)
    assert [policy.retry_delay_s(n) for n in (1, 2, 3, 5, 6, 10_000)] == [30, 60, 120, 480, 900, 900]


# --- the GPU claim ---------------------------------------------------------------------------------


def test_gpu_claim_is_none_here_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=gpu_module.__name__)
    assert collect_gpu_claim() is None
    assert "no GPU CC claim" in caplog.text


def test_gpu_claim_without_the_sdk_logs_why(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=gpu_module.__name__)
    monkeypatch.setitem(sys.modules, "nv_attestation_sdk", None)
    assert collect_gpu_claim() is None
    assert "pip install nv-attestation-sdk" in caplog.text


class _NvmlState:
    def __init__(self, cc: int, devtools: int) -> None:
        self.ccFeature, self.devToolsMode = cc, devtools


def _fake_nvml(cc: int, devtools: int) -> types.ModuleType:
    """NVML's Python API as nvidia-ml-py spells it, answering for one GPU."""
    nvml = types.ModuleType("pynvml")
    calls = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: b"NVIDIA H100 80GB HBM3",  # bytes in older releases
        "nvmlSystemGetDriverVersion": lambda: "550.54.15",
        "nvmlSystemGetConfComputeState": lambda: _NvmlState(cc, devtools),
        "NVML_CC_SYSTEM_FEATURE_ENABLED": 1,
        "NVML_CC_SYSTEM_DEVTOOLS_MODE_ON": 1,
    }
    for name, value in calls.items():
        setattr(nvml, name, value)
    return nvml


def _fake_sdk(accept: bool) -> types.ModuleType:
    sdk = types.ModuleType("nv_attestation_sdk.attestation")

    class Attestation:
        verifiers: list[tuple[Any, ...]] = []

        def clear_verifiers(self) -> None:
            self.verifiers.clear()

        def set_name(self, name: str) -> None:
            pass

        def set_nonce(self, nonce: str) -> None:
            assert len(bytes.fromhex(nonce)) == 32

        def add_verifier(self, *args: Any) -> None:
            self.verifiers.append(args)

        def get_evidence(self) -> list[str]:
            assert len(self.verifiers) == 1
            return ["evidence"]

        def attest(self, evidence: list[str]) -> bool:
            return accept

    sdk.Attestation = Attestation
    sdk.Devices = types.SimpleNamespace(GPU=2)
    sdk.Environment = types.SimpleNamespace(LOCAL=2)
    return sdk


@pytest.mark.parametrize(
    ("cc", "devtools", "accept", "mode", "verified"),
    [
        (0, 0, True, None, None),
        (1, 0, True, GpuCcMode.ON, True),
        (1, 0, False, GpuCcMode.ON, False),
        (1, 1, True, GpuCcMode.DEVTOOLS, True),
    ],
)
def test_gpu_claim_from_nvml_and_the_sdk(
    monkeypatch: pytest.MonkeyPatch, cc: int, devtools: int, accept: bool, mode: GpuCcMode | None, verified: bool
) -> None:
    """The claim's mapping, with NVML and the SDK replaced by modules that answer as a CC-capable H100 would."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(cc, devtools))
    monkeypatch.setitem(sys.modules, "nv_attestation_sdk", types.ModuleType("nv_attestation_sdk"))
    monkeypatch.setitem(sys.modules, "nv_attestation_sdk.attestation", _fake_sdk(accept))
    for _ in range(2):  # the SDK's client is a singleton: a second call must not stack verifiers
        claim = collect_gpu_claim()
        if mode is None:
            assert claim is None
            continue
        assert claim is not None
        assert (claim.model, claim.driver_version, claim.cc_mode, claim.verified) == (
            "NVIDIA H100 80GB HBM3",
            "550.54.15",
            mode,
            verified,
        )
        assert ("devtools" in claim.detail) == (mode is GpuCcMode.DEVTOOLS)
        assert GpuCcClaim.from_json(claim.to_json()) == claim


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '"x"',
        '{"model": "H100"}',
        '{"model": "H100", "driver_version": "1", "detail": "", "verified": true, "cc_mode": "maybe"}',
        '{"model": "H100", "driver_version": "1", "detail": "", "verified": 1, "cc_mode": "on"}',
        '{"model": 7, "driver_version": "1", "detail": "", "verified": true, "cc_mode": "on"}',
    ],
)
def test_gpu_claim_json_refuses_what_is_not_a_claim(text: str) -> None:
    with pytest.raises(MalformedMessage):
        GpuCcClaim.from_json(text)


def test_gpu_claim_json_fits_the_evidence() -> None:
    claim = GpuCcClaim(model="m" * 5000, cc_mode=GpuCcMode.ON, driver_version="v", verified=False, detail="d" * 5000)
    assert len(claim.to_json().encode()) <= MAX_GPU_CLAIM_BYTES


def test_pid_in_entry_names(tsm: tuple[TsmReportSource, FakeConfigfs]) -> None:
    source, fake = tsm
    source.quote(REPORT_DATA)
    assert fake.made[0].name.startswith(f"cocoon-{os.getpid()}-")
