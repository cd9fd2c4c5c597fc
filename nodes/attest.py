"""``cocoon-node attest``: TEE evidence from an operator's chair, and the roles' TEE flags.

Subcommands:

* ``verify QUOTE --collateral FILE``: judge a quote file offline, as a client would
  (exit 0 accepted, 1 refused, 2 usage or configuration error);
* ``show``: on a worker machine, its PeerId, the REPORTDATA its quotes must carry,
  whether its quote source works, and the claim its evidence makes;
* ``policy``: the default client policy as commented TOML, a starting point.

Also here: the worker's flags (``--tee``, ``--tee-collateral``, ``--pccs-url``,
``--tee-lifetime-s``) and the client's and gateway's (``--require-tee``,
``--tee-policy``, ``--tee-collateral``, ``--pccs-url``), and what they build.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

from cocoon_p2p.attestation import verifier
from cocoon_p2p.attestation.binding import DOMAIN, report_data_for_peer
from cocoon_p2p.attestation.collateral import Collateral
from cocoon_p2p.attestation.errors import AttestationError, EvidenceUnavailable
from cocoon_p2p.attestation.evidence import Evidence
from cocoon_p2p.attestation.gate import ClientAttestation
from cocoon_p2p.attestation.keeper import EvidenceKeeper, WorkerAttestation
from cocoon_p2p.attestation.policy import DEFAULT_POLICY, TeePolicy, load_policy
from cocoon_p2p.attestation.refresh import RefreshPolicy
from cocoon_p2p.attestation.sources import SOURCE_NAMES, TsmReportSource, source_from_name
from cocoon_p2p.attestation.verifier import Verdict, quote_fmspc, quote_registers, verify_quote
from cocoon_p2p.core.errors import CocoonError, ConfigError
from cocoon_p2p.core.identity import load_or_create_identity, peer_id_from_str
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.overlay.teeclaim import TeeClaim

from . import config as config_mod
from . import logs

KEY_FILE = "node.key"  # as nodes.cli names it
BINDING_CONSTRUCTION = 'SHA-512("cocoon/attest/1\\0" || 08011220 || Ed25519 public key)'
_SOURCES = ", ".join(SOURCE_NAMES)

# --- the roles' flags ------------------------------------------------------------------------------


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """A worker's TEE flags (each also a key of its TOML config)."""
    p.add_argument("--tee", metavar="SOURCE", help=f"claim a TEE; quotes from: {_SOURCES} (default: none)")
    p.add_argument(
        "--tee-collateral",
        action="append",
        metavar="FILE",
        help="Intel's collateral for this platform (dcap-qvl JSON), sent with each quote",
    )
    p.add_argument("--pccs-url", metavar="URL", help="fetch the collateral from this PCCS instead")
    p.add_argument("--tee-lifetime-s", type=float, help="how long one quote is served (default 3600)")


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """A client's or gateway's TEE flags (each also a key of its TOML config)."""
    p.add_argument(
        "--require-tee", action="store_true", default=None, help="run only on workers attested under --tee-policy"
    )
    p.add_argument("--tee-policy", metavar="FILE", help="TEE policy TOML (default: TDX, UpToDate, no debug, any image)")
    p.add_argument(
        "--tee-collateral",
        action="append",
        metavar="FILE",
        help="Intel collateral to verify quotes with, dcap-qvl JSON (repeatable: an offline bundle)",
    )
    p.add_argument("--pccs-url", metavar="URL", help="fetch collateral from this PCCS when none is at hand")


def read_collateral(path: Path) -> Collateral:
    """A collateral file, or ConfigError naming it."""
    try:
        return Collateral.from_json(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the collateral: {getattr(exc, 'strerror', None) or exc}") from exc
    except AttestationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def worker_attestation(cfg: config_mod.RoleConfig) -> WorkerAttestation | None:
    """What ``cfg.tee`` and its companions ask of a worker; None when it claims no TEE.
    ConfigError for an unknown source, a collateral file that is not one, or a bad lifetime."""
    if not cfg.tee:
        return None
    source = source_from_name(cfg.tee)
    if len(cfg.tee_collateral) > 1:
        raise ConfigError(f"a worker sends one collateral file with its quotes, not {len(cfg.tee_collateral)}")
    collateral = Path(cfg.tee_collateral[0]) if cfg.tee_collateral else None
    if collateral is not None:
        read_collateral(collateral)  # refused at start rather than at every quote
    try:  # TOML may hold anything here
        lifetime = float(cfg.tee_lifetime_s)
    except (TypeError, ValueError):
        lifetime = math.nan
    if not (math.isfinite(lifetime) and lifetime > 0):
        raise ConfigError(f"tee_lifetime_s: expected a positive number of seconds, not {cfg.tee_lifetime_s!r}")
    # Remake a quote before it runs out: 10 minutes ahead, or a quarter of a short lifetime.
    refresh = RefreshPolicy(lifetime_s=lifetime, refresh_before_s=min(600.0, lifetime / 4))
    return WorkerAttestation(source=source, refresh=refresh, collateral_file=collateral, pccs_url=cfg.pccs_url or None)


def client_attestation(cfg: config_mod.RoleConfig) -> ClientAttestation:
    """How a client or gateway judges workers: its policy and collateral. ConfigError for a
    bad policy or a collateral file that is not one."""
    policy = load_policy(Path(cfg.tee_policy)) if cfg.tee_policy else DEFAULT_POLICY
    files = tuple(Path(f) for f in cfg.tee_collateral)
    for path in files:
        read_collateral(path)
    return ClientAttestation(policy=policy, collateral_files=files, pccs_url=cfg.pccs_url or None)


def claim_summary(claim: TeeClaim, evidence: Evidence | None = None) -> str:
    """One line: the TEE, the image's measurement digest, where the quote came from, until when."""
    parts = [claim.tee.value, f"measurement {claim.measurement.hex()}"]
    if evidence is not None:
        parts.append(f"source {evidence.source}")
        parts.append("collateral sent" if evidence.collateral else "no collateral (clients need their own)")
    parts.append(f"until {_iso(claim.expires_at_ms // 1000)}")
    if claim.gpu_cc:
        parts.append("gpu-cc")
    return " ".join(parts)


def report_worker_tee(keeper: EvidenceKeeper, peer_id: bytes, source: str) -> None:
    """Print ``tee <claim>`` when the worker has evidence, else a warning with the reason
    (the worker keeps serving, unattested). Warns too when the quote is bound to another key
    (served only under a test-only setting): clients refuse it as forged."""
    if keeper.claim is None:
        why = keeper.last_error or "no evidence yet"
        logs.say_err(
            f"warning: --tee {source}: no evidence ({why}); serving unattested", fields(peer=peer_id), level=WARNING
        )
        return
    logs.say(f"tee {claim_summary(keeper.claim, keeper.evidence)}", fields(peer=peer_id))
    if keeper.evidence is not None and quote_report_data(keeper.evidence.quote) != report_data_for_peer(peer_id):
        logs.say_err(
            "warning: the quote's REPORTDATA is not this node's binding: clients will refuse it "
            "as not bound (see cocoon-node attest show)",
            fields(peer=peer_id),
            level=WARNING,
        )


def verdict_summary(verdict: Verdict) -> str:
    """One line for a standing verdict: accepted with its measurement and image, or why not."""
    if not verdict.accepted:
        assert verdict.reason is not None
        return f"refused ({verdict.reason.value}): {verdict.message}"
    m = verdict.measurement
    image = f" image {verdict.image}" if verdict.image else ""
    return f"{verdict.tee} {verdict.status} measurement {m.hex() if m else '?'}{image}"


def quote_report_data(quote: bytes) -> bytes | None:
    """REPORTDATA of a quote, read without verifying it (None when it is not a quote)."""
    try:
        return verifier.quote_report_data(quote)
    except AttestationError:
        return None


def _iso(unix_s: int) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the attest subcommands ------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add ``attest`` and its subcommands to the CLI's subparsers."""
    p = sub.add_parser("attest", help="check TEE quotes, show this worker's binding, write a TEE policy")
    cmds = p.add_subparsers(dest="attest_command", required=True)

    v = cmds.add_parser("verify", help="judge a TDX quote file offline, as a client would")
    v.add_argument("quote", type=Path, help="the raw quote (binary)")
    v.add_argument("--collateral", type=Path, required=True, help="Intel's collateral for it (dcap-qvl JSON)")
    v.add_argument("--policy", type=Path, help="TEE policy TOML (default: TDX, UpToDate, no debug, any image)")
    v.add_argument("--at", type=int, metavar="UNIX_TIME", help="judge as of this time (default: now)")
    v.add_argument("--peer", metavar="PEER_ID", help="also require REPORTDATA to be this peer's binding")
    v.add_argument("--json", action="store_true", help="print JSON")

    s = cmds.add_parser("show", help="this worker's PeerId, the REPORTDATA its quotes carry, and its claim")
    s.add_argument("--data-dir", type=Path, default=config_mod.default_data_dir())
    s.add_argument("--tee", metavar="SOURCE", default="configfs-tsm", help=f"{_SOURCES} (default configfs-tsm)")
    s.add_argument("--json", action="store_true", help="print JSON")

    o = cmds.add_parser("policy", help="write the default TEE policy as commented TOML")
    o.add_argument("--out", type=Path, help="write it here (default: stdout)")
    o.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> int:
    """Run an attest subcommand. ConfigError (exit 2 in the CLI) for usage errors."""
    if args.attest_command == "verify":
        return _verify(args)
    if args.attest_command == "show":
        return _show(args)
    return _policy(args)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc


def _verify(args: argparse.Namespace) -> int:
    quote = _read_bytes(args.quote, "quote")
    collateral = read_collateral(args.collateral)
    policy = load_policy(args.policy) if args.policy else DEFAULT_POLICY
    expected = None
    if args.peer is not None:
        try:
            expected = report_data_for_peer(peer_id_from_str(args.peer))
        except CocoonError as exc:
            raise ConfigError(f"--peer {args.peer}: not an Ed25519 PeerId ({exc})") from exc
    verdict = verify_quote(quote, collateral, policy, now_s=args.at, expected_report_data=expected)
    bound = None if expected is None or verdict.report_data is None else verdict.report_data == expected
    if args.json:
        out = {
            **verdict.to_json(),
            "quote": str(args.quote),
            "policy": policy.source,
            "peer": args.peer,
            "expected_report_data": expected.hex() if expected is not None else None,
            "bound": bound,
        }
        print(json.dumps(out, indent=2))
    else:
        _print_verdict(verdict, policy, args.peer, bound)
    return 0 if verdict.accepted else 1


def _print_verdict(v: Verdict, policy: TeePolicy, peer: str | None, bound: bool | None) -> None:
    rows: list[tuple[str, str]] = []
    if v.tee is not None:
        rows.append(("tee", v.tee))
    if v.status is not None:
        rows += [("status", v.status), ("advisories", ", ".join(v.advisories) or "none")]
    if v.debug is not None:
        rows.append(("debug", "yes" if v.debug else "no"))
    if v.measurement is not None:
        rows.append(("measurement", v.measurement.hex()))
    rows += [(name, value.hex()) for name, value in v.registers.items()]
    if v.report_data is not None:
        rows.append(("report_data", v.report_data.hex()))
        if peer is None:
            rows.append(("binding", "not checked (give --peer PEER_ID to check it)"))
        else:
            rows.append(("binding", f"{'bound' if bound else 'NOT bound'} to {peer}"))
    if v.image is not None:
        rows.append(("image", v.image or "any (the policy names no images)"))
    elif v.reason is not None and v.reason.value == "measurement":
        rows.append(("image", "none of the policy's images"))
    if v.fmspc is not None:
        rows.append(("fmspc", v.fmspc))
    if v.collateral_next_update is not None:
        rows.append(("collateral", f"good until {_iso(v.collateral_next_update)}"))
    rows += [("verified at", f"{v.verified_at} ({_iso(v.verified_at)})"), ("policy", policy.source)]
    if policy.insecure:
        rows.append(("warning", "the policy has test-only relaxations: not for production"))
    head = "accepted" if v.reason is None else f"refused ({v.reason.value}): {v.message}"
    print(head)
    for key, value in rows:
        print(f"  {key:<12} {value}")


def _show(args: argparse.Namespace) -> int:
    key = Path(args.data_dir) / KEY_FILE
    created = not key.exists()
    identity = load_or_create_identity(key)
    if created:
        print(f"created a new node key at {key}", file=sys.stderr)
    binding = report_data_for_peer(identity.peer_id)
    source = source_from_name(args.tee)
    unavailable = source.available() if isinstance(source, TsmReportSource) else None
    info: dict[str, Any] = {
        "peer_id": identity.peer_id_str,
        "binding": binding.hex(),
        "binding_construction": BINDING_CONSTRUCTION,
        "binding_domain": DOMAIN.hex(),
        "source": args.tee,
        "unavailable": unavailable,
        "evidence": None,
        "error": None,
    }
    if unavailable is not None:
        info["error"] = unavailable
    else:
        try:
            quote = source.quote(binding)
            registers = quote_registers(quote)
            fmspc = quote_fmspc(quote)
        except (EvidenceUnavailable, AttestationError) as exc:
            info["error"] = str(exc)
        else:
            verdict = Verdict(None, "", 0, tee=source.tee, registers=registers)
            measurement = verdict.measurement
            assert measurement is not None
            found = quote_report_data(quote)
            info["evidence"] = {
                "tee": source.tee,
                "measurement": measurement.hex(),
                "registers": {k: v.hex() for k, v in registers.items()},
                "fmspc": fmspc,
                "quote_bytes": len(quote),
                "report_data": found.hex() if found is not None else None,
                "bound": found == binding,
            }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_show(info)
    return 0 if info["evidence"] is not None else 1


def _print_show(info: dict[str, Any]) -> None:
    print(f"peer_id      {info['peer_id']}")
    print(f"binding      {info['binding']}")
    print(f"             = {info['binding_construction']}")
    if info["source"] == "configfs-tsm":  # the one source that can be looked at without asking
        state = "available" if info["unavailable"] is None else f"unavailable: {info['unavailable']}"
        print(f"source       {info['source']} ({state})")
    else:
        print(f"source       {info['source']}")
    ev = info["evidence"]
    if ev is None:
        print(f"no evidence: {info['error']}")
        return
    print(f"claim        {ev['tee']} measurement {ev['measurement']}")
    for name, value in ev["registers"].items():
        print(f"  {name:<10} {value}")
    print(f"  {'fmspc':<10} {ev['fmspc']} (the platform family: its collateral is looked up by it)")
    print(f"  {'reportdata':<10} {ev['report_data']}")
    if ev["bound"]:
        print(f"  {'bound':<10} yes: REPORTDATA is this node's binding")
    else:
        print(f"  {'bound':<10} NO: this quote was not made for this node's key; clients refuse it (not-bound)")


_COMMENTS = {
    "tee": "# The TEE a worker must run in: only Intel TDX is verified today.",
    "accepted_status": (
        "# The platform TCB statuses accepted. Others (SWHardeningNeeded, ConfigurationNeeded,\n"
        "# ConfigurationAndSWHardeningNeeded, OutOfDate, OutOfDateConfigurationNeeded) are opt-in:\n"
        "# each means known, named weaknesses. Revoked is never accepted."
    ),
    "accepted_advisories": (
        '# Intel security advisories accepted (e.g. "INTEL-SA-00615"): a platform whose status\n'
        "# comes with an advisory not listed here is refused."
    ),
    "allow_debug": "# A debug TD lets its host read its memory: keep false outside development.",
    "max_evidence_age_s": "# Evidence older than this (seconds) is refused; the worker is asked again.",
    "verdict_ttl_s": "# How long (seconds) a verdict on a worker stands before it is asked again.",
}
_IMAGES = """
# Approved images. With none listed, any image passes and its measurements are only reported.
# With some, a worker passes only if its registers match one image's (96 hex digits each;
# a register left out matches anything). Read a worker's values with `cocoon-node attest show`
# on it, or `cocoon-node attest verify QUOTE --collateral FILE` on one of its quotes.
#
# [images.my-inference-image]
# mr_td = "<96 hex digits>"
# rt_mr0 = "<96 hex digits>"
# rt_mr1 = "<96 hex digits>"
# rt_mr2 = "<96 hex digits>"
# rt_mr3 = "<96 hex digits>"
"""


def policy_template(policy: TeePolicy = DEFAULT_POLICY) -> str:
    """``policy`` as TOML with a comment on each key (what ``attest policy`` writes);
    :func:`~cocoon_p2p.attestation.policy.load_policy` reads it back to an equal policy."""
    lines = [
        "# TEE policy for cocoon clients and gateways (--tee-policy FILE): which workers",
        "# count as confidential. Every key is optional; unknown keys are errors.",
    ]
    for line in policy.to_toml().splitlines():
        comment = _COMMENTS.get(line.split(" = ", 1)[0])
        if comment is not None:
            lines += ["", comment]
        lines.append(line)
    text = "\n".join(lines) + "\n"
    return text + (_IMAGES if not policy.images else "")


def _policy(args: argparse.Namespace) -> int:
    text = policy_template()
    if args.out is None:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists (--force overwrites it)")
    try:
        out.write_text(text)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the policy: {exc.strerror or exc}") from exc
    print(f"wrote {out}", file=sys.stderr)
    return 0
