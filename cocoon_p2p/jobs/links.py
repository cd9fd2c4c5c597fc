"""The client's job links, and one attempt of a job over one: :class:`JobLinks`.

One :class:`~.client_link.ClientLink` per worker, opened on the worker's first job and
reused by every job after it. A link that runs over a relay is superseded once a direct
connection to its worker exists (hole punching succeeded): the next job opens a new
link, which takes the direct way, and the relayed one is retired, closed once the jobs
still on it have ended. A broken link is replaced the same way on the next job.

:meth:`JobLinks.run_on` is one attempt on one worker: the request sent on its link, the
worker's frames checked as they come (the agreed price, streamed tokens within what was
asked, usage the request can hold, a signed receipt), and the job cancelled on the worker
when left early. Which worker, retries, payment and spot checks are
:class:`~.client.JobClient`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cocoon_p2p.core.errors import BadSignature, LocalProtocolError, MalformedMessage
from cocoon_p2p.core.pricing import FREE, Price
from cocoon_p2p.execution.chat_options import ChatOptions
from cocoon_p2p.execution.sampling import Sampling
from cocoon_p2p.execution.tensors import Tensor
from cocoon_p2p.overlay.directory import WorkerOffer
from cocoon_p2p.transport.host import close_quietly, unblock_peer
from cocoon_p2p.transport.relay import has_direct, stream_is_relayed

from . import frames as jf
from .attempts import JobFailed
from .client_link import ClientLink
from .ports import PeerFeedback
from .receipts import Receipt, inputs_digest, outputs_digest
from .stream import Inbox

__all__ = ["CANCEL_SEND_S", "RETIRE_WAIT_S", "JobLinks"]

CANCEL_SEND_S = 0.5  # how long a job that ends early may spend telling its worker to stop
RETIRE_WAIT_S = 600.0  # a link superseded by a direct connection closes once its jobs end, or after this
ADDRS_TTL_S = 3600  # how long an offer's addresses stay in the peerstore


class JobLinks:
    """The client's links to workers over ``host``, by worker peer id (:attr:`links`),
    and the jobs sent on them (numbered here: a job id is unique among the client's).

    A link's reading task (when its stream needs one) and the retiring of superseded
    links run in ``nursery``; ``feedback`` hears of workers that broke the protocol.
    """

    def __init__(self, host: Any, nursery: trio.Nursery, feedback: PeerFeedback) -> None:
        self.host = host
        self.nursery = nursery
        self.feedback = feedback
        self.links: dict[bytes, ClientLink] = {}
        self._opening: dict[bytes, trio.Lock] = {}
        self.local_peer: bytes = host.get_id().to_bytes()  # receipts name the client
        self._next_id = 1

    def ready(self, peer_id: bytes) -> ClientLink | None:
        """The link to ``peer_id`` if a job may go on it now, else None (:meth:`open` one)."""
        link = self.links.get(peer_id)
        return link if link is not None and self.usable(link) else None

    def usable(self, link: ClientLink) -> bool:
        """Not broken, and not on a relay while the worker is now reachable directly
        (hole punching succeeded): jobs go the direct way then."""
        return link.broken is None and not (link.relayed and has_direct(self.host, link.peer_id))

    def know_addrs(self, offer: WorkerOffer) -> None:
        """Where the offer says its worker is, for the next dial."""
        addrs = [Multiaddr(a) for a in offer.addrs]
        if addrs:
            self.host.get_peerstore().add_addrs(ID(offer.peer_id), addrs, ADDRS_TTL_S)
            unblock_peer(self.host, offer.peer_id)

    async def open(self, offer: WorkerOffer) -> ClientLink:
        """A job stream to this worker (opened once at a time: concurrent jobs wait for it).
        A link still open but superseded by a direct connection is retired in the background.
        Raises what opening the stream raises; cancelled while opening, no link is added."""
        lock = self._opening.setdefault(offer.peer_id, trio.Lock())
        async with lock:
            link = self.links.get(offer.peer_id)
            if link is not None and self.usable(link):
                return link
            if link is not None and link.broken is None:  # superseded by a direct connection
                self.nursery.start_soon(self._retire, link)
            pid = ID(offer.peer_id)
            self.know_addrs(offer)
            stream = await self.host.new_stream(pid, [TProtocol(jf.JOB_PROTOCOL)])
            link = ClientLink(offer.peer_id, stream, self.feedback)
            link.relayed = stream_is_relayed(self.host, offer.peer_id, stream)
            self.links[offer.peer_id] = link
            link.start(self.nursery)
            return link

    async def run_on(
        self,
        offer: WorkerOffer,
        *,
        model_id: bytes,
        inputs: tuple[Tensor, ...] = (),
        texts: tuple[str, ...] = (),
        max_tokens: int = 0,
        max_price: int,
        deadline_ms: int,
        on_chunk: Callable[[jf.JobChunk], None] | None = None,
        verify_tokens: tuple[int, ...] = (),
        sampling: Sampling | None = None,
        chat: ChatOptions | None = None,
    ) -> tuple[jf.JobResult, Price, Receipt | None]:
        """One attempt on one worker: (result, agreed price, its verified receipt
        or None when the worker sent none). Raises JobFailed; a receipt whose signature
        fails is the worker's fault (``worker-lost``, scored down).

        Streamed chunks go to ``on_chunk`` as they arrive. Cancelled, or failed
        before its last frame, the job is cancelled on the worker (best effort).
        """
        try:
            link = self.ready(offer.peer_id)
            if link is None:
                link = await self.open(offer)
        except Exception as exc:
            raise JobFailed(jf.WORKER_LOST, f"cannot open a job stream: {exc!r}", worker=offer.peer_id) from exc
        job_id = self._next_id
        self._next_id += 1
        inbox: Inbox[jf.Frame | JobFailed] = Inbox()  # not Inbox[...](): that builds the alias per job
        link.waiters[job_id] = inbox
        req = jf.JobRequest(
            job_id=job_id,
            model_id=model_id,
            inputs=inputs,
            texts=texts,
            max_tokens=max_tokens,
            deadline_ms=deadline_ms,
            max_price_nanoton=max_price,
            verify_tokens=verify_tokens,
            sampling=sampling,
            chat=chat,
        )
        price = FREE
        tokens = 0
        streamed: list[int] = []
        streamed_text: list[str] = []  # an engine streams text without token ids: its receipt binds the text
        done = False
        try:
            try:
                await link.send(req)
            except LocalProtocolError as exc:  # e.g. too large to send: this job only, no retry
                done = True
                raise JobFailed(exc.code, str(exc), worker=offer.peer_id) from exc
            except Exception as exc:
                lost = JobFailed(jf.WORKER_LOST, repr(exc), worker=offer.peer_id)
                link.fail(lost)  # the stream is broken for every job on it
                raise lost from exc
            while True:
                item = await inbox.get()
                if isinstance(item, JobFailed):
                    raise item
                if isinstance(item, jf.JobAccepted):
                    price = item.price
                    if why := jf.price_refusal(price.highest, max_price):  # the protocol lets us check, so we do
                        raise JobFailed(jf.PRICE, why, worker=offer.peer_id)
                elif isinstance(item, jf.JobChunk):
                    tokens += len(item.token_ids) or 1
                    streamed.extend(item.token_ids)
                    streamed_text.append(item.text)
                    if tokens > max_tokens:  # what a worker streams is bounded by what we asked for
                        err = MalformedMessage(f"job {job_id}: more chunks than the {max_tokens} tokens asked for")
                        self.feedback.misbehaved(offer.peer_id, err)
                        raise JobFailed(jf.WORKER_LOST, str(err), worker=offer.peer_id)
                    if on_chunk is not None:
                        on_chunk(item)
                elif isinstance(item, jf.JobError):
                    done = True
                    raise JobFailed(item.code, item.message, worker=offer.peer_id)
                elif isinstance(item, jf.JobResult):
                    done = True
                    if why := jf.usage_refusal(req, item, streamed_tokens=tokens):
                        # More units than we sent: a bill we can check, and a broken rule.
                        self.feedback.misbehaved(offer.peer_id, MalformedMessage(why))
                        raise JobFailed(jf.WORKER_LOST, why, worker=offer.peer_id)
                    if why := jf.charge_refusal(price, item):
                        raise JobFailed(jf.PRICE, why, worker=offer.peer_id)
                    return item, price, self._receipt(offer.peer_id, req, item, tuple(streamed), "".join(streamed_text))
        finally:
            link.waiters.pop(job_id, None)
            if not done and link.broken is None and job_id in link.conn.jobs:
                with trio.move_on_after(CANCEL_SEND_S) as scope:  # tell the worker to stop
                    scope.shield = True
                    try:
                        await link.send(jf.JobCancel(job_id=job_id))
                    except Exception:
                        pass

    def _receipt(
        self, worker: bytes, req: jf.JobRequest, result: jf.JobResult, streamed: tuple[int, ...], text: str = ""
    ) -> Receipt | None:
        """The receipt the worker signed for ``result``, rebuilt from what we hold and checked."""
        if not result.receipt:
            return None
        receipt = Receipt(
            worker=worker,
            client=self.local_peer,
            job_id=req.job_id,
            model_id=req.model_id,
            inputs_digest=inputs_digest(
                req.model_id, req.inputs, req.texts, req.max_tokens, req.verify_tokens, req.sampling, req.chat
            ),
            outputs_digest=outputs_digest(result.outputs, streamed, text, result.tool_calls),
            usage_units=result.usage_units,
            cost_nanoton=result.cost_nanoton,
            signature=result.receipt,
        )
        try:
            receipt.verify()
        except BadSignature as exc:
            self.feedback.misbehaved(worker, exc)
            raise JobFailed(jf.WORKER_LOST, f"job {req.job_id}: its receipt does not verify", worker=worker) from exc
        return receipt

    async def _retire(self, link: ClientLink) -> None:
        """Close a superseded link once the jobs still on it are done."""
        with trio.move_on_after(RETIRE_WAIT_S):
            while link.waiters and link.broken is None:
                await trio.sleep(0.1)
        await close_quietly(link.stream)
