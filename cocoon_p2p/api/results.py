"""From job outcomes to API answers: the HTTP status of each job failure, ``usage`` from
the results, and the attestation of the workers that ran TEE jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from libp2p.peer.id import ID

from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs import frames as jf

from . import openai as api
from .models import GatewayModel
from .wire import APIError

if TYPE_CHECKING:  # no import cycle at run time
    from cocoon_p2p.node import Node

# Job failures as HTTP statuses: the network's state, not the caller's fault, is 5xx.
STATUS = {
    jf.NO_WORKERS: 503,
    jf.NO_ATTESTED_WORKERS: 503,
    jf.BUSY: 503,
    jf.SHUTTING_DOWN: 503,
    jf.PAYMENT: 402,
    jf.PAYMENT_SETUP: 402,
    jf.PRICE: 402,
    jf.BAD_INPUT: 400,
    jf.TOO_LARGE: 400,
    jf.UNKNOWN_MODEL: 404,
    jf.DEADLINE: 504,
}
ATTESTED_HEADER = "x-cocoon-attested"


def failed(exc: JobFailed) -> APIError:
    """A job's failure as the API answers it (502 for codes not listed in :data:`STATUS`)."""
    return APIError(STATUS.get(exc.code, 502), str(exc), kind="cocoon_job_error", code=exc.code)


def usage_of(
    model: GatewayModel,
    results: Sequence[InferenceResult],
    *,
    completion: int = 0,
    prompt: int | None = None,
    attestation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``usage`` for the jobs behind one answer (``results`` in choice order)."""
    workers = [str(ID(r.worker)) for r in results]
    return api.usage(
        sum(r.usage_units for r in results),
        sum(r.cost_nanoton for r in results),
        results[0].price_nanoton,
        workers[0],
        completion_price=results[0].completion_price_nanoton if model.kind == "generation" else None,
        completion=completion,
        prompt=prompt,
        unit=model.unit,
        workers=workers,
        attestation=attestation,
    )


async def attestation(node: Node, r: InferenceResult, required: bool) -> dict[str, Any] | None:
    """What admitted the worker of a TEE job: the verdict that still stands (asked again only
    if it ran out meanwhile). None when the job did not require a TEE."""
    if not required:
        return None
    verdict = await node.check_attestation(r.worker)
    if not verdict.accepted or verdict.measurement is None:
        return None  # it ran out between the choice and now: claim nothing
    return {
        "tee": verdict.tee,
        "status": verdict.status,
        "measurement": verdict.measurement.hex(),
        "image": verdict.image or None,
    }


def attested_headers(att: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The header naming the attested image, when there is one."""
    return [] if att is None else [(ATTESTED_HEADER, att["measurement"])]
