"""Issue 18: fraud proofs. The codec and each of its refusals, the verdict (judge), the
screen a gossiped proof passes; then FraudWatch over real gossip between real nodes.

The real-node tests re-run jobs with a real local Executor of the tiny model (the
"local re-run" a node that serves the model does); the cheating worker is a real node
whose backend replaces its outputs (cocoon_p2p.testing.cheating), so its receipts are
real signatures over wrong outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio

from cocoon_p2p.core import signed, wire
from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import (
    BadSignature,
    ExpiredMessage,
    ForeignKey,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    RateLimited,
    RemoteProtocolError,
)
from cocoon_p2p.core.metrics import parse, render
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.executor import Executor, RunRequest
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import Tensor, from_numpy, to_numpy
from cocoon_p2p.jobs import receipts
from cocoon_p2p.jobs.fraudproof import (
    DOMAIN,
    MAX_PROOF_BYTES,
    MAX_TTL_MS,
    FraudProof,
    ProofScreen,
    decode_proof,
    judge,
)
from cocoon_p2p.jobs.fraudwatch import FRAUD_TOPIC, FraudWatch, Rerun
from cocoon_p2p.jobs.receipts import Receipt
from cocoon_p2p.jobs.spotcheck import DEFAULT_COSINE_MIN
from cocoon_p2p.node import Node
from cocoon_p2p.testing.cheating import CheatingBackend

from .helpers import MODEL, NOW, ident, x_rows
from .netutil import fast_config, open_nodes, wait_for

WORKER, CLIENT, REPORTER, OTHER = ident(1), ident(2), ident(3), ident(4)
COSINE = DEFAULT_COSINE_MIN
X = from_numpy("x", x_rows(2))
RIGHT = from_numpy("y", np.array([[1.0, 2.0, 3.0], [0.5, 0.0, 4.0]], dtype=np.float32))
WRONG = from_numpy("y", np.array([[3.0, 2.0, 1.0], [4.0, 0.0, 0.5]], dtype=np.float32))


def _receipt(
    outputs: tuple[Tensor, ...],
    tokens: tuple[int, ...] = (),
    *,
    signer: Any = WORKER,
    inputs: tuple[Tensor, ...] = (X,),
) -> Receipt:
    r = Receipt(
        worker=WORKER.peer_id,
        client=CLIENT.peer_id,
        job_id=7,
        model_id=MODEL,
        inputs_digest=receipts.inputs_digest(MODEL, inputs, (), 0),
        outputs_digest=receipts.outputs_digest(outputs, tokens),
        usage_units=2,
        cost_nanoton=20,
    )
    return dataclasses.replace(r, signature=signed.sign(signer, receipts.DOMAIN, r.fields()))


def _proof(
    *, outputs: tuple[Tensor, ...] = (WRONG,), reference: tuple[Tensor, ...] = (RIGHT,), **over: Any
) -> FraudProof:
    fields: dict[str, Any] = dict(
        receipt=_receipt(outputs),
        inputs=(X,),
        texts=(),
        max_tokens=0,
        outputs=outputs,
        token_ids=(),
        reference_outputs=reference,
        reference_tokens=(),
        now_ms=NOW,
    )
    fields.update(over)
    return FraudProof.create(REPORTER, **fields)


def _resigned(proof: FraudProof, **changes: Any) -> bytes:
    """``proof`` changed after the fact and signed again by its reporter (a forger's move)."""
    return dataclasses.replace(proof, **changes).signed_by(REPORTER).encode()


# ---- the codec ---------------------------------------------------------------------------------


def test_a_proof_round_trips_and_names_the_accused() -> None:
    proof = _proof()
    assert decode_proof(proof.encode(), now_ms=NOW + 1000) == proof
    assert proof.accused == WORKER.peer_id and proof.reporter == REPORTER.peer_id
    gen = _proof(
        receipt=_receipt((), (5, 6, 7)), outputs=(), token_ids=(5, 6, 7), reference=(), reference_tokens=(5, 9)
    )
    assert decode_proof(gen.encode(), now_ms=NOW) == gen


def _field(index: int, value: Any) -> Callable[[FraudProof], bytes]:
    def mutate(proof: FraudProof) -> bytes:
        f = [*proof.fields(), proof.signature]
        f[index] = value
        return wire.pack(f)

    return mutate


REFUSALS: list[tuple[str, Callable[[FraudProof], bytes], int, type[RemoteProtocolError], str]] = [
    ("oversize", lambda p: p.encode() + b"\x00" * MAX_PROOF_BYTES, 0, MessageTooLarge, "too-large"),
    ("trailing bytes", lambda p: p.encode() + b"\x00", 0, MalformedMessage, "malformed"),
    ("not msgpack", lambda p: b"\xc1" * 40, 0, MalformedMessage, "malformed"),
    ("a field short", lambda p: wire.pack(p.fields()), 0, MalformedMessage, "malformed"),
    ("unknown version", _field(0, 2), 0, MalformedMessage, "version"),
    ("a token id too big", _field(6, [2**40]), 0, MalformedMessage, "malformed"),
    (
        "a tensor of the wrong size",
        _field(5, [["y", "float32", [2, 3], b"\x00" * 4]]),
        0,
        MalformedMessage,
        "bad-input",
    ),
    ("reporter is no Ed25519 peer id", _field(9, b"\x01" * 38), 0, MalformedMessage, "bad-peer-id"),
    ("bad reporter signature", _field(11, b"\x00" * 64), 0, BadSignature, "bad-signature"),
    (
        "signed by another than the reporter",
        lambda p: wire.pack([*p.fields(), signed.sign(OTHER, DOMAIN, p.fields())]),
        0,
        BadSignature,
        "bad-signature",
    ),
    (
        "receipt signed by another than the worker",
        lambda p: _resigned(p, receipt=_receipt((WRONG,), signer=OTHER)),
        0,
        BadSignature,
        "bad-signature",
    ),
    (
        "outputs changed after the worker signed",
        lambda p: _resigned(p, outputs=(RIGHT,)),
        0,
        MalformedMessage,
        "proof-mismatch",
    ),
    (
        "tokens added after the worker signed",
        lambda p: _resigned(p, token_ids=(1,)),
        0,
        MalformedMessage,
        "proof-mismatch",
    ),
    ("another request than the receipt's", lambda p: _resigned(p, max_tokens=5), 0, MalformedMessage, "proof-mismatch"),
    ("expired", lambda p: p.encode(), MAX_TTL_MS, ExpiredMessage, "expired"),
    ("issued in the future", lambda p: p.encode(), -signed.MAX_CLOCK_SKEW_MS - 1, ExpiredMessage, "expired"),
]


@pytest.mark.parametrize(("case", "mutate", "later_ms", "error", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_refusal_names_its_rule(
    case: str, mutate: Callable[[FraudProof], bytes], later_ms: int, error: type[RemoteProtocolError], code: str
) -> None:
    data = mutate(_proof())
    with pytest.raises(error) as caught:
        decode_proof(data, now_ms=NOW + later_ms)
    assert caught.value.code == code


def test_our_own_proof_is_refused_before_it_goes_out_when_it_is_wrong() -> None:
    with pytest.raises(LocalProtocolError) as caught:
        _proof(outputs=(RIGHT,), receipt=_receipt((WRONG,)))  # not what the worker signed
    assert caught.value.code == "proof-mismatch"
    with pytest.raises(LocalProtocolError):
        _proof().signed_by(OTHER)
    huge = from_numpy("y", np.zeros((MAX_PROOF_BYTES // 4 + 1,), dtype=np.float32))
    with pytest.raises(LocalProtocolError) as caught:
        _proof(outputs=(huge,), receipt=_receipt((huge,)), reference=(RIGHT,)).encode()
    assert caught.value.code == "too-large"


# ---- the verdict -------------------------------------------------------------------------------

EMB = np.random.default_rng(1).standard_normal((4, 384)).astype(np.float32)
JUDGMENTS: list[tuple[str, tuple[Tensor, ...], tuple[int, ...], tuple[Tensor, ...], tuple[int, ...], str | None]] = [
    ("same embeddings", (from_numpy("e", EMB),), (), (from_numpy("e", EMB),), (), None),
    ("within the cosine tolerance", (from_numpy("e", EMB),), (), (from_numpy("e", EMB * 1.01 + 1e-4),), (), None),
    ("one row replaced", (from_numpy("e", EMB),), (), (from_numpy("e", np.vstack([EMB[:3], EMB[:1]])),), (), "values"),
    ("rows in another order", (from_numpy("e", EMB),), (), (from_numpy("e", EMB[::-1].copy()),), (), "values"),
    ("another shape", (from_numpy("e", EMB),), (), (from_numpy("e", EMB[:2].copy()),), (), "shape"),
    ("another output", (from_numpy("e", EMB),), (), (from_numpy("f", EMB),), (), "outputs"),
    ("same tokens", (), (1, 2, 3), (), (1, 2, 3), None),
    ("a token differs", (), (1, 2, 3), (), (1, 4, 3), "tokens"),
    ("stopped early", (), (1, 2), (), (1, 2, 3), "tokens"),
]


@pytest.mark.parametrize(
    ("case", "outputs", "tokens", "ref", "ref_tokens", "reason"), JUDGMENTS, ids=[j[0] for j in JUDGMENTS]
)
def test_judge(
    case: str,
    outputs: tuple[Tensor, ...],
    tokens: tuple[int, ...],
    ref: tuple[Tensor, ...],
    ref_tokens: tuple[int, ...],
    reason: str | None,
) -> None:
    proof = _proof(
        outputs=outputs, receipt=_receipt(outputs, tokens), token_ids=tokens, reference=ref, reference_tokens=ref_tokens
    )
    mismatch = judge(proof, ref, ref_tokens, cosine_min=COSINE)
    assert (mismatch.reason if mismatch else None) == reason


def _local_run(spec: ModelSpec) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
    ex = Executor(spec, OnnxRuntimeBackend(spec.path, threads=1))
    return lambda inputs: ex.run([RunRequest(inputs=inputs)])[0].outputs


def test_a_proof_forged_against_an_honest_worker_is_refuted_by_any_re_run(tiny_model: ModelSpec) -> None:
    """The reporter holds the honest worker's real receipt and real outputs and makes the
    reference up: the proof is well-formed, and it does accuse, but a fresh run (here
    with the rows in a batch of another size) agrees with the worker."""
    run = _local_run(tiny_model)
    x = from_numpy("x", x_rows(3, seed=5))
    honest = run((x,))
    receipt = Receipt(
        worker=WORKER.peer_id,
        client=REPORTER.peer_id,
        job_id=1,
        model_id=tiny_model.model_id,
        inputs_digest=receipts.inputs_digest(tiny_model.model_id, (x,), (), 0),
        outputs_digest=receipts.outputs_digest(honest, ()),
        usage_units=3,
        cost_nanoton=3,
    ).signed_by(WORKER)
    y = to_numpy(honest[0])
    fake = (from_numpy("y", np.roll(y, 1, axis=1) + 1.0),)
    proof = decode_proof(
        FraudProof.create(
            REPORTER,
            receipt=receipt,
            inputs=(x,),
            texts=(),
            max_tokens=0,
            outputs=honest,
            token_ids=(),
            reference_outputs=fake,
            reference_tokens=(),
            now_ms=NOW,
        ).encode(),
        now_ms=NOW,
    )
    assert judge(proof, proof.reference_outputs, (), cosine_min=COSINE) is not None  # what it claims
    bigger = to_numpy(run((from_numpy("x", np.vstack([x_rows(3, seed=5), x_rows(4, seed=6)])),))[0])
    assert judge(proof, (from_numpy("y", bigger[:3].copy()),), (), cosine_min=COSINE) is None  # what is true
    # and the worker's receipt cannot be bent to other outputs
    with pytest.raises(MalformedMessage) as caught:
        decode_proof(_resigned(proof, outputs=fake, reference_outputs=honest), now_ms=NOW)
    assert caught.value.code == "proof-mismatch"


# ---- the screen a gossiped proof passes --------------------------------------------------------


def test_the_screen_rate_limits_per_reporter_first_and_drops_duplicates() -> None:
    screen = ProofScreen(rate_per_min=3, cosine_min=COSINE)
    proofs = [_proof(now_ms=NOW + i) for i in range(5)]
    assert screen.screen(proofs[0].encode(), origin=REPORTER.peer_id, now_ms=NOW) == proofs[0]
    assert screen.screen(proofs[0].encode(), origin=REPORTER.peer_id, now_ms=NOW) is None  # seen
    assert screen.screen(proofs[1].encode(), origin=REPORTER.peer_id, now_ms=NOW) == proofs[1]
    with pytest.raises(RateLimited):  # even garbage counts: the rate is checked before any decoding
        screen.screen(b"garbage", origin=REPORTER.peer_id, now_ms=NOW)
    with pytest.raises(MalformedMessage):  # another origin has its own budget
        screen.screen(b"garbage", origin=OTHER.peer_id, now_ms=NOW)
    assert screen.screen(proofs[2].encode(), origin=REPORTER.peer_id, now_ms=NOW + 20_000) == proofs[2]  # refilled


SCREENED: list[tuple[str, Callable[[], FraudProof], bytes, type[RemoteProtocolError], str]] = [
    ("gossiped by another than its reporter", _proof, OTHER.peer_id, ForeignKey, "foreign-key"),
    (
        "its own reference agrees with the outputs",
        lambda: _proof(reference=(from_numpy("y", to_numpy(WRONG) * 2),)),
        REPORTER.peer_id,
        MalformedMessage,
        "no-mismatch",
    ),
]


@pytest.mark.parametrize(("case", "make", "origin", "error", "code"), SCREENED, ids=[s[0] for s in SCREENED])
def test_the_screen_refuses(
    case: str, make: Callable[[], FraudProof], origin: bytes, error: type[RemoteProtocolError], code: str
) -> None:
    with pytest.raises(error) as caught:
        ProofScreen(rate_per_min=10, cosine_min=COSINE).screen(make().encode(), origin=origin, now_ms=NOW)
    assert caught.value.code == code


# ---- FraudWatch over real gossip ---------------------------------------------------------------


def local_rerun(spec: ModelSpec) -> Rerun:
    """A node's re-run: the tiny model on a real local Executor (in a thread, as a worker runs jobs)."""
    run = _local_run(spec)

    async def rerun(proof: FraudProof) -> tuple[tuple[Tensor, ...], tuple[int, ...]] | None:
        if proof.receipt.model_id != spec.model_id:
            return None  # a model we do not serve
        return await trio.to_thread.run_sync(run, proof.inputs), ()

    return rerun


@dataclass
class Net:
    hub: Node  # everyone's bootstrap peer
    other: Node
    reporter: Node
    worker: Node
    watches: tuple[FraudWatch, FraudWatch, FraudWatch]  # hub's, other's, reporter's
    run: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]  # the reporter's own run of a job

    async def job_proof(self, seed: int = 0, **over: Any) -> FraudProof:
        """A job run by the worker for the reporter, and the reporter's proof against it,
        the reference being the reporter's own run unless ``over`` says otherwise."""
        spec_id = self.worker.advertiser.capabilities[0].model_id
        x = from_numpy("x", x_rows(2, seed=seed))
        result = await self.reporter.infer(spec_id, inputs=(x,), max_price_nanoton=10)
        assert result.receipt is not None and result.worker == self.worker.peer_id
        fields: dict[str, Any] = dict(
            receipt=result.receipt,
            inputs=(x,),
            texts=(),
            max_tokens=0,
            outputs=result.outputs,
            token_ids=result.token_ids,
            reference_tokens=(),
            now_ms=now_ms(),
        )
        if "reference_outputs" not in over:
            fields["reference_outputs"] = await trio.to_thread.run_sync(self.run, (x,))
        fields.update(over)
        return FraudProof.create(self.reporter.identity, **fields)


def _outcomes(watch: FraudWatch) -> dict[str, int]:
    return {o.value: n for o, n in watch.stats.received.items() if n}


@asynccontextmanager
async def fraud_network(
    spec: ModelSpec, *, cheat: bool, hub: dict[str, Any], other: dict[str, Any]
) -> AsyncIterator[Net]:
    """Three nodes watching the fraud topic (the hub is the others' bootstrap) and a worker
    serving the tiny model (``cheat``: every output replaced), known to the reporter."""
    # Each node's own watch is off: the test runs watches with the options it is about.
    async with open_nodes(3, watch_fraud=False) as (h, o, r), trio.open_nursery() as nursery:

        async def run_worker(task_status: trio.TaskStatus[Node]) -> None:
            async with Node(fast_config(bootstrap=[h.addrs[0]])) as w:
                inner = OnnxRuntimeBackend(spec.path, threads=1)
                w.serve_model(spec, CheatingBackend(inner, rate=1.0) if cheat else inner, price_nanoton=1)
                task_status.started(w)
                await trio.sleep_forever()

        worker = await nursery.start(run_worker)
        watches = tuple(
            FraudWatch(n.identity, n.gossip, n.guard, n._events, cosine_min=COSINE, **opts)
            for n, opts in ((h, hub), (o, other), (r, {}))
        )
        for watch in watches:
            await nursery.start(watch.run)

        def ready() -> bool:
            meshes = [n._gossipsub.mesh.get(FRAUD_TOPIC, set()) for n in (h, o, r)]
            return {o.peer_id, r.peer_id} <= {p.to_bytes() for p in meshes[0]} and all(meshes[1:])

        await wait_for(ready)
        await wait_for(lambda: bool(r.directory.workers_for(spec.model_id, now_ms=now_ms())))
        yield Net(h, o, r, worker, watches, _local_run(spec))  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_cheater_reported_once_is_banned_by_every_node_that_re_runs(tiny_model: ModelSpec) -> None:
    rerun = {"rerun": local_rerun(tiny_model)}
    async with fraud_network(tiny_model, cheat=True, hub=rerun, other=rerun) as net:
        proof = await net.job_proof()
        await net.watches[2].report(proof)
        await wait_for(lambda: all(n.guard.is_banned(net.worker.peer_id) for n in (net.hub, net.other)))
        for node, watch in zip((net.hub, net.other), net.watches, strict=False):
            assert _outcomes(watch) == {"confirmed": 1}
            (record,) = watch.received
            assert (record.accused, record.reporter, record.job_id) == (
                net.worker.peer_id,
                net.reporter.peer_id,
                proof.receipt.job_id,
            )
            assert node.guard.scores.score(net.reporter.peer_id, now_ms()) == 0  # the reporter told the truth
        at_hub, at_reporter = (parse(render(net.watches[i].metrics())) for i in (0, 2))
        assert at_hub['cocoon_fraud_proofs_received_total{outcome="confirmed"}'] == 1
        assert at_hub['cocoon_fraud_proofs_received_total{outcome="refuted"}'] == 0
        assert (at_hub["cocoon_fraud_proofs_sent_total"], at_reporter["cocoon_fraud_proofs_sent_total"]) == (0, 1)


@pytest.mark.slow
async def test_forged_proofs_cost_the_reporter_and_never_the_honest_worker(tiny_model: ModelSpec) -> None:
    """The hub re-runs; the other node cannot and does not trust the reporter."""
    async with fraud_network(tiny_model, cheat=False, hub={"rerun": local_rerun(tiny_model)}, other={}) as net:
        hub, other, reporter = net.watches
        # 1. the honest worker's real receipt and outputs, a made-up reference
        fake = (from_numpy("y", np.full((2, 3), 7.0, dtype=np.float32)),)
        await reporter.report(await net.job_proof(reference_outputs=fake))
        await wait_for(lambda: _outcomes(hub) == {"refuted": 1} and _outcomes(other) == {"unverified": 1})
        score = net.hub.guard.scores.score(net.reporter.peer_id, now_ms())
        assert score < 0
        # 2. outputs swapped after the worker signed: refused by the hub, which goes no further
        signed_proof = await net.job_proof(seed=1, reference_outputs=fake)
        await net.reporter.gossip.publish(FRAUD_TOPIC, _resigned_by(net.reporter, signed_proof, outputs=fake))
        await wait_for(lambda: _outcomes(hub).get("malformed") == 1)
        assert hub.received[-1].detail.startswith("proof-mismatch")
        assert net.hub.guard.is_banned(net.reporter.peer_id)  # a forged proof ("proof-mismatch") bans its reporter
        for node in (net.hub, net.other):
            assert node.guard.scores.score(net.worker.peer_id, now_ms()) == 0
            assert not node.guard.is_banned(net.worker.peer_id)


def _resigned_by(node: Node, proof: FraudProof, **changes: Any) -> bytes:
    return dataclasses.replace(proof, **changes).signed_by(node.identity).encode()


@pytest.mark.slow
async def test_a_flood_of_proofs_is_cut_at_the_reporter_s_rate_and_trust_stands_in_for_a_re_run(
    tiny_model: ModelSpec,
) -> None:
    """The hub re-runs and takes 2 proofs a minute from a reporter; the other node cannot
    re-run, and trusts the reporter."""
    async with fraud_network(
        tiny_model,
        cheat=True,
        hub={"rerun": local_rerun(tiny_model), "rate_per_min": 2},
        other={"rate_per_min": 2},
    ) as net:
        net.watches[1].trusted_reporters = frozenset({net.reporter.peer_id})  # known once the node runs
        proof = await net.job_proof()
        for i in range(5):  # the same evidence, issued again and again
            await net.watches[2].report(
                dataclasses.replace(proof, issued_at_ms=proof.issued_at_ms + i).signed_by(net.reporter.identity)
            )
        hub, other, _ = net.watches
        await wait_for(lambda: _outcomes(hub) == {"confirmed": 2, "rate-limited": 3})
        await wait_for(lambda: _outcomes(other).get("trusted") == 2)
        assert set(_outcomes(other)) <= {"trusted", "rate-limited"}  # it may hear the reporter directly too
        assert net.hub.guard.scores.score(net.reporter.peer_id, now_ms()) < 0  # 3 over its rate
        assert all(n.guard.is_banned(net.worker.peer_id) for n in (net.hub, net.other))
