"""Frames of the job protocol ``/cocoon/job/1`` and their codec.

A frame on the stream is a 4-byte big-endian length, then a msgpack array whose
first item is the frame type. One long-lived stream between a client and a
worker carries many jobs, told apart by ``job_id``, so a job costs no stream
set-up or protocol negotiation (see :mod:`.connection` for the rules of order).

Sizes are capped up front (``MAX_FRAME``): a decoder never allocates more than
the frame it was given, and every field is type- and range-checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import framing
from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage, MessageTooLarge
from cocoon_p2p.core.pricing import Price
from cocoon_p2p.core.wire import expect_bytes, expect_int, expect_list, expect_str, expect_str_list, pack, unpack
from cocoon_p2p.execution.chat_options import ChatOptions, ToolCall, tool_calls_from_wire
from cocoon_p2p.execution.sampling import MAX_TOP_LOGPROBS, FinishReason, Sampling, TokenLogprob
from cocoon_p2p.execution.tensors import Tensor

JOB_PROTOCOL = "/cocoon/job/1"  # the libp2p protocol id of a job stream

MAX_FRAME = 8 * 1024 * 1024  # one frame; inputs beyond this are "too-large"
MAX_TENSORS = 16
MAX_TEXTS = 256
MAX_TEXT = 32 * 1024  # characters per input text
MAX_TOKENS = 4096  # generation length cap
MAX_MESSAGE = 1024
# Special tokens a text tokenizer may add to one text (BERT's [CLS] and [SEP] are 2):
# the margin above one token per UTF-8 byte that an embedding bill may hold.
TEXT_SPECIAL_TOKENS = 4


# Error codes a worker sends in an ErrorFrame (and a client maps to exceptions).
BUSY = "busy"
UNKNOWN_MODEL = "unknown-model"
BAD_INPUT = "bad-input"
PRICE = "price"
DEADLINE = "deadline"
CANCELLED = "cancelled"
BACKEND = "backend"
TOO_LARGE = "too-large"
SHUTTING_DOWN = "shutting-down"
PAYMENT = "payment"  # no open channel with this client, or it owes more than its credit
CHANNEL_ENDED = "channel-ended"  # the client's channel here is closing or closed: open a new one
ERROR_CODES = frozenset(
    {BUSY, UNKNOWN_MODEL, BAD_INPUT, PRICE, DEADLINE, CANCELLED, BACKEND, TOO_LARGE, SHUTTING_DOWN, PAYMENT,
     CHANNEL_ENDED}
)  # fmt: skip
# Failures the client notes itself (never sent in an error frame). Which codes are
# retried on another worker is the client's policy: see :mod:`.attempts`.
WORKER_LOST = "worker-lost"  # the worker went away mid-job, broke the protocol, or was unreachable
PAYMENT_SETUP = "payment-setup"  # no payment channel to the worker could be opened
NO_WORKERS = "no-workers"  # no eligible worker (left) for the job
NO_ATTESTED_WORKERS = "no-attested-workers"  # the job requires a TEE and no worker of the model is attested


_REQUEST, _ACCEPTED, _CHUNK, _RESULT, _ERROR, _CANCEL = 1, 2, 3, 4, 5, 6


def price_refusal(accepted_price: int, max_price: int) -> str | None:
    """Why a client must drop a job its worker accepted at ``accepted_price``, if it must."""
    return "worker accepted above our cap" if accepted_price > max_price else None


def charge_refusal(price: Price, result: JobResult) -> str | None:
    """Why a client must not pay ``result``, if it must not: its cost is its usage at the
    agreed ``price`` (input units at one price, generated tokens at the other), exactly."""
    if result.cost_nanoton != price.cost(result.usage_units, result.completion_units):
        return "charged cost differs from price x usage"
    return None


def usage_bound(request: JobRequest, *, streamed_tokens: int = 0) -> int:
    """The most units an honest worker can bill for ``request``, from what the client sent
    and received alone (it needs no tokenizer, and trusts none of the worker's).

    * tensors: rows (axis 0) of the largest input: a tensor job's unit is an item (a row);
    * embedding texts: tokens, bounded by each text's length in UTF-8 bytes plus the
      special tokens a tokenizer adds (``TEXT_SPECIAL_TOKENS``), as a prompt's below;
    * generation (``max_tokens`` > 0): tokens, the prompt's and the generated ones. The
      generated ones are counted exactly: one per token id streamed (at most
      ``max_tokens``, which the client also checks). The prompt's are bounded by its
      length in UTF-8 bytes: a tokenizer of bytes (BPE, byte fallback) covers at least
      one byte per token (SmolLM2's byte-level BPE has no normalizer), so a worker can
      inflate the prompt's count by at most that margin (about 4x for English text).
    """
    if request.max_tokens > 0:
        prompt = sum(len(t.encode("utf-8", "surrogatepass")) for t in request.texts)
        if request.verify_tokens:  # a verify job: the prompt and the tokens it checks
            return prompt + len(request.verify_tokens)
        return prompt + min(streamed_tokens, request.max_tokens)
    if request.texts:
        return sum(len(t.encode("utf-8", "surrogatepass")) + TEXT_SPECIAL_TOKENS for t in request.texts)
    return max((t.shape[0] if t.shape else 1 for t in request.inputs), default=0)


def usage_refusal(request: JobRequest, result: JobResult, *, streamed_tokens: int = 0) -> str | None:
    """Why a client must not pay ``result`` for ``request``, if it must not: more units than
    the request can hold (:func:`usage_bound`), or more generated tokens than were streamed
    (none but in a generation), break the protocol."""
    bound = usage_bound(request, streamed_tokens=streamed_tokens)
    usage, completion = result.usage_units, result.completion_units
    if usage > bound:
        return f"job {request.job_id}: usage {usage} above the {bound} units the request holds"
    generated = min(streamed_tokens, request.max_tokens) if request.max_tokens and not request.verify_tokens else 0
    if completion > min(usage, generated):
        return f"job {request.job_id}: {completion} generated tokens billed, {generated} streamed"
    return None


@dataclass(frozen=True, kw_only=True)
class JobRequest:
    """Client -> worker: run ``model_id`` on ``inputs`` (tensors) or ``texts``.

    ``deadline_ms`` is absolute Unix time; ``max_price_nanoton`` caps the price per
    unit the client accepts; ``max_tokens`` bounds generation (0: not generation).
    """

    job_id: int
    model_id: bytes
    inputs: tuple[Tensor, ...] = ()
    texts: tuple[str, ...] = ()
    max_tokens: int = 0
    deadline_ms: int
    max_price_nanoton: int
    # A verify job: check these tokens, a greedy generation of ``max_tokens`` at most after
    # the prompt, in one teacher-forced pass (see execution.verification); () for any other job.
    verify_tokens: tuple[int, ...] = ()
    # A generation's decoding parameters; None is greedy (the default, and what older
    # clients send). Travels after them: [..., verify_tokens (maybe empty), sampling].
    sampling: Sampling | None = None
    # A chat for an engine (its messages, response_format, tools): the worker's engine
    # answers the chat itself. Travels last, as canonical JSON: [..., sampling or nil, chat].
    chat: ChatOptions | None = None

    def to_wire(self) -> list[Any]:
        wire = [
            _REQUEST,
            self.job_id,
            self.model_id,
            [t.to_wire() for t in self.inputs],
            list(self.texts),
            self.max_tokens,
            self.deadline_ms,
            self.max_price_nanoton,
        ]
        sampling = self.sampling.to_wire() if self.sampling is not None else None
        if self.chat is not None:
            return wire + [list(self.verify_tokens), sampling, self.chat.to_wire()]
        if sampling is not None:
            return wire + [list(self.verify_tokens), sampling]
        return wire + [list(self.verify_tokens)] if self.verify_tokens else wire


@dataclass(frozen=True, kw_only=True)
class JobAccepted:
    """Worker -> client: the job runs, at ``price_nanoton`` per ``unit`` (and
    ``completion_price_nanoton`` per generated token, when it differs)."""

    job_id: int
    price_nanoton: int
    unit: str
    completion_price_nanoton: int | None = None

    @property
    def price(self) -> Price:
        """The agreed price per input unit and per generated token."""
        return Price.of(self.price_nanoton, self.completion_price_nanoton)

    def to_wire(self) -> list[Any]:
        wire = [_ACCEPTED, self.job_id, self.price_nanoton, self.unit]
        return wire if self.completion_price_nanoton is None else wire + [self.completion_price_nanoton]


@dataclass(frozen=True, kw_only=True)
class JobChunk:
    """Worker -> client: a piece of streamed output (generated tokens), in order."""

    job_id: int
    seq: int
    token_ids: tuple[int, ...] = ()
    text: str = ""
    # Per token, when the job asked for logprobs: the chosen token's and the alternatives'.
    logprobs: tuple[TokenLogprob, ...] = ()

    def to_wire(self) -> list[Any]:
        wire = [_CHUNK, self.job_id, self.seq, list(self.token_ids), self.text]
        if self.logprobs:
            wire.append([[lp.token, lp.logprob, [[t, v] for t, v in lp.top]] for lp in self.logprobs])
        return wire


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """Worker -> client, last frame of a successful job: outputs and what it cost.

    ``usage_units`` counts every unit billed; ``completion_units`` the generated tokens
    among them (billed at the completion price); ``finish_reason`` says why a generation
    ended (None: not a generation, or a worker that does not say)."""

    job_id: int
    outputs: tuple[Tensor, ...] = ()
    usage_units: int
    cost_nanoton: int
    compute_us: int = 0
    receipt: bytes = b""  # the worker's signature over the job's receipt (see .receipts); b"": none
    completion_units: int = 0
    finish_reason: FinishReason | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # the calls an engine's model made (a chat with tools)

    def to_wire(self) -> list[Any]:
        wire = [
            _RESULT,
            self.job_id,
            [t.to_wire() for t in self.outputs],
            self.usage_units,
            self.cost_nanoton,
            self.compute_us,
        ]
        if self.completion_units or self.finish_reason is not None or self.tool_calls:
            tail = [self.receipt or None, self.completion_units, str(self.finish_reason or "")]
            return wire + tail + ([[c.to_wire() for c in self.tool_calls]] if self.tool_calls else [])
        return wire + [self.receipt] if self.receipt else wire


@dataclass(frozen=True, kw_only=True)
class JobError:
    """Worker -> client, last frame of a failed job. ``code`` is one of ERROR_CODES."""

    job_id: int
    code: str
    message: str = ""

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise LocalProtocolError(f"unknown job error code {self.code!r}")

    def to_wire(self) -> list[Any]:
        return [_ERROR, self.job_id, self.code, self.message[:MAX_MESSAGE]]


@dataclass(frozen=True, kw_only=True)
class JobCancel:
    """Client -> worker: stop this job; the worker ends it with a ``cancelled`` error."""

    job_id: int

    def to_wire(self) -> list[Any]:
        return [_CANCEL, self.job_id]


Frame = JobRequest | JobAccepted | JobChunk | JobResult | JobError | JobCancel


def encode_frame(frame: Frame, *, max_frame: int = MAX_FRAME) -> bytes:
    """Length-prefixed bytes of ``frame``; LocalProtocolError if it exceeds ``max_frame``."""
    body = pack(frame.to_wire())
    if len(body) > max_frame:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds the {max_frame} byte limit", code=TOO_LARGE)
    return framing.frame(body)


def decode_frame(body: bytes, *, max_frame: int = MAX_FRAME) -> Frame:
    """Parse one frame body (without its length prefix).

    Raises MessageTooLarge or MalformedMessage for anything that is not a
    well-formed frame within the limits; never anything else.
    """
    if len(body) > max_frame:
        raise MessageTooLarge(f"job frame: {len(body)} bytes exceeds the {max_frame} byte limit")
    obj = unpack(body, max_size=max_frame, what="job frame", canonical=False)
    if not isinstance(obj, list) or not obj:
        raise MalformedMessage("job frame: expected a non-empty array")
    kind = obj[0]
    if kind == _REQUEST:
        extra = min(max(len(obj) - 8, 0), 3)  # verify tokens, sampling, chat: each optional
        _, job_id, model_id, inputs, texts, max_tokens, deadline, max_price, *rest = expect_list(
            obj, 8 + extra, "job request"
        )
        verify = rest[0] if rest else None
        if verify is not None and (
            not isinstance(verify, list) or len(verify) > MAX_TOKENS or (extra == 1 and not verify)
        ):
            raise MalformedMessage(f"job request: 1 to {MAX_TOKENS} tokens to verify", code=BAD_INPUT)
        sampling = Sampling.from_wire(rest[1]) if extra >= 2 and (extra == 2 or rest[1] is not None) else None
        chat = ChatOptions.from_wire(rest[2]) if extra == 3 else None
        if not isinstance(inputs, list) or len(inputs) > MAX_TENSORS:
            raise MalformedMessage(f"job request: at most {MAX_TENSORS} input tensors", code=BAD_INPUT)
        return JobRequest(
            job_id=expect_int(job_id, "job id"),
            model_id=expect_bytes(model_id, "model id", min_len=32, max_len=32),
            inputs=tuple(Tensor.from_wire(t, max_bytes=max_frame) for t in inputs),
            texts=expect_str_list(texts, "job texts", max_items=MAX_TEXTS, max_len=MAX_TEXT),
            max_tokens=expect_int(max_tokens, "max tokens", hi=MAX_TOKENS),
            deadline_ms=expect_int(deadline, "deadline"),
            max_price_nanoton=expect_int(max_price, "max price"),
            verify_tokens=tuple(expect_int(t, "token id", hi=2**31) for t in verify) if verify else (),
            sampling=sampling,
            chat=chat,
        )
    if kind == _ACCEPTED:
        with_completion = len(obj) == 5
        _, job_id, price, unit, *per_token = expect_list(obj, 4 + with_completion, "job accepted")
        return JobAccepted(
            job_id=expect_int(job_id, "job id"),
            price_nanoton=expect_int(price, "price"),
            unit=expect_str(unit, "unit", max_len=32, min_len=1),
            completion_price_nanoton=expect_int(per_token[0], "completion price") if per_token else None,
        )
    if kind == _CHUNK:
        with_logprobs = len(obj) == 6
        _, job_id, seq, token_ids, text, *logprobs = expect_list(obj, 5 + with_logprobs, "job chunk")
        if not isinstance(token_ids, list) or len(token_ids) > MAX_TOKENS:
            raise MalformedMessage("job chunk: token ids must be a list")
        return JobChunk(
            job_id=expect_int(job_id, "job id"),
            seq=expect_int(seq, "chunk seq"),
            token_ids=tuple(expect_int(t, "token id", hi=2**31) for t in token_ids),
            text=expect_str(text, "chunk text", max_len=MAX_TEXT),
            logprobs=_logprobs(logprobs[0], max(1, len(token_ids))) if logprobs else (),
        )
    if kind == _RESULT:
        # a receipt, then completion units and the finish reason, then tool calls: each optional
        extra = min(len(obj) - 6, 4) if len(obj) >= 9 else min(max(len(obj) - 6, 0), 1)
        _, job_id, outputs, usage, cost, compute_us, *tail = expect_list(obj, 6 + extra, "job result")
        if not isinstance(outputs, list) or len(outputs) > MAX_TENSORS:
            raise MalformedMessage(f"job result: at most {MAX_TENSORS} output tensors")
        receipt = tail[0] if tail else None
        completion, finish = (tail[1], expect_str(tail[2], "finish reason", max_len=32)) if extra >= 3 else (0, "")
        if finish and FinishReason.parse(finish) is None:
            raise MalformedMessage(f"job result: unknown finish reason {finish!r}")
        return JobResult(
            job_id=expect_int(job_id, "job id"),
            outputs=tuple(Tensor.from_wire(t, max_bytes=max_frame) for t in outputs),
            usage_units=expect_int(usage, "usage"),
            cost_nanoton=expect_int(cost, "cost"),
            compute_us=expect_int(compute_us, "compute time"),
            receipt=expect_bytes(receipt, "receipt", min_len=64, max_len=64) if receipt is not None else b"",
            completion_units=expect_int(completion, "completion units"),
            finish_reason=FinishReason.parse(finish),
            tool_calls=tool_calls_from_wire(tail[3]) if extra == 4 else (),
        )
    if kind == _ERROR:
        _, job_id, code, message = expect_list(obj, 4, "job error")
        code = expect_str(code, "error code", max_len=32)
        if code not in ERROR_CODES:
            raise MalformedMessage(f"job error: unknown code {code!r}")
        return JobError(
            job_id=expect_int(job_id, "job id"), code=code, message=expect_str(message, "message", max_len=MAX_MESSAGE)
        )
    if kind == _CANCEL:
        _, job_id = expect_list(obj, 2, "job cancel")
        return JobCancel(job_id=expect_int(job_id, "job id"))
    raise MalformedMessage(f"job frame: unknown type {kind!r}")


MAX_PIECE = 256  # characters of one token's text in a logprobs entry


def _logprob(obj: Any, what: str) -> float:
    if not isinstance(obj, float | int) or isinstance(obj, bool) or not -1e4 <= obj <= 0.0:
        raise MalformedMessage(f"{what}: expected a log-probability in [-1e4, 0]")
    return float(obj)


def _logprobs(obj: Any, tokens: int) -> tuple[TokenLogprob, ...]:
    """A chunk's logprobs: one entry per token it carries, each with at most
    ``MAX_TOP_LOGPROBS`` alternatives."""
    if not isinstance(obj, list) or not 0 < len(obj) <= tokens:
        raise MalformedMessage("job chunk: one logprobs entry per token")
    out = []
    for entry in obj:
        token, logprob, top = expect_list(entry, 3, "logprobs entry")
        if not isinstance(top, list) or len(top) > MAX_TOP_LOGPROBS:
            raise MalformedMessage(f"logprobs entry: at most {MAX_TOP_LOGPROBS} alternatives")
        alternatives = []
        for alt in top:
            piece, value = expect_list(alt, 2, "logprobs alternative")
            alternatives.append((expect_str(piece, "token text", max_len=MAX_PIECE), _logprob(value, "logprob")))
        out.append(
            TokenLogprob(
                expect_str(token, "token text", max_len=MAX_PIECE), _logprob(logprob, "logprob"), tuple(alternatives)
            )
        )
    return tuple(out)
