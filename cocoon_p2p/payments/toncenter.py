"""The toncenter v2 HTTP API client: real TON or the local chain, one client.

:class:`TonCenter` speaks the subset cocoon needs (sendBoc, runGetMethod,
getAddressInformation, getTransactions) in the shapes the real API answers with, so an
operator points it at a public endpoint (with an API key) or at their own node; the
tests and the demo point it at :func:`cocoon_p2p.testing.localchain.open_local_chain`.
Public endpoints answer 429 past their rate limit (toncenter: about 1 request a second
without a key, 10 with one) and 5xx at times: every call retries those, and dropped
connections, with exponential backoff and jitter within a :class:`RetryPolicy` budget,
then raises :class:`RetryBudgetSpent`. sendBoc only means "accepted": what landed, and
how it went, is read back as :class:`ChainTransaction` values.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pytoniq_core import Address, Cell, Transaction

from cocoon_p2p.core.errors import CocoonError

MAX_ANSWER = 1 << 22  # bytes read from one answer (100 transactions with their BoCs fit)
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


class ChainError(CocoonError):
    """The chain endpoint failed or refused a request."""


class RetryBudgetSpent(ChainError):
    """A call kept failing transiently (429, 5xx, no answer) until its retry budget was spent."""

    def __init__(self, path: str, attempts: int, last: str, last_status: int | None) -> None:
        super().__init__(f"{path}: gave up after {attempts} tries: {last}")
        self.path = path
        self.attempts = attempts
        self.last_status = last_status  # None: the last try got no answer at all


@dataclass(frozen=True)
class RetryPolicy:
    """How a :class:`TonCenter` call rides out transient failures.

    A try answered with a status in ``statuses``, or not answered (refused, reset, timed
    out), is repeated after ``min(max_delay_s, first_delay_s * 2**n)`` seconds times a random
    factor in [0.5, 1) (jitter: clients that failed together do not retry together), or after
    the server's Retry-After when that is longer. The call gives up with
    :class:`RetryBudgetSpent` when the next wait would end more than ``budget_s`` after it began.
    """

    budget_s: float = 30.0
    first_delay_s: float = 0.25
    max_delay_s: float = 4.0
    statuses: frozenset[int] = TRANSIENT_STATUSES

    def delay(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (0 for the first)."""
        cap = min(self.max_delay_s, self.first_delay_s * 2.0 ** min(retry, 32))
        return cap * (0.5 + rng.random() / 2)


class _Transient(Exception):
    """One try failed in a way worth retrying (private to :meth:`TonCenter._call`)."""

    def __init__(self, cause: str, status: int | None, reason: str, retry_after: float | None) -> None:
        super().__init__(reason)
        self.cause, self.status, self.reason, self.retry_after = cause, status, reason, retry_after


class TonCenter:
    """A toncenter v2 client (synchronous; call it from a thread in trio code).

    ``rng``, ``sleep`` and ``clock`` drive the retries' jitter and waits (tests pass their
    own). :attr:`retried` counts retries by cause ("429", "503", "no answer")."""

    # How often to ask whether a message landed: TON takes a block (~5 s) and
    # toncenter allows 1-10 requests a second. The local chain applies at once.
    confirm_poll_s = 1.0

    def __init__(
        self,
        endpoint: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.retried: Counter[str] = Counter()
        self._rng = rng or random.Random()
        self._sleep, self._clock = sleep, clock
        self._lock = threading.Lock()  # Wallet calls from several threads

    def _call(
        self,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        statuses: frozenset[int] | None = None,
    ) -> Any:
        """One API call's ``result``, retried as :attr:`retry` says (``statuses`` overrides which
        statuses are transient). :class:`RetryBudgetSpent` when transient failures outlast the
        budget; :class:`ChainError` for any other failure (a 4xx, ``ok: false``, not JSON)."""
        transient = self.retry.statuses if statuses is None else statuses
        deadline = self._clock() + self.retry.budget_s
        tries = 0
        while True:
            tries += 1
            timeout_s = max(1.0, min(self.timeout_s, deadline - self._clock()))
            try:
                return self._try(path, query, body, transient, timeout_s)
            except _Transient as failure:
                wait = self.retry.delay(tries - 1, self._rng)
                if failure.retry_after is not None:
                    wait = max(wait, failure.retry_after)
                if self._clock() + wait > deadline:
                    raise RetryBudgetSpent(path, tries, failure.reason, failure.status) from None
                with self._lock:
                    self.retried[failure.cause] += 1
                self._sleep(wait)

    def _try(
        self,
        path: str,
        query: dict[str, Any] | None,
        body: dict[str, Any] | None,
        transient: frozenset[int],
        timeout_s: float,
    ) -> Any:
        url = self.endpoint + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                raw = resp.read(MAX_ANSWER)
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}: {_error_text(exc)}"
            if exc.code in transient:
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                raise _Transient(str(exc.code), exc.code, reason, retry_after) from exc
            raise ChainError(f"{path}: {reason}") from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short (URLError too)
            raise _Transient("no answer", None, f"no answer: {exc}", None) from exc
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise ChainError(f"{path}: the answer is not JSON") from exc
        if not isinstance(payload, dict) or payload.get("ok") is not True:
            error = payload.get("error", "failed") if isinstance(payload, dict) else "failed"
            raise ChainError(f"{path}: {error}")
        return payload["result"]

    def send_boc(self, boc: bytes) -> None:
        """Hand an external message to the chain: accepted, not yet applied.

        Retried like every call (TON applies a wallet's message once, by its seqno, so a
        repeat after a lost answer is harmless), except on a 500: that is the liteserver
        refusing the message, which asking again does not change."""
        self._call(
            "/api/v2/sendBoc",
            body={"boc": base64.b64encode(boc).decode()},
            statuses=self.retry.statuses - {500},
        )

    def run_get_method(self, address: str, method: str, stack: list[int] | None = None) -> list[Any]:
        """The method's result stack: ints as int, cells (and slices) as pytoniq Cells, tuples and
        lists as lists, null (toncenter's empty list) as None."""
        args = [["num", hex(x)] for x in stack or []]
        res = self._call("/api/v2/runGetMethod", body={"address": address, "method": method, "stack": args})
        if res["exit_code"] not in (0, 1):
            raise ChainError(f"{method} on {address} exited with {res['exit_code']}")
        return [_stack_item(kind, value) for kind, value in res["stack"]]

    def balance(self, address: str) -> int:
        return int(self._call("/api/v2/getAddressInformation", query={"address": address})["balance"])

    def state(self, address: str) -> str:
        return str(self._call("/api/v2/getAddressInformation", query={"address": address})["state"])

    def transactions(
        self, address: str, limit: int = 20, *, start: ChainTransaction | None = None
    ) -> list[ChainTransaction]:
        """The account's newest ``limit`` transactions (toncenter gives at most 100), newest
        first; from ``start`` back (``start`` included) to page further."""
        query: dict[str, Any] = {"address": address, "limit": limit}
        if start is not None:
            query.update(lt=start.lt, hash=start.hash.hex())
        return [parse_transaction(row) for row in self._call("/api/v2/getTransactions", query=query)]

    def now(self) -> int:
        """The chain's clock (real TON follows wall time closely enough for quarantines of minutes)."""
        return int(time.time())


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The ``error`` of a toncenter error body, else the HTTP reason."""
    try:
        payload = json.loads(exc.read(1 << 16))
    except (ValueError, OSError, http.client.HTTPException):
        payload = None
    finally:
        exc.close()
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error or exc.reason)


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (it may be a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _stack_item(kind: str, value: Any) -> Any:
    """One top-level runGetMethod entry as ton-http-api writes it: ["num", "-0x5"], ["cell",
    {bytes, object}], ["tuple"|"list", {elements}] (tonlib makes null an empty list)."""
    if kind == "num":
        return int(value, 16)  # "0x7b" and "-0x7b"
    if kind in ("cell", "slice"):
        return Cell.one_from_boc(base64.b64decode(value["bytes"]))
    if kind == "tuple":
        return [_entry(e) for e in value["elements"]]
    if kind == "list":
        return [_entry(e) for e in value["elements"]] or None
    return None


def _entry(e: dict[str, Any]) -> Any:
    """One toncenter ``tvm.stackEntry*`` object (inside tuples and lists)."""
    kind = e.get("@type")
    if kind == "tvm.stackEntryNumber":
        return int(e["number"]["number"])
    if kind == "tvm.stackEntryCell":
        return Cell.one_from_boc(base64.b64decode(e["cell"]["bytes"]))
    if kind == "tvm.stackEntrySlice":
        return Cell.one_from_boc(base64.b64decode(e["slice"]["bytes"]))
    if kind == "tvm.stackEntryTuple":
        return [_entry(x) for x in e["tuple"]["elements"]]
    if kind == "tvm.stackEntryList":
        return [_entry(x) for x in e["list"]["elements"]] or None
    return None


def raw_address(address: str) -> str:
    """Any form of a TON address (raw, user-friendly ``EQ…``/``UQ…``/``kQ…``) in raw form, ``0:<64 hex>``."""
    try:
        return str(Address(address).to_str(is_user_friendly=False))
    except Exception as exc:  # pytoniq raises AddressError, and ValueError or IndexError on garbage
        raise ChainError(f"not a TON address: {address!r}") from exc


@dataclass(frozen=True)
class ChainTransaction:
    """One transaction of an account, as getTransactions reports it (real TON or the local chain).

    Addresses are raw (``0:<hex>``: compare them with :func:`raw_address` of any form).
    ``in_source`` is "" for an external message (a wallet's signed transfer); ``in_op`` is the
    first 32 bits of the incoming body (None when shorter); ``bounced``: the incoming message
    is a bounce. ``exit_code`` is the compute phase's, None when it was skipped (value sent to
    an account without code); ``aborted``: the actions did not happen (compute or action phase
    failed, or compute skipped). Value carried in is credited even when aborted, unless bounced
    back. ``out_messages`` are (destination, value) pairs, destination "" for external ones.
    """

    account: str
    lt: int
    hash: bytes
    utime: int
    in_source: str
    in_value: int
    in_op: int | None
    bounced: bool
    aborted: bool
    exit_code: int | None
    out_messages: tuple[tuple[str, int], ...]
    fee: int

    @property
    def succeeded(self) -> bool:
        """The code ran, exited 0 or 1, and its actions happened."""
        return not self.aborted and self.exit_code in (0, 1)


def parse_transaction(row: Mapping[str, Any]) -> ChainTransaction:
    """One getTransactions row (toncenter v2's ``raw.transaction``) as a :class:`ChainTransaction`.

    Values and addresses come from the row's fields; what the row does not carry (the exit
    code, the aborted and bounced flags, the op) from its ``data``, the transaction's BoC,
    whose hash must be ``transaction_id.hash``. A malformed row is a :class:`ChainError`."""
    try:
        tx_hash = base64.b64decode(row["transaction_id"]["hash"])
        cell = Cell.one_from_boc(base64.b64decode(row["data"]))
        if cell.hash != tx_hash:
            raise ChainError(f"transaction {row['transaction_id']}: its data does not hash to its id")
        tx = Transaction.deserialize(cell.begin_parse())
        msg = tx.in_msg
        compute = getattr(tx.description, "compute_ph", None)  # none in storage-only transactions
        in_msg = row.get("in_msg") or {}
        return ChainTransaction(
            account=f"{msg.info.dest.wc if msg is not None else 0}:{tx.account_addr_hex}",
            lt=int(row["transaction_id"]["lt"]),
            hash=tx_hash,
            utime=int(row["utime"]),
            in_source=raw_address(in_msg["source"]) if in_msg.get("source") else "",
            in_value=int(in_msg.get("value", 0)),
            in_op=msg.body.begin_parse().load_uint(32) if msg is not None and len(msg.body.bits) >= 32 else None,
            bounced=bool(msg is not None and msg.is_internal and msg.info.bounced),
            aborted=bool(getattr(tx.description, "aborted", False)),
            exit_code=int(compute.exit_code) if compute is not None and compute.type_ == "vm" else None,
            out_messages=tuple(
                (raw_address(o["destination"]) if o.get("destination") else "", int(o["value"]))
                for o in row.get("out_msgs", [])
            ),
            fee=int(row["fee"]),
        )
    except ChainError:
        raise
    except Exception as exc:  # KeyError/TypeError/ValueError on the JSON, pytoniq's own errors on the BoC
        raise ChainError(f"not a toncenter transaction row: {exc!r}") from exc


def wait_until(check: Any, *, timeout_s: float = 10.0, poll_s: float = 0.2) -> None:
    """Poll ``check()`` until true (a real chain confirms asynchronously; the local one at once).
    A ChainError while polling counts as "not yet": toncenter limits requests per second."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except ChainError:
            pass
        if time.monotonic() > deadline:
            raise ChainError("timed out waiting for the chain")
        time.sleep(poll_s)
