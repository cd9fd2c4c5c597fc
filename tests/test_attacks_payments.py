"""Issue 15, findings 6 and 7: attacks on a worker's money and on a node's files.

Each test reproduces what an attacker (or bad luck) did to real processes and
failed before the fix: a signed voucher with seqno 2^64-1 that froze a channel,
a worker restart that forgot what its clients owed, damaged or exposed state
files that gave tracebacks or were silently accepted, and a torn voucher log
that lost a voucher without a word.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import trio
from nacl.signing import SigningKey

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.durable import StateFileDamaged
from cocoon_p2p.core.errors import IdentityError, ProtocolError
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.node import Node
from cocoon_p2p.payments import frames as pf
from cocoon_p2p.payments.chain import TonCenter, Wallet
from cocoon_p2p.payments.channelops import PaymentConfig, PaymentFailed
from cocoon_p2p.payments.channelstate import ChannelState, Lifecycle
from cocoon_p2p.payments.payee import PAYMENT_REQUIRED, Payee
from cocoon_p2p.payments.payer import Payer
from cocoon_p2p.payments.payerbook import ChannelRecord, encode_book
from cocoon_p2p.payments.store import ChannelStore, ChannelTerms
from cocoon_p2p.payments.voucherlog import VoucherLog
from cocoon_p2p.payments.vouchers import (
    MAX_SEQNO_STEP,
    ChannelRuleBroken,
    SemiChannel,
    SemiChannelBody,
    SignedSemiChannel,
    VoucherBook,
)

from .netutil import fast_config, stop_processes, wait_for

A, B = SigningKey(bytes([1]) * 32), SigningKey(bytes([2]) * 32)
TERMS = ChannelTerms(channel_id=0xC0C0A, payer_key=bytes(A.verify_key), deposit_a=10**9, address="0:" + "cc" * 32)
CLIENT = b"client-peer-id"
LAST_SEQNO = (1 << 64) - 1
CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]
TON = 1_000_000_000
PRICE = 7_000_000
X = (from_numpy("x", np.ones((2, 4), np.float32)),)
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")


def voucher(seqno: int, sent: int, channel_id: int = TERMS.channel_id) -> SignedSemiChannel:
    return SemiChannel(channel_id, SemiChannelBody(seqno, sent)).sign(A)


def _config(root: Path, **over: int) -> PaymentConfig:
    cfg = PaymentConfig(TonCenter("http://127.0.0.1:9"), Wallet(contract=None, secret_key=b""), root)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _payee(root: Path, **over: int) -> Payee:
    """A worker's payee holding one open channel with CLIENT (as accepting it on chain records)."""
    payee = Payee(B, _config(root, **over))
    payee.store.open(TERMS)
    payee._channel_of[CLIENT] = TERMS.channel_id
    payee._save_clients()
    return payee


# ---- finding 6a: a signed voucher with seqno 2^64-1 ---------------------------------------------


def test_a_voucher_far_ahead_of_the_last_one_is_refused() -> None:
    book = VoucherBook(channel_id=TERMS.channel_id, payer_key=A.verify_key, deposit_a=10**9)
    book.commit(voucher(1, 100))
    with pytest.raises(ChannelRuleBroken, match="seqno"):
        book.check(voucher(LAST_SEQNO, 200))
    with pytest.raises(ChannelRuleBroken):
        book.check(voucher(1 + MAX_SEQNO_STEP + 1, 200))
    assert book.check(voucher(1 + MAX_SEQNO_STEP, 200)) == 100  # a gap of lost vouchers, within bounds
    assert book.seqno == 1  # check changes nothing


async def test_the_worker_refuses_seqno_2_64_minus_1_and_keeps_billing(tmp_path: Path) -> None:
    blamed: list[tuple[bytes, ProtocolError]] = []
    payee = _payee(tmp_path, credit_nanoton=250)
    payee.misbehaved = lambda peer, exc: blamed.append((peer, exc))
    assert await payee.answer(CLIENT, pf.PayVoucher(voucher(1, 100).to_record())) == pf.PaidUpTo(100)
    refused = await payee.answer(CLIENT, pf.PayVoucher(voucher(LAST_SEQNO, 200).to_record()))
    assert isinstance(refused, pf.PayError) and refused.code == ChannelRuleBroken.code
    assert [(p, e.code) for p, e in blamed] == [(CLIENT, ChannelRuleBroken.code)]  # scored down
    assert payee.store.newest(TERMS.channel_id) == voucher(1, 100)
    # Honest vouchers still count, and jobs are still billed against them: nothing is free.
    assert await payee.answer(CLIENT, pf.PayVoucher(voucher(2, 200).to_record())) == pf.PaidUpTo(200)
    for _ in range(5):
        payee.bill(CLIENT, 100)
    assert payee.owed(CLIENT) == 300 and payee.admission(CLIENT) == PAYMENT_REQUIRED
    # A resent voucher whose acknowledgement was lost is not misbehaviour.
    replayed = await payee.answer(CLIENT, pf.PayVoucher(voucher(2, 200).to_record()))
    assert isinstance(replayed, pf.PayError) and replayed.code == pf.PayErrorCode.REPLAYED and len(blamed) == 1
    payee.store.close()


def test_a_log_holding_a_jump_accepted_before_the_bound_still_loads(tmp_path: Path) -> None:
    store = ChannelStore(tmp_path)
    store.open(TERMS)
    store.close()
    log = VoucherLog(tmp_path / f"{TERMS.channel_id:032x}" / "vouchers.log")
    log.append([voucher(1, 100).to_record(), voucher(LAST_SEQNO, 200).to_record()])  # written by older code
    log.close()
    again = ChannelStore(tmp_path)  # a restart must not crash on what it accepted once
    assert again.earned(TERMS.channel_id) == 200
    again.close()


# ---- finding 6b: what a client owes, across restarts --------------------------------------------


async def test_what_a_client_owes_survives_a_worker_restart(tmp_path: Path) -> None:
    payee = _payee(tmp_path, credit_nanoton=250)
    assert await payee.answer(CLIENT, pf.PayVoucher(voucher(1, 100).to_record())) == pf.PaidUpTo(100)
    for _ in range(4):  # 400 billed, 100 paid: owes 300, over the credit of 250
        assert payee.admission(CLIENT) is None
        payee.bill(CLIENT, 100)
    assert payee.admission(CLIENT) == PAYMENT_REQUIRED
    await payee.flush_bills()
    payee.store.close()

    again = Payee(B, _config(tmp_path, credit_nanoton=250))  # restarted from disk
    assert again.owed(CLIENT) == 300 and again.admission(CLIENT) == PAYMENT_REQUIRED
    assert await again.answer(CLIENT, pf.PayVoucher(voucher(2, 400).to_record())) == pf.PaidUpTo(400)
    assert again.admission(CLIENT) is None  # paid up: welcome back
    again.store.close()


@pytest.mark.slow  # starts a process
def test_bills_made_durable_survive_a_kill_minus_nine(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, trio
        from pathlib import Path
        from tests.test_attacks_payments import CLIENT, _payee

        async def main():
            payee = _payee(Path({str(tmp_path)!r}), credit_nanoton=250)
            for _ in range(3):
                payee.bill(CLIENT, 100)
            await payee.flush_bills()  # what the service's flusher does after each batch of bills
            print("durable", flush=True)
            payee.bill(CLIENT, 100)  # not yet durable: a kill now forgets it, in the client's favour
            os.kill(os.getpid(), 9)

        trio.run(main)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=Path.cwd())
    assert out.stdout.split() == ["durable"], out.stderr[-2000:]
    again = Payee(B, _config(tmp_path, credit_nanoton=250))
    assert again.owed(CLIENT) == 300 and again.admission(CLIENT) == PAYMENT_REQUIRED
    again.store.close()


# ---- finding 7: damaged, torn and exposed files ------------------------------------------------


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _assert_clear_error(out: subprocess.CompletedProcess[str], *names: str) -> None:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for name in names:
        assert name in out.stderr, out.stderr[-2000:]


def _data_dir_with_a_channel(root: Path) -> Path:
    """A client's data directory as a node leaves it: wallet, channel book, two vouchers."""
    Wallet.load_or_create(root / "wallet.json")
    pay = root / "payments"
    pay.mkdir(parents=True)
    record = ChannelRecord(b"w" * 38, "0:" + "ab" * 32, 7, 10**9, None, Lifecycle(ChannelState.OPEN))
    (pay / "payer.json").write_bytes(encode_book([record]))
    log = VoucherLog(pay / "issued.log")
    log.append([voucher(1, 100, channel_id=7).to_record()])
    log.append([voucher(2, 300, channel_id=7).to_record()])
    log.close()
    return root


def test_a_new_wallet_is_private_and_an_exposed_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    first = Wallet.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Wallet.load_or_create(path).address == first.address
    os.chmod(path, 0o644)  # its mnemonic is the wallet's money
    with pytest.raises(IdentityError, match="chmod 600"):
        Wallet.load_or_create(path)


@pytest.mark.parametrize(
    "content", [b"", b'{"mnemonic": ["abandon", "ab', b"[]", b'{"mnemonic": "words"}', b'{"mnemonic": ["x"]}']
)
def test_a_damaged_wallet_is_a_named_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "wallet.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(StateFileDamaged, match="wallet.json"):
        Wallet.load_or_create(path)
    assert path.read_bytes() == content  # never replaced by a fresh wallet


def test_a_payer_never_starts_over_from_a_damaged_or_missing_book(tmp_path: Path) -> None:
    root = _data_dir_with_a_channel(tmp_path) / "payments"
    book = root / "payer.json"
    whole = book.read_bytes()
    book.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StateFileDamaged, match="payer.json"):
        Payer(A, None, _config(root))
    book.unlink()  # vouchers signed, and no record of the channels they pay into
    with pytest.raises(StateFileDamaged, match="issued.log"):
        Payer(A, None, _config(root))
    book.write_bytes(whole)
    payer = Payer(A, None, _config(root))
    assert next(iter(payer.channels.values())).issuer.sent == 300
    payer.close()


def test_a_torn_voucher_log_keeps_the_last_complete_voucher_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _data_dir_with_a_channel(tmp_path) / "payments"
    log_path = root / "issued.log"
    whole = log_path.read_bytes()
    log_path.write_bytes(whole[:-10])  # the tail of the last voucher cut off
    with caplog.at_level("WARNING"):
        payer = Payer(A, None, _config(root))
    assert "issued.log" in caplog.text and "torn" in caplog.text  # was: silently one voucher fewer
    assert next(iter(payer.channels.values())).issuer.sent == 100  # the last complete voucher
    payer.close()

    log_path.write_bytes(whole[:-10])
    log = VoucherLog(log_path, read_only=True)
    assert log.torn is not None and log.torn.length == len(whole) // 2 - 10
    assert [SignedSemiChannel.from_record(r).state.body.seqno for r in log.records] == [1]
    assert log_path.read_bytes() == whole[:-10]  # read-only: evidence left as it was
    log.close()


@pytest.mark.slow  # runs cocoon-node
def test_cli_status_reports_a_torn_voucher_log_and_changes_nothing(tmp_path: Path) -> None:
    data = _data_dir_with_a_channel(tmp_path / "node")
    log_path = data / "payments" / "issued.log"
    whole = log_path.read_bytes()
    log_path.write_bytes(whole[:-10])
    status = _cli("status", "--data-dir", str(data))
    assert status.returncode == 0, status.stderr[-2000:]
    assert "warning" in status.stdout and "issued.log" in status.stdout and "torn" in status.stdout
    assert log_path.read_bytes() == whole[:-10]  # status writes nothing, even beside a running node
    log_path.write_bytes(whole)
    status = _cli("status", "--data-dir", str(data), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["warnings"] == []


@pytest.mark.slow  # runs cocoon-node
def test_cli_names_a_damaged_channel_book_instead_of_a_traceback(tmp_path: Path) -> None:
    data = _data_dir_with_a_channel(tmp_path / "node")
    book = data / "payments" / "payer.json"
    book.write_bytes(book.read_bytes()[:20])
    _assert_clear_error(_cli("status", "--data-dir", str(data)), "payer.json", "backup")


@pytest.mark.slow  # runs cocoon-node
def test_cli_names_a_damaged_wallet_instead_of_a_traceback(tmp_path: Path) -> None:
    data = _data_dir_with_a_channel(tmp_path / "node")
    wallet = data / "wallet.json"
    damaged = wallet.read_bytes()[:30]
    wallet.write_bytes(damaged)
    _assert_clear_error(_cli("status", "--data-dir", str(data)), "wallet.json", "mnemonic")
    _assert_clear_error(_cli(*_client(data)), "wallet.json", "mnemonic")
    assert wallet.read_bytes() == damaged  # never replaced by a fresh wallet


@pytest.mark.slow  # runs cocoon-node
def test_cli_refuses_a_wallet_readable_by_others_and_writes_new_ones_private(tmp_path: Path) -> None:
    data = _data_dir_with_a_channel(tmp_path / "node")
    os.chmod(data / "wallet.json", 0o644)
    _assert_clear_error(_cli("status", "--data-dir", str(data)), "wallet.json", "chmod 600")
    _assert_clear_error(_cli(*_client(data)), "wallet.json", "chmod 600")
    fresh = tmp_path / "fresh"
    _assert_clear_error(_cli(*_client(fresh)))  # the chain is unreachable, after the wallet was made
    assert stat.S_IMODE((fresh / "wallet.json").stat().st_mode) == 0o600


def _client(data: Path) -> list[str]:
    """A client job whose first step is the wallet (the chain behind it does not answer)."""
    return ["client", "embed", "x", "--model", "00" * 32, "--data-dir", str(data), "--chain", "http://127.0.0.1:9"]


@pytest.mark.slow
@needs_node
def test_a_client_cli_on_a_damaged_book_stops_with_a_named_error(tmp_path: Path) -> None:
    from cocoon_p2p.testing.localchain import open_local_chain

    data = _data_dir_with_a_channel(tmp_path / "node")
    book = data / "payments" / "payer.json"
    book.write_bytes(book.read_bytes()[:25])
    with open_local_chain() as chain:
        args = ["client", "embed", "x", "--model", "00" * 32, "--data-dir", str(data), "--wait-s", "0"]
        out = _cli(*args, "--chain", chain.endpoint, "--local-chain")
        _assert_clear_error(out, "payer.json")
        book.unlink()
        out = _cli(*args, "--chain", chain.endpoint, "--local-chain")
        _assert_clear_error(out, "payer.json", "issued.log")


# ---- with real peers on the local chain ----------------------------------------------------------


@pytest.mark.slow
@needs_node
async def test_a_real_client_cannot_freeze_its_channel_with_seqno_2_64_minus_1(
    tiny_model: ModelSpec, tmp_path: Path
) -> None:
    from cocoon_p2p.testing.localchain import open_local_chain

    with open_local_chain() as chain:
        w_cfg = PaymentConfig(chain, chain.new_wallet(10 * TON), tmp_path / "worker")
        c_cfg = PaymentConfig(chain, chain.new_wallet(10 * TON), tmp_path / "client")
        async with (
            Node(fast_config(payments=w_cfg)) as worker,
            Node(fast_config(bootstrap=[worker.addrs[0]], payments=c_cfg)) as client,
        ):
            w_pay, c_pay = worker.payments, client.payments
            assert w_pay is not None and c_pay is not None
            worker.serve_model(tiny_model, OnnxRuntimeBackend(tiny_model.path, threads=1), price_nanoton=PRICE)
            await wait_for(lambda: client.directory.workers_for(tiny_model.model_id, now_ms=now_ms()) != [])
            paid = (await client.infer(tiny_model.model_id, inputs=X, max_price_nanoton=PRICE)).cost_nanoton
            await client.flush_payments()
            ch = c_pay.payer.open[worker.peer_id]
            honest = (ch.issuer.seqno, ch.issuer.sent, ch.last)
            ch.issuer.seqno = LAST_SEQNO - 1  # the attacker signs seqno 2^64-1, validly
            with pytest.raises(PaymentFailed, match="channel-rule|seqno"):
                await c_pay.pay(worker.peer_id, 1)
            cid = ch.issuer.channel_id
            newest = w_pay.payee.store.newest(cid)
            assert newest is not None and newest.state.body.seqno == 1 and w_pay.payee.store.earned(cid) == paid
            ch.issuer.seqno, ch.issuer.sent, ch.last = honest  # back to honest vouchers: they are paid, not free
            for _ in range(3):
                paid += (await client.infer(tiny_model.model_id, inputs=X, max_price_nanoton=PRICE)).cost_nanoton
            await client.flush_payments()
            assert w_pay.payee.store.earned(cid) == paid == 4 * 2 * PRICE


@pytest.mark.slow
@needs_node
async def test_a_client_that_stopped_paying_is_still_refused_after_a_worker_kill(
    tiny_model: ModelSpec, tmp_path: Path
) -> None:
    from cocoon_p2p.testing.localchain import open_local_chain

    w_dir = tmp_path / "worker"
    w_dir.mkdir()
    (w_dir / "worker.toml").write_text(f"credit_nanoton = {5 * PRICE}\n")  # 3 jobs of 2 items: owes 6 > 5
    with open_local_chain() as chain:
        w_cmd = [*CLI, "worker", "--config", str(w_dir / "worker.toml"), "--data-dir", str(w_dir),
                 "--model", str(tiny_model.path), "--backend", "onnxruntime", "--price-nanoton", str(PRICE),
                 "--announce-interval-s", "0.5", "--chain", chain.endpoint, "--local-chain",
                 "--log-level", "WARNING"]  # fmt: skip
        worker = subprocess.Popen(w_cmd, stdout=subprocess.PIPE, text=True)
        procs = [worker]
        try:
            addr = await _expect(worker, "listening ")
            await _expect(worker, "serving ")
            c_cfg = PaymentConfig(chain, chain.new_wallet(10 * TON), tmp_path / "client")
            async with Node(fast_config(bootstrap=[addr], payments=c_cfg)) as client:
                assert client.payments is not None

                async def stops_paying(worker: bytes, cost: int) -> int:
                    return 0

                client.payments.pay = stops_paying  # type: ignore[method-assign]
                await wait_for(lambda: client.directory.workers_for(tiny_model.model_id, now_ms=now_ms()) != [], 60)
                for _ in range(3):
                    await _job(client, tiny_model)
                with pytest.raises(JobFailed) as err:
                    await _job(client, tiny_model)
                assert err.value.code == jf.PAYMENT
                # kill -9 once the bills are on disk (the group commit's window is what a kill may lose)
                channels = w_dir / "payments" / "channels"
                await wait_for(lambda: _billed_on_disk(channels) == 6 * PRICE)
                worker.kill()
                worker.wait(timeout=10)
                worker = subprocess.Popen(
                    [*w_cmd, "--listen", addr.split("/p2p/")[0]], stdout=subprocess.PIPE, text=True
                )
                procs.append(worker)
                assert await _expect(worker, "listening ") == addr  # same PeerId, same address
                await _expect(worker, "serving ")
                with trio.fail_after(60):
                    while True:  # until the client reaches the restarted worker
                        try:
                            await _job(client, tiny_model)
                        except JobFailed as exc:
                            if exc.code == jf.PAYMENT:
                                break
                            await trio.sleep(0.3)
                            continue
                        raise AssertionError("the restarted worker gave a fresh credit to a client that owes it")
        finally:
            stop_processes(procs)


async def _job(client: Node, model: ModelSpec) -> None:
    await client.infer(model.model_id, inputs=X, max_price_nanoton=PRICE)


async def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    with trio.fail_after(120):
        while True:
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line, f"the process ended before printing {prefix!r}"
            if line.startswith(prefix):
                return line.split()[1]


def _billed_on_disk(channels: Path) -> int:
    if not channels.is_dir():
        return 0
    store = ChannelStore(channels, read_only=True)
    try:
        return sum(store.billed(cid) for cid in store.channels)
    finally:
        store.close()
