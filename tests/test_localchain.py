"""The toncenter client against what public endpoints do, and the local chain's realistic mode.

The client's retries run against a scripted HTTP server (real HTTP, a fake clock, so no test
sleeps); the realistic mode against the local chain itself: sendBoc only accepts, blocks
apply, internal messages wait a block, 429s and 5xx come with toncenter's bodies."""

from __future__ import annotations

import base64
import json
import random
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pytoniq_core import Cell, begin_cell

from cocoon_p2p.payments.chain import (
    ChainError,
    RetryBudgetSpent,
    RetryPolicy,
    TonCenter,
    Wallet,
    address_of,
    parse_transaction,
    raw_address,
    state_init,
)
from cocoon_p2p.testing.localchain import open_local_chain

TON = 1_000_000_000
HOUR_MS = 3_600_000  # a block time no test outlives: blocks come only when the test asks
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")
RATE_LIMITED = {"ok": False, "error": "Ratelimit exceed", "code": 429}


# ---- a scripted toncenter, and a clock that does not sleep ----


@dataclass
class Script:
    answers: list[tuple[int, Any, dict[str, str]]]  # status, JSON body, headers; the last one repeats
    seen: list[dict[str, str]] = field(default_factory=list)  # each request's headers, names in lower case


@contextmanager
def scripted(*answers: tuple[int, Any, dict[str, str]]) -> Iterator[tuple[str, Script]]:
    script = Script(list(answers))

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            script.seen.append({k.lower(): v for k, v in self.headers.items()})
            status, body, headers = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {"content-type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script
    finally:
        server.shutdown()
        server.server_close()


class FakeTime:
    """``sleep`` only moves ``clock``: the client's waits are recorded, not slept."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def client(endpoint: str, fake: FakeTime, budget_s: float = 30.0, **kw: Any) -> TonCenter:
    return TonCenter(
        endpoint, retry=RetryPolicy(budget_s=budget_s), rng=random.Random(7), sleep=fake.sleep, clock=fake.clock, **kw
    )


def fail(status: int, error: str, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    return status, {"ok": False, "error": error, "code": status}, headers or {}


def ok(result: Any) -> tuple[int, Any, dict[str, str]]:
    return 200, {"ok": True, "result": result}, {}


ACCOUNT = {"@type": "raw.fullAccountState", "balance": "42", "state": "active"}


# ---- retries ----


def test_rides_out_429_and_5xx_honouring_retry_after_and_sends_the_key() -> None:
    fake = FakeTime()
    answers = fail(429, "Ratelimit exceed", {"Retry-After": "2"}), fail(503, "Service Unavailable"), ok(ACCOUNT)
    with scripted(*answers) as (url, script):
        assert client(url, fake, api_key="k1").balance("0:" + "00" * 32) == 42
    assert fake.sleeps[0] >= 2.0  # the server's Retry-After, longer than the first backoff
    assert 0.25 <= fake.sleeps[1] < 0.5  # the second retry's backoff: 0.5 s with jitter
    assert [h.get("x-api-key") for h in script.seen] == ["k1", "k1", "k1"]


@pytest.mark.parametrize(
    ("status", "call", "retried"),
    [
        (429, "balance", True),
        (500, "balance", True),
        (502, "balance", True),
        (503, "send_boc", True),
        (504, "balance", True),
        (500, "send_boc", False),  # the liteserver refused the message: asking again changes nothing
        (400, "send_boc", False),  # a BoC that does not parse
        (416, "balance", False),  # "Incorrect address"
        (422, "balance", False),
    ],
)
def test_which_failures_are_retried(status: int, call: str, retried: bool) -> None:
    fake = FakeTime()
    with scripted(fail(status, f"error {status}"), ok(ACCOUNT if call == "balance" else {"@type": "ok"})) as (
        url,
        script,
    ):
        chain = client(url, fake)
        if retried:
            _ = chain.balance("0:" + "00" * 32) if call == "balance" else chain.send_boc(b"boc")
            assert len(script.seen) == 2 and chain.retried == {str(status): 1}
        else:
            with pytest.raises(ChainError, match=f"error {status}") as caught:
                _ = chain.balance("0:" + "00" * 32) if call == "balance" else chain.send_boc(b"boc")
            assert not isinstance(caught.value, RetryBudgetSpent)
            assert len(script.seen) == 1 and fake.sleeps == []


def test_a_spent_budget_raises_the_named_error() -> None:
    fake = FakeTime()
    with scripted(fail(503, "Service Unavailable")) as (url, script):
        with pytest.raises(RetryBudgetSpent) as caught:
            client(url, fake, budget_s=5.0).balance("0:" + "00" * 32)
    assert caught.value.last_status == 503 and caught.value.attempts == len(script.seen) > 3
    assert sum(fake.sleeps) <= 5.0
    assert fake.sleeps[0] < fake.sleeps[1] < fake.sleeps[2]  # backing off


def test_a_retry_after_past_the_budget_gives_up_at_once() -> None:
    fake = FakeTime()
    with scripted(fail(429, "Ratelimit exceed", {"Retry-After": "60"})) as (url, script):
        with pytest.raises(RetryBudgetSpent):
            client(url, fake, budget_s=10.0).balance("0:" + "00" * 32)
    assert len(script.seen) == 1 and fake.sleeps == []


def test_no_answer_is_retried_until_the_budget_is_spent() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = FakeTime()
    chain = client(f"http://127.0.0.1:{port}", fake, budget_s=3.0)
    with pytest.raises(RetryBudgetSpent) as caught:
        chain.state("0:" + "00" * 32)
    assert caught.value.last_status is None and chain.retried["no answer"] == len(fake.sleeps) > 1


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(first_delay_s=0.25, max_delay_s=4.0)
    for retry, cap in [(0, 0.25), (1, 0.5), (2, 1.0), (4, 4.0), (9, 4.0), (500, 4.0)]:
        delays = {policy.delay(retry, random.Random(seed)) for seed in range(5)}
        assert all(cap / 2 <= d < cap for d in delays) and len(delays) == 5


# ---- shapes ----

CELL = begin_cell().store_uint(0xC0C0A, 24).end_cell()
CELL_B64 = base64.b64encode(CELL.to_boc()).decode()
NUMBER = {"@type": "tvm.stackEntryNumber", "number": {"@type": "tvm.numberDecimal", "number": "-7"}}


def test_a_run_get_method_answer_parses_as_the_real_api_writes_it() -> None:
    stack = [
        ["num", "-0x5"],
        ["num", "0x0"],
        ["list", {"@type": "tvm.list", "elements": []}],  # null: tonlib makes it an empty list
        ["list", {"@type": "tvm.list", "elements": [NUMBER]}],
        [
            "tuple",
            {"@type": "tvm.tuple", "elements": [NUMBER, {"@type": "tvm.stackEntryCell", "cell": {"bytes": CELL_B64}}]},
        ],
        ["cell", {"bytes": CELL_B64, "object": {"data": {"b64": "wMCg", "len": 24}, "refs": []}}],
    ]
    fake = FakeTime()
    with scripted(ok({"@type": "smc.runResult", "gas_used": 1, "stack": stack, "exit_code": 0})) as (url, _):
        got = client(url, fake).run_get_method("0:" + "00" * 32, "get_it")
    assert got[:4] == [-5, 0, None, [-7]]
    assert got[4][0] == -7 and got[4][1].hash == CELL.hash and got[5].hash == CELL.hash


@pytest.mark.parametrize(
    "form",
    [
        "0:ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB",
        "EQCrq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq8Uk",  # bounceable
        "UQCrq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq5jh",  # non-bounceable
    ],
)
def test_raw_address_of_any_form(form: str) -> None:
    assert raw_address(form) == "0:" + "ab" * 32


def test_raw_address_refuses_garbage() -> None:
    with pytest.raises(ChainError):
        raw_address("not an address")


# ---- the local chain, realistic ----


def transfer_boc(wallet: Wallet, to: str, amount: int, seqno: int) -> bytes:
    return wallet.transfer_message(to, amount, seqno, bounce=False, valid_until=int(time.time()) + 60)


@pytest.mark.slow
@needs_node
def test_send_boc_only_accepts_and_each_message_lands_a_block_after_its_parent() -> None:
    with open_local_chain(True, block_ms=HOUR_MS, fail_rate=0.0) as chain:
        wallet, target = Wallet.create(), Wallet.create()
        chain.fund(wallet.address, TON, settle=False)
        chain.produce_blocks(1)  # the faucet's transaction: its gift is queued for the next block
        assert chain.balance(wallet.address) == 0 and chain.status().pending == 1
        chain.produce_blocks(1)
        assert chain.balance(wallet.address) == TON

        chain.send_boc(wallet.deploy_message())
        assert chain.state(wallet.address) == "uninitialized"  # accepted, not applied
        chain.produce_blocks(1)
        assert chain.state(wallet.address) == "active" and wallet.seqno(chain) == 1

        chain.send_boc(transfer_boc(wallet, target.address, TON // 10, seqno=1))
        assert wallet.seqno(chain) == 1
        chain.produce_blocks(1)
        assert wallet.seqno(chain) == 2  # the wallet's transaction, in this block
        assert chain.balance(target.address) == 0 and chain.status().pending == 1  # its message, in the next
        chain.produce_blocks(1)
        assert chain.balance(target.address) == TON // 10
        assert chain.settle().pending == 0

        with pytest.raises(ChainError, match="not accepted"):  # a spent seqno: refused at once, never queued
            chain.send_boc(transfer_boc(wallet, target.address, TON // 10, seqno=1))
        assert chain.status().pending == 0

        sent, credit = chain.transactions(wallet.address, 1)[0], chain.transactions(target.address)[0]
        assert (sent.in_source, sent.exit_code, sent.aborted) == ("", 0, False)
        assert sent.out_messages == ((raw_address(target.address), TON // 10),)
        assert credit.in_source == raw_address(wallet.address) and credit.in_value == TON // 10
        assert credit.lt > sent.lt


@pytest.mark.slow
@needs_node
def test_a_wallet_transfer_lands_through_timed_blocks() -> None:
    with open_local_chain(True, fail_rate=0.0) as chain:
        wallet, target = chain.new_wallet(TON), Wallet.create()
        first = chain.status().block
        wallet.transfer(chain, target.address, TON // 10)  # waits for its seqno to move
        settled = chain.settle()
        assert settled.block > first and settled.dropped == 0
        assert chain.balance(target.address) == TON // 10 and wallet.seqno(chain) == 2


@pytest.mark.slow
@needs_node
def test_a_resend_refused_because_the_first_copy_landed_is_a_success() -> None:
    with open_local_chain(True, fail_rate=0.0) as chain:
        wallet, target = chain.new_wallet(TON), Wallet.create()
        chain.settle()
        real_send = chain.send_boc

        def first_answer_lost(boc: bytes) -> None:
            real_send(boc)
            chain.produce_blocks(1)  # the first copy lands before the resend
            real_send(boc)  # refused: its seqno is spent

        chain.send_boc = first_answer_lost  # type: ignore[method-assign]
        with pytest.raises(ChainError, match="not accepted"):
            first_answer_lost(transfer_boc(wallet, target.address, 1, seqno=wallet.seqno(chain)))
        chain.settle()
        landed = wallet.transfer(chain, target.address, TON // 10)
        assert landed.in_value == TON // 10 and wallet.seqno(chain) == 3  # each message applied once


@pytest.mark.slow
@needs_node
def test_the_rate_limit_answers_429_and_the_client_rides_it_out() -> None:
    with open_local_chain(True, rate_limit_nokey=1.0, fail_rate=0.0) as chain:
        address = chain.new_wallet(TON).address
        url = f"{chain.endpoint}/api/v2/getAddressInformation?address={address}"
        refused = []
        for _ in range(4):  # a burst without a key: one a second is allowed
            try:
                urllib.request.urlopen(url, timeout=10).close()
            except urllib.error.HTTPError as exc:
                refused.append((exc.code, json.loads(exc.read())))
        assert refused and all(r == (429, RATE_LIMITED) for r in refused)
        keyless, expected = TonCenter(chain.endpoint), chain.balance(address)
        assert [keyless.balance(address) for _ in range(4)] == [expected] * 4
        assert keyless.retried["429"] >= 1
        before = chain.retried["429"]
        chain.balance(address)  # a key has its own, higher, limit
        assert chain.retried["429"] == before


@pytest.mark.slow
@needs_node
def test_injected_5xx_are_ridden_out_and_a_resent_transfer_lands_once() -> None:
    with open_local_chain(True, fail_rate=0.4, seed=11, rate_limit=0, rate_limit_nokey=0) as chain:
        failures = set()
        while len(failures) < 2:
            try:
                urllib.request.urlopen(f"{chain.endpoint}/api/v2/getAddressInformation?address={'0:' + '00' * 32}")
            except urllib.error.HTTPError as exc:
                body = json.loads(exc.read())
                assert body["ok"] is False and body["code"] == exc.code and exc.code in (502, 503, 504)
                failures.add(exc.code)
        wallet, target = chain.new_wallet(TON), Wallet.create()
        for _ in range(3):
            wallet.transfer(chain, target.address, TON // 10)
        chain.settle()
        assert sum(chain.retried[s] for s in ("502", "503", "504")) > 0
        credits = [t.in_value for t in chain.transactions(target.address) if t.in_source == raw_address(wallet.address)]
        assert credits == [TON // 10] * 3 and wallet.seqno(chain) == 4  # each transfer once, resent or not


@pytest.mark.slow
@needs_node
def test_a_chain_that_always_fails_spends_the_budget() -> None:
    with open_local_chain(True, fail_rate=1.0, rate_limit=0, rate_limit_nokey=0) as chain:
        with pytest.raises(RetryBudgetSpent) as caught:
            TonCenter(chain.endpoint, retry=RetryPolicy(budget_s=1.5)).balance("0:" + "00" * 32)
        assert caught.value.last_status in (502, 503, 504)


# ---- the local chain's shapes (synchronous mode) ----

# A contract whose every run (a get method or a message) leaves -5, null, a list, a tuple and a
# cell: DROP; PUSHINT -5; PUSHNULL; PUSHINT 1; PUSHNULL; TUPLE 2; PUSHINT 1; PUSHINT 2; TUPLE 2; NEWC; ENDC.
STACK_CODE = begin_cell().store_bytes(bytes.fromhex("307B6D716D6F0271726F02C8C9")).end_cell()
TX_FIELDS = {
    "@type",
    "address",
    "utime",
    "data",
    "transaction_id",
    "fee",
    "storage_fee",
    "other_fee",
    "in_msg",
    "out_msgs",
}
MSG_FIELDS = {"@type", "source", "destination", "value", "fwd_fee", "ihr_fee", "created_lt", "body_hash", "msg_data"}


def api(endpoint: str, method: str, **query: Any) -> Any:
    with urllib.request.urlopen(f"{endpoint}/api/v2/{method}?{urllib.parse.urlencode(query)}") as resp:
        return json.loads(resp.read())["result"]


@pytest.mark.slow
@needs_node
def test_the_local_chain_answers_in_the_real_shapes() -> None:
    with open_local_chain() as chain:
        wallet = chain.new_wallet(TON)
        contract = address_of(state_init(STACK_CODE, begin_cell().end_cell()))
        wallet.transfer(chain, contract, TON // 10, init=state_init(STACK_CODE, begin_cell().end_cell()))

        req = urllib.request.Request(
            f"{chain.endpoint}/api/v2/runGetMethod",
            data=json.dumps({"address": contract, "method": "anything", "stack": [["num", "-0x2a"]]}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req) as resp:
            stack = json.loads(resp.read())["result"]["stack"]
        number_one = {"@type": "tvm.stackEntryNumber", "number": {"@type": "tvm.numberDecimal", "number": "1"}}
        assert stack[:5] == [
            ["num", "-0x2a"],  # the argument, under the method id the code drops
            ["num", "-0x5"],
            ["list", {"@type": "tvm.list", "elements": []}],
            ["list", {"@type": "tvm.list", "elements": [number_one]}],  # (1, null) is a list to tonlib
            [
                "tuple",
                {
                    "@type": "tvm.tuple",
                    "elements": [number_one, {**number_one, "number": {**number_one["number"], "number": "2"}}],
                },
            ],
        ]
        assert stack[5][0] == "cell" and stack[5][1]["object"] == {"data": {"b64": "", "len": 0}, "refs": []}
        got = chain.run_get_method(contract, "anything")
        assert got[:4] == [-5, None, [1], [1, 2]] and isinstance(got[4], Cell)

        rows = api(chain.endpoint, "getTransactions", address=wallet.address, limit=10)
        sent = rows[0]
        assert set(sent) == TX_FIELDS and set(sent["in_msg"]) == MSG_FIELDS | {"message"}
        assert sent["@type"] == "raw.transaction" and isinstance(sent["utime"], int)
        assert sent["transaction_id"]["lt"].isdigit() and len(base64.b64decode(sent["transaction_id"]["hash"])) == 32
        assert sent["in_msg"]["source"] == "" and sent["in_msg"]["msg_data"]["@type"] == "msg.dataRaw"
        out = sent["out_msgs"][0]
        assert raw_address(out["destination"]) == contract and out["destination"] != contract  # user-friendly
        assert out["msg_data"]["init_state"]  # it deployed the contract
        assert int(sent["fee"]) == int(sent["storage_fee"]) + int(sent["other_fee"]) > int(out["fwd_fee"]) > 0
        tx = parse_transaction(sent)
        assert tx.account == raw_address(wallet.address) and tx.out_messages == ((contract, TON // 10),)
        assert tx.succeeded and tx.lt == int(sent["transaction_id"]["lt"])
        assert [t.lt for t in chain.transactions(wallet.address)] == [int(r["transaction_id"]["lt"]) for r in rows]
        with pytest.raises(ChainError, match="hash"):
            parse_transaction({**sent, "transaction_id": rows[1]["transaction_id"]})

        wallet.transfer(
            chain, contract, TON // 100, body=begin_cell().store_uint(0, 32).store_snake_string("hi").end_cell()
        )
        comment = api(chain.endpoint, "getTransactions", address=contract, limit=1)[0]["in_msg"]
        assert comment["msg_data"] == {"@type": "msg.dataText", "text": base64.b64encode(b"hi").decode()}
        assert comment["message"] == "hi" and raw_address(comment["source"]) == raw_address(wallet.address)

        info = api(chain.endpoint, "getAddressInformation", address=contract)
        assert info["state"] == "active" and info["code"] and int(info["balance"]) > 0
        assert api(chain.endpoint, "getAddressInformation", address=Wallet.create().address)["balance"] == 0
