"""The operator's wallet: address forms, waiting to be funded, and the testnet switch.

Address vectors come from TEP-2 (ton-blockchain/TEPs, 0002-address.md: the root DNS
contract) and the TON docs' cookbook (0:ca6e...2a3e in its four user-friendly forms).
The process tests run ``cocoon-node`` on the local chain with its faucet off, so the
node starts with an empty wallet as it would on TON.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from cocoon_p2p.nodes import config as config_mod
from cocoon_p2p.nodes import funding
from cocoon_p2p.nodes.cli import _payment_config, build_parser

from cocoon_p2p.payments.addresses import AddressForm, MalformedAddress, friendly, parse, raw
from cocoon_p2p.payments.chain import ChainError, TonCenter, Wallet
from cocoon_p2p.payments.channelops import CONTROL_FEE
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]
TON = 1_000_000_000

# ---- address forms -------------------------------------------------------------------

DOCS_RAW = "0:ca6e321c7cce9ecedf0a8ca2492ec8592494aa5fb5ce0387dff96ef6af982a3e"
DNS_RAW = "-1:e56754f83426f69b09267bd876ac97c44821345b7e266bd956a7bfbfb98df35c"
# (raw, testnet, bounceable, user-friendly base64url)
VECTORS = [
    (DOCS_RAW, False, True, "EQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPrHF"),
    (DOCS_RAW, False, False, "UQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPuwA"),
    (DOCS_RAW, True, True, "kQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPgpP"),
    (DOCS_RAW, True, False, "0QDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPleK"),
    (DNS_RAW, False, True, "Ef_lZ1T4NCb2mwkme9h2rJfESCE0W34ma9lWp7-_uY3zXDvq"),
    (DNS_RAW, False, False, "Uf_lZ1T4NCb2mwkme9h2rJfESCE0W34ma9lWp7-_uY3zXGYv"),
]


@pytest.mark.parametrize(("raw_form", "testnet", "bounceable", "shown"), VECTORS)
def test_user_friendly_forms_match_the_published_vectors(
    raw_form: str, testnet: bool, bounceable: bool, shown: str
) -> None:
    assert friendly(raw_form, testnet=testnet, bounceable=bounceable) == shown
    assert raw(shown) == raw_form
    parsed = parse(shown)
    assert (parsed.form, parsed.testnet, parsed.bounceable) == (AddressForm.FRIENDLY, testnet, bounceable)
    for other in VECTORS:  # any form of the same address converts to any other
        if other[0] == raw_form:
            assert friendly(other[3], testnet=testnet, bounceable=bounceable) == shown


@pytest.mark.parametrize(
    ("text", "expected_raw"),
    [
        ("EQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff+W72r5gqPrHF", DOCS_RAW),  # standard base64, as the docs show too
        ("0:CA6E321C7CCE9ECEDF0A8CA2492EC8592494AA5FB5CE0387DFF96EF6AF982A3E", DOCS_RAW),  # uppercase hex
        (DNS_RAW, DNS_RAW),
    ],
)
def test_other_accepted_spellings(text: str, expected_raw: str) -> None:
    assert raw(text) == expected_raw


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "neither"),
        ("0:ca6e", "neither"),  # a hash cut short
        ("0:" + "g" * 64, "neither"),
        ("0x" + "ab" * 32, "neither"),
        ("128:" + "00" * 32, "outside -128..127"),
        ("EQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPrHG", "checksum"),  # last character mistyped
        ("EQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPrH", "neither"),  # one character short
        ("AQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPrHF", "unknown tag 0x01"),
        (" EQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPrHF", "neither"),
        ("EQDKbjIcfM6ezt8KjKJJLshZJJSqX7XOA4ff-W72r5gqPr==", "neither"),  # padding: not 48 address characters
    ],
)
def test_malformed_addresses_raise_a_named_error(text: str, why: str) -> None:
    with pytest.raises(MalformedAddress, match=why):
        parse(text)
    with pytest.raises(MalformedAddress):
        friendly(text, testnet=False)


# ---- how much, how often, how it reads ---------------------------------------------------


@pytest.mark.parametrize(
    ("role", "deposit", "need"),
    [
        (funding.Role.WORKER, 5 * TON, CONTROL_FEE + funding.WALLET_FEES_NANOTON),  # no deposit: closes only
        (funding.Role.CLIENT, TON // 2, TON // 2 + 3 * CONTROL_FEE + funding.WALLET_FEES_NANOTON),
        (funding.Role.GATEWAY, 2 * TON, 2 * TON + 3 * CONTROL_FEE + funding.WALLET_FEES_NANOTON),
    ],
)
def test_what_each_role_needs(role: funding.Role, deposit: int, need: int) -> None:
    assert funding.required_nanoton(role, deposit) == need


def test_balance_polls_back_off_to_at_most_ten_seconds() -> None:
    delays = funding.poll_delays()
    assert [next(delays) for _ in range(7)] == [1, 2, 4, 8, 10, 10, 10]


@pytest.mark.parametrize(
    ("nanoton", "text"), [(0, "0"), (60_000_000, "0.06"), (TON, "1"), (1_660_000_001, "1.660000001")]
)
def test_amounts_read_in_ton(nanoton: int, text: str) -> None:
    assert funding.format_ton(nanoton) == text


def test_the_fund_line_names_the_address_where_tools_look_for_it() -> None:
    line = funding.fund_line(VECTORS[1][3], 60_000_000, 0)
    assert line == f"fund {VECTORS[1][3]} with at least 0.06 TON (it holds 0)"
    assert line.split()[1] == VECTORS[1][3]


# ---- the waiting loop, on a scripted chain and a virtual clock --------------------------


class ScriptedChain(TonCenter):
    """Balances (or ChainErrors) in order; the wallet shows as deployed."""

    def __init__(self, script: list[int | ChainError]) -> None:
        super().__init__("http://127.0.0.1:9")
        self.script = script
        self.reads = 0

    def balance(self, address: str) -> int:
        step = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        if isinstance(step, ChainError):
            raise step
        return step

    def state(self, address: str) -> str:
        return "active"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Jumps only when idle this long in real time: a balance read in a thread is not idleness.
    return trio.testing.MockClock(autojump_threshold=0.05)


NEED = 60_000_000
LATE = ChainError("HTTP 429")
WAITS = [
    # (script, outcome, reads, virtual seconds waited)
    ([TON], funding.Funding.HELD_ENOUGH, 1, 0),
    ([0, 0, NEED], funding.Funding.FUNDED, 3, 1 + 2),
    ([NEED - 1, LATE, LATE, 0, TON], funding.Funding.FUNDED, 5, 1 + 2 + 4 + 8),  # refused reads are retried
]


@pytest.mark.parametrize(("script", "outcome", "reads", "waited"), WAITS)
async def test_the_node_waits_until_the_wallet_holds_enough(
    clock: trio.testing.MockClock, script: list[int | ChainError], outcome: funding.Funding, reads: int, waited: float
) -> None:
    chain, said = ScriptedChain(script), []
    start = trio.current_time()
    got = await funding.ensure_funded(
        chain, Wallet.create(), need_nanoton=NEED, shown_address="UQaddr", say=said.append
    )
    assert got is outcome and chain.reads == reads
    assert trio.current_time() - start == pytest.approx(waited)
    if outcome is funding.Funding.FUNDED:
        assert said[0].startswith("fund UQaddr with at least 0.06 TON") and said[1].startswith("funded UQaddr")
    else:
        assert said == []


async def test_a_funding_timeout_stops_the_node_and_an_unreachable_chain_at_once(clock: trio.testing.MockClock) -> None:
    with pytest.raises(funding.WalletUnfunded, match="still holds 0 TON after 20 s"):
        await funding.ensure_funded(
            ScriptedChain([0]), Wallet.create(), need_nanoton=NEED, shown_address="UQa", say=print, timeout_s=20
        )
    with pytest.raises(ChainError):  # a wrong endpoint: no waiting forever on it
        await funding.ensure_funded(
            ScriptedChain([ChainError("connection refused")]), Wallet.create(), need_nanoton=NEED,
            shown_address="UQa", say=print,
        )  # fmt: skip


# ---- the testnet switch (resolved config only: nothing leaves this machine) ----------------


def _resolved(argv: list[str]) -> config_mod.RoleConfig:
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in config_mod.RoleConfig.__dataclass_fields__}
    return config_mod.load(args.config, overrides)


@pytest.mark.parametrize(
    ("argv", "chain", "testnet"),
    [
        (["worker"], "", False),  # no payments, as before
        (["worker", "--testnet"], config_mod.TESTNET_CHAIN, True),
        (["worker", "--testnet", "--chain", "http://127.0.0.1:8081"], "http://127.0.0.1:8081", True),
        (["client", "embed", "x", "--testnet"], config_mod.TESTNET_CHAIN, True),
        (["gateway", "--testnet", "--funding-timeout-s", "30"], config_mod.TESTNET_CHAIN, True),
        (["worker", "--chain", "https://toncenter.com"], "https://toncenter.com", False),
    ],
)
def test_testnet_flag_picks_the_testnet_endpoint(argv: list[str], chain: str, testnet: bool, tmp_path: Path) -> None:
    cfg = _resolved([*argv, "--data-dir", str(tmp_path)])
    assert (cfg.chain, cfg.testnet) == (chain, testnet)
    payments = _payment_config(cfg, funding.Role.WORKER)  # builds the client, reads nothing from the chain
    if not chain:
        assert payments is None
    else:
        assert payments is not None and payments.chain.endpoint == chain
        shown = friendly(payments.wallet.address, testnet=testnet)
        assert parse(shown).testnet is testnet and shown[0] in ("0" if testnet else "U")  # non-bounceable


def test_testnet_is_a_config_key_too(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text("testnet = true\nfunding_timeout_s = 5.0\nlocal_chain_faucet = false\n")
    cfg = _resolved(["worker", "--config", str(tmp_path / "w.toml")])
    assert (cfg.chain, cfg.testnet, cfg.funding_timeout_s, cfg.local_chain_faucet) == (
        config_mod.TESTNET_CHAIN, True, 5.0, False
    )  # fmt: skip


# ---- real processes on the local chain, its faucet off --------------------------------------

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")


@pytest.fixture(scope="module")
def chain() -> Iterator[LocalChain]:
    with open_local_chain() as c:
        yield c


class Lines:
    """A process's output read line by line, with deadlines (every line is kept)."""

    def __init__(self, proc: subprocess.Popen[bytes], stream: int) -> None:
        self.proc, self.fd, self.buf = proc, stream, b""
        self.seen: list[str] = []
        self.ended = False

    def expect(self, prefix: str, timeout_s: float = 90) -> str:
        end = time.monotonic() + timeout_s
        while True:
            for i, line in enumerate(self.seen):
                if line.startswith(prefix):
                    del self.seen[: i + 1]
                    return line
            assert not self.ended, f"the process ended (exit {self.proc.wait()}) before a {prefix!r} line"
            assert time.monotonic() < end, f"no {prefix!r} line in {timeout_s} s"
            self.read(0.5)

    def read(self, wait_s: float) -> None:
        end = time.monotonic() + wait_s
        while not self.ended and (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return
            chunk = os.read(self.fd, 4096)
            self.ended = not chunk
            *lines, self.buf = (self.buf + chunk).split(b"\n")
            self.seen += [line.decode() for line in lines]


def _unfunded(tmp_path: Path, chain: LocalChain, role: str) -> list[str]:
    cfg = tmp_path / f"{role}.toml"
    cfg.write_text("local_chain_faucet = false\n")
    return ["--config", str(cfg), "--data-dir", str(tmp_path / role), "--chain", chain.endpoint, "--local-chain",
            "--log-level", "WARNING"]  # fmt: skip


@pytest.mark.slow
@needs_node
def test_an_unfunded_worker_says_where_to_send_ton_waits_and_serves_once_funded(
    chain: LocalChain, tmp_path: Path
) -> None:
    from cocoon_p2p.testing.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny.onnx")
    cmd = [*CLI, "worker", *_unfunded(tmp_path, chain, "worker"), "--model", str(model), "--backend", "onnxruntime"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        out = Lines(proc, proc.stdout.fileno())
        out.expect("listening ")
        shown = out.expect("wallet ").split()[1]
        stored = Wallet.load_or_create(tmp_path / "worker" / "wallet.json").address
        assert len(shown) == 48 and shown.startswith("UQ") and raw(shown) == stored  # user-friendly, mainnet form
        fund = out.expect("fund ")
        need = funding.format_ton(funding.required_nanoton(funding.Role.WORKER, 0))
        assert fund == f"fund {shown} with at least {need} TON (it holds 0)"
        out.read(3.0)  # it waits: still running, not serving
        assert proc.poll() is None and not any(line.startswith("serving ") for line in out.seen)
        assert chain.state(stored) == "uninitialized"

        chain.fund(shown, TON)  # what an operator does, with the address as printed
        assert out.expect("funded ").split()[1] == shown
        out.expect("serving ")
        assert chain.state(stored) == "active"  # it deployed its wallet before serving
        assert TON - 60_000_000 < chain.balance(shown) <= TON
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@needs_node
def test_an_unfunded_client_times_out_or_stops_on_a_signal_with_testnet_addresses(
    chain: LocalChain, tmp_path: Path
) -> None:
    client = [*CLI, "client", "embed", "x", "--model", "00" * 32, "--wait-s", "0", "--testnet",
              *_unfunded(tmp_path, chain, "client")]  # fmt: skip
    timed = subprocess.run([*client, "--funding-timeout-s", "1.5"], capture_output=True, text=True, timeout=120)
    assert timed.returncode == 2 and "Traceback" not in timed.stderr, timed.stderr[-3000:]
    shown = next(line.split()[1] for line in timed.stderr.splitlines() if line.startswith("wallet "))
    assert shown.startswith("0Q") and parse(shown).testnet  # testnet, non-bounceable
    assert f"fund {shown} with at least" in timed.stderr and "still holds 0 TON after 1.5 s" in timed.stderr
    assert timed.stdout == ""  # stdout is for the job's output

    # The local chain takes the testnet form too (as the faucet bot's transfer would arrive).
    chain.fund(shown, 12345)
    assert chain.balance(raw(shown)) == 12345

    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(client, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert proc.stderr is not None
            err = Lines(proc, proc.stderr.fileno())
            assert f"(it holds {funding.format_ton(12345)})" in err.expect("fund ")
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == 130  # stopped while waiting, as an interrupted command
            err.read(1.0)
            assert not any("Traceback" in line for line in err.seen)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
