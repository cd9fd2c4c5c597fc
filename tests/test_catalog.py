"""Model names on the network: catalog entries on offers, the directory's catalog, and
references resolved to ids, pure; then (slow) a client resolving a name it has no copy of."""

from __future__ import annotations

import pytest

from cocoon_p2p.core import signed, wire
from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.overlay import announcement as ann_mod
from cocoon_p2p.overlay.catalog import CatalogEntry, ModelRef, catalog_name, parse_ref
from cocoon_p2p.overlay.directory import WorkerDirectory
from cocoon_p2p.overlay.joblimits import JobLimits

from .helpers import MODEL, MODEL_B, NOW, announcement, ident, offer

SMOL = CatalogEntry("smollm2-135m-instruct", "fp32")
SMOL_Q4 = CatalogEntry("smollm2-135m-instruct", "q4")


@pytest.mark.parametrize(
    ("name", "variant"),
    [("", "fp32"), ("Upper", "fp32"), ("a b", "fp32"), ("-lead", "fp32"), ("x" * 65, "fp32"), ("ok", ""),
     ("ok", "q" * 33), ("ok", "fp/32")],
)  # fmt: skip
def test_names_and_variants_are_checked(name: str, variant: str) -> None:
    with pytest.raises(MalformedMessage):
        CatalogEntry(name, variant)


def test_offers_carry_a_catalog_entry_with_or_without_limits_and_old_offers_still_decode() -> None:
    limits = JobLimits(max_items=8, max_text_chars=100, max_total_chars=800)
    a = announcement(
        ident(1),
        offers=(offer(catalog=SMOL), offer(MODEL_B, catalog=SMOL_Q4, limits=limits), offer(bytes(32), limits=limits)),
    )
    back = ann_mod.decode(a.encode(), now_ms=NOW)
    assert back == a
    assert [(o.catalog, o.limits) for o in back.offers] == [(SMOL, None), (SMOL_Q4, limits), (None, limits)]
    base = offer()._fields()
    for bad in ([*base, None], [*base, None, ["Bad Name", "fp32"]], [*base, None, ["ok"]], [*base, None, "x", 1]):
        raw = a._unsigned()
        raw[3] = [bad]
        with pytest.raises(MalformedMessage):
            ann_mod.decode(wire.pack([*raw, signed.sign(ident(1), ann_mod.DOMAIN, raw)]), now_ms=NOW)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("ab" * 32, ModelRef(model_id=bytes.fromhex("ab" * 32))),
        ("smollm2-135m-instruct", ModelRef(name="smollm2-135m-instruct")),
        ("smollm2-135m-instruct:q4", ModelRef(name="smollm2-135m-instruct", variant="q4")),
        ("smollm2-135m-instruct@ABC1", ModelRef(name="smollm2-135m-instruct", id_prefix="abc1")),
        ("m:q4@0f", ModelRef(name="m", variant="q4", id_prefix="0f")),
    ],
)
def test_references(text: str, want: ModelRef) -> None:
    assert parse_ref(text) == want


@pytest.mark.parametrize("text", ["", "Bad Name", "m@xyz", "m:", "m:Q 4", "@ab"])
def test_malformed_references_are_the_caller_s_error(text: str) -> None:
    with pytest.raises(LocalProtocolError):
        parse_ref(text)


def test_catalog_name() -> None:
    assert catalog_name("My Model_v2.ONNX") == "my-model_v2.onnx"
    assert catalog_name("***") == "model"


def test_the_directory_lists_named_models_and_resolves_references_best_served_first() -> None:
    d = WorkerDirectory()
    d.receive_announcement(
        announcement(ident(1), offers=(offer(catalog=SMOL, price_nanoton=9), offer(MODEL_B, catalog=SMOL_Q4))).encode(),
        origin=ident(1).peer_id,
        now_ms=NOW,
    )
    d.receive_announcement(
        announcement(ident(2), offers=(offer(catalog=SMOL, price_nanoton=4), offer(bytes(32)))).encode(),
        origin=ident(2).peer_id,
        now_ms=NOW,
    )
    rows = d.catalog(NOW)
    assert [(r.entry, r.model_id, r.workers, r.min_price_nanoton) for r in rows] == [
        (SMOL, MODEL, 2, 4),
        (SMOL_Q4, MODEL_B, 1, 1000),
    ]  # the unnamed offer is not in the catalog
    assert d.resolve(parse_ref("smollm2-135m-instruct"), NOW) == [MODEL, MODEL_B]  # two workers beat one
    assert d.resolve(parse_ref("smollm2-135m-instruct:q4"), NOW) == [MODEL_B]
    assert d.resolve(parse_ref(f"smollm2-135m-instruct@{MODEL_B.hex()[:6]}"), NOW) == [MODEL_B]
    assert d.resolve(parse_ref("smollm2-135m-instruct:int8"), NOW) == []
    assert d.resolve(parse_ref("other"), NOW) == []
    assert d.resolve(parse_ref(MODEL.hex()), NOW) == [MODEL]
    assert d.catalog(NOW + 10**6) == []  # expired announcements name nothing


@pytest.mark.slow
async def test_a_client_resolves_a_name_it_has_no_copy_of(tiny_model: ModelSpec) -> None:
    """The worker announces its model's name; the client, which has neither the file nor
    its id, runs a job by name. A 4-bit variant is resolved only when asked for."""
    from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
    from cocoon_p2p.execution.tensors import from_numpy
    from cocoon_p2p.jobs import JobFailed
    from cocoon_p2p.node import Node

    from .helpers import x_rows
    from .netutil import fast_config

    async with Node(fast_config()) as client, Node(fast_config(bootstrap=[client.addrs[0]])) as worker:
        worker.serve_model(tiny_model, OnnxRuntimeBackend(tiny_model.path), price_nanoton=2,
                           catalog=CatalogEntry("tiny-net", "fp32"))  # fmt: skip
        model_id = await client.resolve_model("tiny-net", wait_s=10)
        assert model_id == tiny_model.model_id
        r = await client.infer(model_id, inputs=(from_numpy("x", x_rows(2)),), max_price_nanoton=2)
        assert r.worker == worker.peer_id
        (row,) = client.catalog()
        assert (row.entry, row.workers, row.min_price_nanoton, row.unit) == (
            CatalogEntry("tiny-net", "fp32"),
            1,
            2,
            tiny_model.unit,
        )
        with pytest.raises(JobFailed) as err:
            await client.resolve_model("tiny-net:q4", wait_s=0.2)
        assert err.value.code == "no-workers"
