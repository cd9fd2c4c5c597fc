"""Signed receipts: what a worker attests it returned for a job (pure).

Every result a worker sends carries an Ed25519 signature, by its PeerId's key, over
the receipt of the job (domain ``cocoon/receipt/1``)::

    [1, worker, client, job_id, model_id, inputs_digest, outputs_digest, usage_units, cost_nanoton]

``inputs_digest`` is SHA-256 over the canonical encoding of what the client asked
(``[model_id, inputs, texts, max_tokens(, verify_tokens)]``, tensors in their wire form);
``outputs_digest`` over what the worker returned (``[outputs, token_ids]``: the
result's tensors and every token id it streamed; ``[outputs, [], text]`` for a
generation streamed as text alone, as an engine's is). Only the signature travels: the
client holds every other field already, rebuilds the receipt and checks it. A
receipt is the worker's own word on a result, so a wrong result with its receipt
is evidence against that worker that nobody else could have made (a fraud proof,
:mod:`.fraudproof`), and a correct one cannot be turned against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import signed, wire
from cocoon_p2p.core.errors import MalformedMessage
from cocoon_p2p.core.identity import PEER_ID_BYTES, Identity
from cocoon_p2p.execution.chat_options import ChatOptions, ToolCall
from cocoon_p2p.execution.sampling import Sampling
from cocoon_p2p.execution.tensors import Tensor

VERSION = 1
DOMAIN = b"cocoon/receipt/1"
SIGNATURE_BYTES = 64
_FIELDS = 10
MAX_RECEIPT_BYTES = 512


def inputs_digest(
    model_id: bytes,
    inputs: Sequence[Tensor],
    texts: Sequence[str],
    max_tokens: int,
    verify: Sequence[int] = (),
    sampling: Sampling | None = None,
    chat: ChatOptions | None = None,
) -> bytes:
    """SHA-256 of what a client asked, in canonical form (a verify job's tokens, a
    generation's sampling parameters and a chat's options included)."""
    fields: list[object] = [model_id, [t.to_wire() for t in inputs], list(texts), max_tokens]
    if chat is not None:
        fields += [list(verify), sampling.to_wire() if sampling is not None else None, chat.to_wire()]
    elif sampling is not None:
        fields += [list(verify), sampling.to_wire()]
    elif verify:
        fields.append(list(verify))
    return hashlib.sha256(wire.pack(fields)).digest()


def outputs_digest(
    outputs: Sequence[Tensor], token_ids: Sequence[int], text: str = "", tool_calls: Sequence[ToolCall] = ()
) -> bytes:
    """SHA-256 of what a worker returned: its result tensors and every token it streamed,
    or, when it streamed no token ids (an engine streams text), the text it streamed, and
    the tool calls an engine's model made. Without text or calls the layout is unchanged:
    earlier receipts and fraud proofs stay valid."""
    fields: list[object] = [[t.to_wire() for t in outputs], list(token_ids)]
    shown = text if not token_ids else ""
    if tool_calls:
        fields += [shown, [c.to_wire() for c in tool_calls]]
    elif shown:
        fields.append(shown)
    return hashlib.sha256(wire.pack(fields)).digest()


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """A worker's signed statement of one job's result."""

    worker: bytes
    client: bytes
    job_id: int
    model_id: bytes
    inputs_digest: bytes
    outputs_digest: bytes
    usage_units: int
    cost_nanoton: int
    signature: bytes = b""

    def fields(self) -> list[Any]:
        return [
            VERSION,
            self.worker,
            self.client,
            self.job_id,
            self.model_id,
            self.inputs_digest,
            self.outputs_digest,
            self.usage_units,
            self.cost_nanoton,
        ]

    def signed_by(self, ident: Identity) -> Receipt:
        """This receipt with ``ident``'s signature (``ident`` must be the worker)."""
        if ident.peer_id != self.worker:
            raise ValueError("a receipt is signed by its worker")
        return Receipt(**{**self.__dict__, "signature": signed.sign(ident, DOMAIN, self.fields())})

    def verify(self) -> None:
        """BadSignature unless the worker signed exactly these fields."""
        signed.verify(self.worker, DOMAIN, self.fields(), self.signature)

    def encode(self) -> bytes:
        return wire.pack([*self.fields(), self.signature])


def decode_receipt(data: bytes) -> Receipt:
    """Parse (shape and sizes) and verify a receipt. MalformedMessage / BadSignature."""
    obj = wire.expect_list(wire.unpack(data, max_size=MAX_RECEIPT_BYTES, what="receipt"), _FIELDS, "receipt")
    return parse_receipt(obj)


def parse_receipt(obj: list[Any]) -> Receipt:
    """A receipt from its decoded fields (as :meth:`Receipt.encode` lays them out), verified."""
    f = wire.expect_list(obj, _FIELDS, "receipt")
    if f[0] != VERSION:
        raise MalformedMessage(f"receipt: unknown version {f[0]!r}", code="version")
    receipt = Receipt(
        worker=wire.expect_bytes(f[1], "worker", min_len=PEER_ID_BYTES, max_len=PEER_ID_BYTES),
        client=wire.expect_bytes(f[2], "client", min_len=PEER_ID_BYTES, max_len=PEER_ID_BYTES),
        job_id=wire.expect_int(f[3], "job id"),
        model_id=wire.expect_bytes(f[4], "model id", min_len=32, max_len=32),
        inputs_digest=wire.expect_bytes(f[5], "inputs digest", min_len=32, max_len=32),
        outputs_digest=wire.expect_bytes(f[6], "outputs digest", min_len=32, max_len=32),
        usage_units=wire.expect_int(f[7], "usage"),
        cost_nanoton=wire.expect_int(f[8], "cost"),
        signature=wire.expect_bytes(f[9], "signature", min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES),
    )
    receipt.verify()
    return receipt
