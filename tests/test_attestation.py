"""Attestation, judged on real evidence: Intel TDX and SGX quotes with their collateral.

The quotes in tests/vectors/attestation are real (from dcap-qvl's samples): nothing of the
crypto is faked. Each rule of the verifier and of the policy is shown refusing, and
the binding construction is pinned by a known-answer vector. Pure: no sockets.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cocoon_p2p.attestation import evidence as ev
from cocoon_p2p.attestation.binding import DOMAIN, report_data_for_key, report_data_for_peer
from cocoon_p2p.attestation.book import TeeStanding, VerdictBook
from cocoon_p2p.attestation.collateral import Collateral, CollateralCache, qvl
from cocoon_p2p.attestation.errors import AttestationError, RefusalReason
from cocoon_p2p.attestation.policy import DEFAULT_POLICY, TeePolicy, load_policy, parse_policy
from cocoon_p2p.attestation.verifier import Verdict, judge_report, quote_fmspc, quote_registers, verify_quote
from cocoon_p2p.core.errors import BadSignature, ConfigError, MalformedMessage, MessageTooLarge
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.overlay import announcement as ann_mod
from cocoon_p2p.overlay import capability as cap_mod
from cocoon_p2p.overlay.teeclaim import TeeClaim, TeeKind, measurement_digest

SAMPLES = Path(__file__).resolve().parent / "vectors" / "attestation"  # real quotes: see its README

TDX_AT = 1750331763  # the sample TDX collateral is valid 2025-06-19 .. 2025-07-19
SGX_AT = 1750334171
MR_TD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
MEASUREMENT = "8ef444fda246f7e0d5f9a3ba0a2822ae0be7dbec5e321277d03b73b198fa2545"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def collateral(name: str) -> Collateral:
    return Collateral.from_json((SAMPLES / name).read_text())


TDX, TDX_COLL = sample("tdx_quote"), collateral("tdx_quote_collateral.json")


def verify(quote: bytes = TDX, policy: TeePolicy = DEFAULT_POLICY, **kw: Any) -> Verdict:
    kw.setdefault("now_s", TDX_AT)
    kw.setdefault("expected_report_data", None)
    return verify_quote(quote, kw.pop("coll", TDX_COLL), policy, **kw)


# ---- the binding ---------------------------------------------------------------------


def test_binding_construction_known_answer() -> None:
    key = bytes(range(32))
    expected = hashlib.sha512(b"cocoon/attest/1\x00" + b"\x08\x01\x12\x20" + key).digest()
    assert DOMAIN == b"cocoon/attest/1\x00"
    assert report_data_for_key(key) == expected
    assert report_data_for_key(key).hex() == (
        "4a5dc7bc90a00392f30e5d8bf5740a418f0f3d4b8a52c1314a77b365bd7a3f02"
        "e44335d1c8afc91caf8615c8957da60f49e03e43f516b1062d571ec084da088d"
    )
    ident = Identity.generate()
    assert report_data_for_peer(ident.peer_id) == report_data_for_key(ident.public_key)
    assert report_data_for_peer(Identity.generate().peer_id) != report_data_for_peer(ident.peer_id)
    with pytest.raises(ValueError):
        report_data_for_key(b"short")


# ---- real quotes ---------------------------------------------------------------------


def test_the_good_tdx_quote_verifies_with_its_measurements_and_report_data() -> None:
    v = verify()
    assert v.accepted and v.reason is None
    assert (v.tee, v.status, v.advisories, v.debug, v.image) == ("tdx", "UpToDate", (), False, "")
    assert v.registers["mr_td"].hex() == MR_TD
    assert v.report_data is not None and v.report_data.hex().startswith("9a9d48e7f6799642")
    assert v.measurement is not None and v.measurement.hex() == MEASUREMENT
    assert v.fmspc == "B0C06F000000" and v.collateral_next_update == TDX_COLL.next_update
    assert quote_registers(TDX) == v.registers and quote_fmspc(TDX) == "B0C06F000000"
    assert json.loads(json.dumps(v.to_json()))["registers"]["mr_td"] == MR_TD


# Every byte of the header and TD report (0-631) and of the signature and attestation
# key (636-763) is covered by a signature; dcap-qvl's README measured which are not.
SIGNED = [*range(0, 632), *range(636, 764)]


def test_one_flipped_byte_anywhere_in_the_signed_body_or_signature_is_refused() -> None:
    accepted = []
    for i in SIGNED:
        tampered = bytearray(TDX)
        tampered[i] ^= 0x01
        v = verify(bytes(tampered))
        if v.accepted:
            accepted.append(i)
        assert v.reason in (RefusalReason.INVALID, RefusalReason.MALFORMED, RefusalReason.NO_COLLATERAL, None)
    assert accepted == []


@pytest.mark.parametrize(
    ("quote", "coll", "at", "reason", "says"),
    [
        ("tdx_quote", "tdx_quote_collateral.json", 1760000000, RefusalReason.INVALID, "expired"),  # after its CRLs
        ("tdx_quote", "tdx_quote_collateral.json", 1700000000, RefusalReason.INVALID, "future"),  # before issue
        ("tdx_quote_outdated", "tdx_quote_outdated_collateral.json", None, RefusalReason.TCB_STATUS, "TCB level"),
        ("sgx_quote", "sgx_quote_collateral.json", SGX_AT, RefusalReason.WRONG_TEE, "sgx"),
        ("tdx_quote", "sgx_quote_collateral.json", TDX_AT, RefusalReason.NO_COLLATERAL, "FMSPC"),
    ],
)
def test_refused_quotes(quote: str, coll: str, at: int | None, reason: RefusalReason, says: str) -> None:
    c = collateral(coll)
    v = verify(sample(quote), coll=c, now_s=at if at is not None else c.issued_at + 3600)
    assert v.reason is reason and says in v.message
    with pytest.raises(AttestationError) as caught:
        v.raise_if_refused()
    assert caught.value.reason is reason


def test_an_sgx_quote_reports_its_status_and_advisories_before_the_tee_refusal() -> None:
    v = verify(sample("sgx_quote"), coll=collateral("sgx_quote_collateral.json"), now_s=SGX_AT)
    assert (v.tee, v.status) == ("sgx", "ConfigurationAndSWHardeningNeeded")
    assert v.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")


def test_garbage_is_malformed_not_an_exception() -> None:
    for junk in (b"", b"\x00" * 47, b"\x04\x00" + b"\xff" * 600, b"\x00" * (17 * 1024)):
        assert verify(junk).reason is RefusalReason.MALFORMED


# ---- the policy's rules ----------------------------------------------------------------


def image(name: str, **registers: str) -> dict[str, Any]:
    return {"images": {name: registers}}


@pytest.mark.parametrize(
    ("policy", "reason", "image_name"),
    [
        (image("other", mr_td="00" * 48), RefusalReason.MEASUREMENT, None),
        (image("ours", mr_td=MR_TD), None, "ours"),
        ({**image("a", mr_td="00" * 48), "images": {"a": {"mr_td": "00" * 48}, "b": {"mr_td": MR_TD}}}, None, "b"),
        (image("partial", mr_td=MR_TD, rt_mr3="11" * 48), RefusalReason.MEASUREMENT, None),
        ({"accepted_status": ["SWHardeningNeeded"]}, RefusalReason.TCB_STATUS, None),
    ],
)
def test_policy_images_and_statuses(
    policy: dict[str, Any], reason: RefusalReason | None, image_name: str | None
) -> None:
    v = verify(policy=parse_policy(policy))
    assert v.reason is reason
    assert v.image == image_name


def verified_report() -> dict[str, Any]:
    """The good quote's report as dcap-qvl returns it, to vary one field the signature
    covers (a debug TD, another status) and test the policy's step on it."""
    return dict(json.loads(qvl().verify(TDX, TDX_COLL.for_qvl, TDX_AT).to_json()))


def test_a_debug_td_is_refused_unless_the_policy_allows_it() -> None:
    report = verified_report()
    attrs = bytearray(bytes.fromhex(report["report"]["TD10"]["td_attributes"]))
    attrs[0] |= 0x01  # TDATTRIBUTES.DEBUG
    report["report"]["TD10"]["td_attributes"] = attrs.hex()
    v = judge_report(report, DEFAULT_POLICY, now_s=TDX_AT, expected_report_data=None)
    assert v.reason is RefusalReason.DEBUG and v.debug is True
    assert judge_report(report, parse_policy({"allow_debug": True}), now_s=TDX_AT, expected_report_data=None).accepted


@pytest.mark.parametrize(
    ("accept_status", "accept_advisories", "reason"),
    [
        ([], [], RefusalReason.TCB_STATUS),
        (["SWHardeningNeeded"], [], RefusalReason.ADVISORY),
        (["SWHardeningNeeded"], ["INTEL-SA-00615"], RefusalReason.ADVISORY),  # every advisory must be listed
        (["SWHardeningNeeded"], ["INTEL-SA-00615", "INTEL-SA-00657"], None),
    ],
)
def test_other_statuses_and_their_advisories_are_opt_in(
    accept_status: list[str], accept_advisories: list[str], reason: RefusalReason | None
) -> None:
    report = verified_report()
    report["status"], report["advisory_ids"] = "SWHardeningNeeded", ["INTEL-SA-00615", "INTEL-SA-00657"]
    policy = parse_policy({"accepted_status": ["UpToDate", *accept_status], "accepted_advisories": accept_advisories})
    assert judge_report(report, policy, now_s=TDX_AT, expected_report_data=None).reason is reason


def test_the_real_quote_is_not_bound_to_any_of_our_peers() -> None:
    for _ in range(3):
        peer = Identity.generate().peer_id
        v = verify(expected_report_data=report_data_for_peer(peer))
        assert v.reason is RefusalReason.NOT_BOUND and "bound" in v.message
    assert verify(expected_report_data=verify().report_data).accepted  # its own REPORTDATA is what it carries
    relaxed = parse_policy({"insecure_skip_binding_for_tests": True})
    assert relaxed.insecure and not DEFAULT_POLICY.insecure
    assert verify(policy=relaxed, expected_report_data=report_data_for_peer(Identity.generate().peer_id)).accepted


def test_the_policy_default_time_is_the_test_only_fixed_time_when_set() -> None:
    pinned = parse_policy({"insecure_fixed_time_for_tests": TDX_AT})
    assert verify_quote(TDX, TDX_COLL, pinned, expected_report_data=None).accepted
    assert verify_quote(TDX, TDX_COLL, DEFAULT_POLICY, expected_report_data=None).reason is RefusalReason.INVALID


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"tee": "sev-snp"}, "tee"),
        ({"accepted_status": ["Great"]}, "unknown TCB status"),
        ({"accepted_status": ["Revoked"]}, "revoked"),
        ({"accepted_status": "UpToDate"}, "list of strings"),
        ({"allow_debug": "no"}, "true or false"),
        ({"max_evidence_age_s": 0}, "positive"),
        ({"verdict_ttl_s": True}, "positive"),
        ({"images": {"x": {}}}, "at least one"),
        ({"images": {"x": {"mr_enclave": "00" * 48}}}, "unknown register"),
        ({"images": {"x": {"mr_td": "00" * 47}}}, "96 hex"),
        ({"images": {"x": {"mr_td": "zz" * 48}}}, "96 hex"),
        ({"insecure_fixed_time_for_tests": "soon"}, "unix time"),
        ({"allow_debgu": True}, "unknown key"),
    ],
)
def test_bad_policies_are_config_errors_naming_the_key(data: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_policy(data)


def test_a_policy_file_round_trips(tmp_path: Path) -> None:
    policy = parse_policy(
        {
            "accepted_status": ["UpToDate", "SWHardeningNeeded"],
            "accepted_advisories": ["INTEL-SA-00615"],
            "max_evidence_age_s": 600,
            **image("my image", mr_td=MR_TD, rt_mr0="ab" * 48),
        }
    )
    path = tmp_path / "policy.toml"
    path.write_text(policy.to_toml())
    assert load_policy(path) == policy
    path.write_text("tee = ")
    with pytest.raises(ConfigError, match="policy.toml"):
        load_policy(path)


# ---- collateral and verdicts over time ---------------------------------------------------


def test_collateral_parses_its_dates_and_the_cache_keeps_it_until_next_update() -> None:
    assert (TDX_COLL.fmspc, TDX_COLL.issued_at, TDX_COLL.next_update) == ("B0C06F000000", 1750329147, 1752920163)
    cache = CollateralCache(max_entries=2)
    assert cache.get("b0c06f000000", TDX_AT) is None and cache.misses == 1
    cache.put(TDX_COLL)
    assert cache.get("b0c06f000000", TDX_AT) is TDX_COLL and cache.hits == 1
    assert cache.get("B0C06F000000", TDX_COLL.next_update) is None  # due for an update
    older = Collateral(TDX_COLL.text, TDX_COLL.fmspc, TDX_COLL.issued_at - 10, TDX_COLL.next_update)
    cache.put(older)
    assert cache.get("B0C06F000000", TDX_AT) is TDX_COLL  # the newer one stays
    cache.put(collateral("sgx_quote_collateral.json"))
    cache.put(collateral("tdx_quote_outdated_collateral.json"))
    assert len(cache) == 2 and cache.get("B0C06F000000", TDX_AT) is None  # bounded, oldest out


@pytest.mark.parametrize("text", ["", "{}", "[]", '{"tcb_info": 1}', "x" * (65 * 1024)])
def test_what_is_not_collateral_is_refused(text: str) -> None:
    with pytest.raises(AttestationError) as caught:
        Collateral.from_json(text)
    assert caught.value.reason is RefusalReason.NO_COLLATERAL


def test_verdicts_stand_for_the_shortest_of_ttl_evidence_and_collateral() -> None:
    book = VerdictBook(verdict_ttl_s=3600, refused_for_s=600)
    good, peer = verify(), b"p" * 38
    book.record(peer, good, 1000.0, evidence_expires_s=1000.0 + 1800)
    assert book.standing(peer, 1000.0 + 1799) is TeeStanding.ATTESTED
    assert book.standing(peer, 1000.0 + 1800) is TeeStanding.UNKNOWN  # the evidence ran out: ask again
    book.record(peer, good, 0.0)
    left = TDX_COLL.next_update - TDX_AT  # ~30 days of collateral left when judged
    assert left > 3600 and book.standing(peer, 3599.0) is TeeStanding.ATTESTED
    assert book.standing(peer, 3600.0) is TeeStanding.UNKNOWN
    short = VerdictBook(verdict_ttl_s=10 * left)
    short.record(peer, good, 0.0)
    assert short.standing(peer, left - 1) is TeeStanding.ATTESTED and short.standing(peer, left) is TeeStanding.UNKNOWN
    bad = verify(expected_report_data=b"\x00" * 64)
    book.record(peer, bad, 0.0)
    assert book.standing(peer, 599.0) is TeeStanding.REFUSED and book.standing(peer, 600.0) is TeeStanding.UNKNOWN
    assert book.refused_total[RefusalReason.NOT_BOUND] == 1 and book.accepted_total == 2


def test_the_book_is_bounded() -> None:
    book = VerdictBook(verdict_ttl_s=100, max_peers=3)
    good = verify()
    for i in range(5):
        book.record(bytes([i]) * 38, good, float(i))
    assert book.attested_count(4.0) == 3 and book.standing(b"\x00" * 38, 4.0) is TeeStanding.UNKNOWN


# ---- the wire: evidence, and the claim in announcements and records ------------------------


def evidence(**kw: Any) -> ev.Evidence:
    fields: dict[str, Any] = {
        "tee": "tdx",
        "source": "file",
        "quote": TDX,
        "collateral": TDX_COLL.text,
        "produced_at_ms": 1,
        "expires_at_ms": 2,
        "gpu": None,
    }
    return ev.Evidence(**{**fields, **kw})


def test_evidence_round_trips_and_is_bounded() -> None:
    for e in (evidence(), evidence(collateral=None, gpu='{"cc": true}')):
        assert ev.decode_evidence(e.encode()) == e
    ev.decode_request(ev.encode_request())
    with pytest.raises(MalformedMessage):
        evidence(quote=b"q" * (16 * 1024 + 1)).encode()
    with pytest.raises(MessageTooLarge):
        ev.decode_evidence(b"\x00" * (ev.MAX_EVIDENCE_BYTES + 1))
    with pytest.raises(MessageTooLarge):
        ev.decode_request(b"\x91\x01" * 20)


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f[:-1],
        lambda f: [2, *f[1:]],
        lambda f: [*f[:3], b"short", *f[4:]],
        lambda f: [*f[:4], 7, *f[5:]],
        lambda f: [*f[:5], 10, 5, None],  # expires before produced
        lambda f: [*f[:1], "", *f[2:]],
    ],
)
def test_malformed_evidence_is_refused(change: Any) -> None:
    from cocoon_p2p.core import wire

    fields = [1, "tdx", "file", TDX, None, 1, 2, None]
    with pytest.raises(MalformedMessage):
        ev.decode_evidence(wire.pack(change(fields)))


CLAIM = TeeClaim(TeeKind.TDX, bytes.fromhex(MEASUREMENT), 10**13, gpu_cc=True)


def test_the_claim_names_the_image_by_the_digest_of_its_registers() -> None:
    assert measurement_digest(quote_registers(TDX)).hex() == MEASUREMENT
    assert TeeClaim.parse(CLAIM.fields()) == CLAIM
    for bad in (["sev", CLAIM.measurement, 1, False], ["tdx", b"x", 1, False], ["tdx", CLAIM.measurement, 1, 1]):
        with pytest.raises(MalformedMessage):
            TeeClaim.parse(bad)
    with pytest.raises(ValueError):
        measurement_digest({"mr_td": b"x"})


def test_announcements_and_records_carry_the_claim_under_their_signature() -> None:
    ident = Identity.generate()
    now = 1_000_000
    ann = ann_mod.Announcement.create(ident, now_ms=now, ttl_ms=10_000, addrs=(), offers=(), running_jobs=0, tee=CLAIM)
    assert ann_mod.decode(ann.encode(), now_ms=now).tee == CLAIM
    plain = ann_mod.Announcement.create(ident, now_ms=now, ttl_ms=10_000, addrs=(), offers=(), running_jobs=0)
    assert ann_mod.decode(plain.encode(), now_ms=now).tee is None
    from cocoon_p2p.core import wire

    stripped = wire.pack([*ann._unsigned()[:-1], ann.signature])  # the claim removed, the signature kept
    with pytest.raises(BadSignature):
        ann_mod.decode(stripped, now_ms=now)
    rec = cap_mod.CapabilityRecord.create(
        ident,
        ttl_ms=10_000,
        now_ms=now,
        model_id=b"m" * 32,
        backend="onnxruntime",
        gpu="cpu",
        gpu_memory_mb=0,
        max_batch=1,
        price_nanoton=1,
        unit="item",
        capacity=1,
        addrs=(),
        tee=CLAIM,
    )
    assert cap_mod.decode(rec.encode(), now_ms=now).tee == CLAIM
