"""Fraud proofs: portable evidence that a worker returned a wrong result (pure).

A client whose spot check (:mod:`.spotcheck`) caught a worker gossips a proof, so
that every node can stop trusting that worker, not just the one that was cheated.
Wire format (version 1), a canonical msgpack array::

    [1, receipt, inputs, texts, max_tokens, outputs, token_ids,
     reference_outputs, reference_tokens, reporter, issued_at_ms, signature]

``receipt`` is the accused worker's signed receipt (:mod:`.receipts`, laid out as
:meth:`~.receipts.Receipt.encode` lays it out); ``inputs``/``texts``/``max_tokens``
are the request and ``outputs``/``token_ids`` the result it covers (tensors in
their wire form); ``reference_*`` what the reporter got instead (another worker's
run, or its own). The reporter signs every field before the signature with its
PeerId's key, domain ``cocoon/fraud/1``. At most :data:`MAX_PROOF_BYTES`; valid for
:data:`MAX_TTL_MS` after ``issued_at_ms``.

**A proof can never hurt an honest worker.** The receipt binds the worker to the
outputs it returned (its own signature over their digest), and
:func:`decode_proof` refuses a proof whose request or outputs differ from what the
receipt covers: the reporter cannot put words in the worker's mouth. All a
reporter controls is the reference, and the reference is only a claim: a node that
serves the model re-runs the request and judges the worker's outputs against its
own run (:func:`judge`), which finds an honest worker's outputs right and turns the
accusation against the reporter. A node that cannot re-run acts only on the word
of reporters it was configured to trust.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import signed, wire
from cocoon_p2p.core.errors import (
    ForeignKey,
    LocalProtocolError,
    MalformedMessage,
    RateLimited,
    RemoteProtocolError,
)
from cocoon_p2p.core.identity import PEER_ID_BYTES, Identity
from cocoon_p2p.execution.tensors import Tensor

from .frames import MAX_TENSORS, MAX_TEXT, MAX_TEXTS, MAX_TOKENS
from .receipts import Receipt, inputs_digest, outputs_digest, parse_receipt
from .spotcheck import Mismatch, compare_outputs, compare_tokens

VERSION = 1
DOMAIN = b"cocoon/fraud/1"
MAX_PROOF_BYTES = 1 << 20
MAX_TTL_MS = 24 * 3600 * 1000  # old enough to forget: the accused was dealt with, or got away
MAX_TOKEN_ID = 2**31  # as job chunks bound them
_FIELDS = 12
_RECEIPT_FIELDS = 10


class FalseAccusation(RemoteProtocolError):
    """A fraud proof accused a worker whose outputs a re-run found right (the reporter's fault)."""

    code = "false-accusation"


@dataclass(frozen=True, kw_only=True)
class FraudProof:
    """A reporter's signed claim that ``receipt.worker`` returned ``outputs`` (which it
    signed for) where a correct run returns ``reference_outputs`` / ``reference_tokens``."""

    receipt: Receipt
    inputs: tuple[Tensor, ...]
    texts: tuple[str, ...]
    max_tokens: int
    outputs: tuple[Tensor, ...]
    token_ids: tuple[int, ...]
    reference_outputs: tuple[Tensor, ...]
    reference_tokens: tuple[int, ...]
    reporter: bytes
    issued_at_ms: int
    signature: bytes = b""

    @classmethod
    def create(
        cls,
        ident: Identity,
        *,
        receipt: Receipt,
        inputs: Sequence[Tensor],
        texts: Sequence[str],
        max_tokens: int,
        outputs: Sequence[Tensor],
        token_ids: Sequence[int],
        reference_outputs: Sequence[Tensor],
        reference_tokens: Sequence[int],
        now_ms: int,
    ) -> FraudProof:
        """A proof by ``ident``. LocalProtocolError when the request or the outputs are
        not what ``receipt`` covers: receivers would refuse it and blame us."""
        proof = cls(
            receipt=receipt,
            inputs=tuple(inputs),
            texts=tuple(texts),
            max_tokens=max_tokens,
            outputs=tuple(outputs),
            token_ids=tuple(token_ids),
            reference_outputs=tuple(reference_outputs),
            reference_tokens=tuple(reference_tokens),
            reporter=ident.peer_id,
            issued_at_ms=now_ms,
        )
        try:
            proof.check_receipt()
        except MalformedMessage as exc:
            raise LocalProtocolError(str(exc), code=exc.code) from exc
        return proof.signed_by(ident)

    @property
    def accused(self) -> bytes:
        """The worker this proof accuses (the receipt's signer)."""
        return self.receipt.worker

    def fields(self) -> list[Any]:
        """Every field the reporter's signature covers, in wire order."""
        return [
            VERSION,
            [*self.receipt.fields(), self.receipt.signature],
            [t.to_wire() for t in self.inputs],
            list(self.texts),
            self.max_tokens,
            [t.to_wire() for t in self.outputs],
            list(self.token_ids),
            [t.to_wire() for t in self.reference_outputs],
            list(self.reference_tokens),
            self.reporter,
            self.issued_at_ms,
        ]

    def signed_by(self, ident: Identity) -> FraudProof:
        """This proof with ``ident``'s signature (``ident`` must be the reporter)."""
        if ident.peer_id != self.reporter:
            raise LocalProtocolError("a fraud proof is signed by its reporter")
        return dataclasses.replace(self, signature=signed.sign(ident, DOMAIN, self.fields()))

    def check_receipt(self) -> None:
        """MalformedMessage ``proof-mismatch`` unless the receipt covers exactly this
        request and these outputs (a proof that does not is forged by its reporter)."""
        r = self.receipt
        if r.inputs_digest != inputs_digest(r.model_id, self.inputs, self.texts, self.max_tokens):
            raise MalformedMessage("fraud proof: the request is not the one the receipt covers", code="proof-mismatch")
        if r.outputs_digest != outputs_digest(self.outputs, self.token_ids):
            raise MalformedMessage("fraud proof: the outputs are not the ones the worker signed", code="proof-mismatch")

    def encode(self) -> bytes:
        """Canonical bytes; LocalProtocolError (``too-large``) past :data:`MAX_PROOF_BYTES`."""
        data = wire.pack([*self.fields(), self.signature])
        if len(data) > MAX_PROOF_BYTES:
            raise LocalProtocolError(f"fraud proof of {len(data)} bytes exceeds {MAX_PROOF_BYTES}", code="too-large")
        return data


def _tensors(obj: Any, what: str) -> tuple[Tensor, ...]:
    if not isinstance(obj, list) or len(obj) > MAX_TENSORS:
        raise MalformedMessage(f"fraud proof: {what}: expected at most {MAX_TENSORS} tensors")
    return tuple(Tensor.from_wire(t, max_bytes=MAX_PROOF_BYTES) for t in obj)


def _tokens(obj: Any, what: str) -> tuple[int, ...]:
    if not isinstance(obj, list) or len(obj) > MAX_TOKENS:
        raise MalformedMessage(f"fraud proof: {what}: expected at most {MAX_TOKENS} token ids")
    return tuple(wire.expect_int(t, what, hi=MAX_TOKEN_ID) for t in obj)


def decode_proof(data: bytes, *, now_ms: int) -> FraudProof:
    """Parse and verify a fraud proof, checking in this order:

    1. size, shape and types: MessageTooLarge / MalformedMessage;
    2. the reporter's signature: BadSignature;
    3. the receipt (its fields, then the worker's signature): MalformedMessage / BadSignature;
    4. that the receipt covers the request and the outputs: MalformedMessage ``proof-mismatch``;
    5. the issue window (:data:`MAX_TTL_MS`): ExpiredMessage.

    A proof that passes is well-formed evidence, not yet a verdict: see :func:`judge`.
    """
    f = wire.expect_list(wire.unpack(data, max_size=MAX_PROOF_BYTES, what="fraud proof"), _FIELDS, "fraud proof")
    if f[0] != VERSION:
        raise MalformedMessage(f"fraud proof: unknown version {f[0]!r}", code="version")
    receipt_raw = wire.expect_list(f[1], _RECEIPT_FIELDS, "fraud proof receipt")
    inputs = _tensors(f[2], "inputs")
    texts = wire.expect_str_list(f[3], "texts", max_items=MAX_TEXTS, max_len=MAX_TEXT)
    max_tokens = wire.expect_int(f[4], "max tokens", hi=MAX_TOKENS)
    outputs = _tensors(f[5], "outputs")
    token_ids = _tokens(f[6], "token ids")
    reference_outputs = _tensors(f[7], "reference outputs")
    reference_tokens = _tokens(f[8], "reference tokens")
    reporter = wire.expect_bytes(f[9], "reporter", min_len=PEER_ID_BYTES, max_len=PEER_ID_BYTES)
    issued_at_ms = wire.expect_int(f[10], "issued at")
    signature = wire.expect_bytes(f[11], "signature", min_len=64, max_len=64)
    # Canonical decoding guarantees these fields re-encode to the bytes the reporter signed.
    signed.verify(reporter, DOMAIN, f[:11], signature)
    proof = FraudProof(
        receipt=parse_receipt(receipt_raw),
        inputs=inputs,
        texts=texts,
        max_tokens=max_tokens,
        outputs=outputs,
        token_ids=token_ids,
        reference_outputs=reference_outputs,
        reference_tokens=reference_tokens,
        reporter=reporter,
        issued_at_ms=issued_at_ms,
        signature=signature,
    )
    proof.check_receipt()
    signed.check_window(issued_at_ms, issued_at_ms + MAX_TTL_MS, now_ms, max_ttl_ms=MAX_TTL_MS, what="fraud proof")
    return proof


def judge(
    proof: FraudProof,
    reference_outputs: tuple[Tensor, ...],
    reference_tokens: tuple[int, ...],
    *,
    cosine_min: float,
) -> Mismatch | None:
    """How the accused's outputs differ from a reference (the proof's own, or a fresh
    local re-run of its request); None when they agree within ``cosine_min`` (tensors)
    and exactly (tokens: greedy decoding is deterministic)."""
    return compare_outputs(proof.outputs, reference_outputs, cosine_min=cosine_min) or compare_tokens(
        proof.token_ids, reference_tokens
    )


# ---- a receiver's verdicts, and the screen a gossiped proof passes first ------------------


class ProofOutcome(enum.Enum):
    """What a receiver made of one gossiped proof (a metric label)."""

    CONFIRMED = "confirmed"  # our re-run agrees with the reference: the accused lied
    TRUSTED = "trusted"  # we could not re-run; a reporter we trust said so: acted on
    REFUTED = "refuted"  # our re-run agrees with the accused: the reporter lied or erred
    UNVERIFIED = "unverified"  # we could not re-run and do not trust the reporter: noted only
    MALFORMED = "malformed"  # refused by decode_proof or the screen (forged, stale, foreign)
    RATE_LIMITED = "rate-limited"  # over its reporter's rate, or past our queue of proofs to check
    DUPLICATE = "duplicate"  # a proof we already had


@dataclass(frozen=True, kw_only=True)
class FraudRecord:
    """One gossiped proof and what became of it (the node turns these into events)."""

    outcome: ProofOutcome
    reporter: bytes  # for a proof we could not decode: the gossip origin
    accused: bytes = b""  # b"": not known (the proof did not decode)
    job_id: int = 0
    model_id: bytes = b""
    detail: str = ""
    at_ms: int = 0


@dataclass
class _Bucket:
    tokens: float
    at_ms: int


class ProofScreen:
    """What a gossiped proof must pass before anyone spends a re-run on it (pure).

    In order: its origin's rate (``rate_per_min``, bursts of as many; checked first,
    before any decoding work), :func:`decode_proof`, that the gossip origin is the
    reporter (a proof travels under its reporter's own gossip signature, so the
    reporter answers for it), that it is new, and that it accuses: its own reference
    must differ from the outputs, else it claims nothing. Memory is bounded
    (``max_tracked`` origins, ``max_seen`` proofs remembered).
    """

    def __init__(
        self, *, rate_per_min: int, cosine_min: float, max_tracked: int = 10_000, max_seen: int = 4096
    ) -> None:
        if rate_per_min < 1:
            raise ValueError(f"a rate of proofs is at least 1 a minute, not {rate_per_min}")
        self.rate_per_min = rate_per_min
        self.cosine_min = cosine_min
        self.max_tracked = max_tracked
        self.max_seen = max_seen
        self._buckets: dict[bytes, _Bucket] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def screen(self, data: bytes, *, origin: bytes, now_ms: int) -> FraudProof | None:
        """The proof in ``data``, ready to judge; None for one already seen. Raises
        RateLimited, ForeignKey, MalformedMessage (``no-mismatch``: it accuses nothing)
        or whatever :func:`decode_proof` raises."""
        self._spend(origin, now_ms)
        proof = decode_proof(data, now_ms=now_ms)
        if proof.reporter != origin:
            raise ForeignKey("fraud proof: gossiped by another peer than its reporter")
        key = proof.signature  # deterministic Ed25519: one per reporter and content
        if key in self._seen:
            self._seen.move_to_end(key)
            return None
        self._seen[key] = None
        if len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        if judge(proof, proof.reference_outputs, proof.reference_tokens, cosine_min=self.cosine_min) is None:
            raise MalformedMessage("fraud proof: its own reference agrees with the outputs", code="no-mismatch")
        return proof

    def _spend(self, origin: bytes, now_ms: int) -> None:
        burst = float(self.rate_per_min)
        held = self._buckets.get(origin)
        if held is None:
            if len(self._buckets) >= self.max_tracked:  # a full bucket is as good as none
                self._buckets = {p: b for p, b in self._buckets.items() if self._tokens(b, now_ms) < burst}
            held = self._buckets[origin] = _Bucket(burst, now_ms)
        tokens = self._tokens(held, now_ms)
        if tokens < 1.0:
            raise RateLimited(f"fraud proofs: over {self.rate_per_min} a minute from this reporter")
        held.tokens, held.at_ms = tokens - 1.0, now_ms

    def _tokens(self, held: _Bucket, now_ms: int) -> float:
        refill = max(0, now_ms - held.at_ms) * self.rate_per_min / 60_000
        return min(float(self.rate_per_min), held.tokens + refill)
