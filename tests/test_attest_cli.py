"""``cocoon-node attest`` as an operator runs it: real processes on the real sample evidence
(Intel TDX and SGX quotes with their collateral, tests/vectors/attestation)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cocoon_p2p.nodes import attest
from cocoon_p2p.nodes import config as config_mod
from cocoon_p2p.nodes.cli import _node_config

from cocoon_p2p.attestation.binding import report_data_for_peer
from cocoon_p2p.attestation.policy import DEFAULT_POLICY, load_policy
from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.core.identity import Identity, load_or_create_identity

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]
SAMPLES = Path(__file__).resolve().parent / "vectors" / "attestation"  # real quotes: see its README
SAMPLE_TIME = 1750331763  # the TDX sample's collateral is valid then
SGX_TIME = 1750334171
AFTER_COLLATERAL = 1760000000
MR_TD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
MEASUREMENT = "8ef444fda246f7e0d5f9a3ba0a2822ae0be7dbec5e321277d03b73b198fa2545"

slow = pytest.mark.slow  # starts the CLI (about 3 s of imports each time)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def verify(quote: str = "tdx_quote", *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "attest", "verify", str(SAMPLES / quote), "--collateral", str(SAMPLES / f"{quote}_collateral.json"), *extra
    )


@slow
def test_the_good_quote_passes_the_default_policy_with_its_fields_in_json() -> None:
    out = verify("tdx_quote", "--at", str(SAMPLE_TIME), "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["accepted"] and r["reason"] is None and r["tee"] == "tdx"
    assert r["status"] == "UpToDate" and r["advisories"] == [] and r["debug"] is False
    assert r["report_data"].startswith("9a9d48e7f6799642")
    assert r["registers"]["mr_td"] == MR_TD and set(r["registers"]) == {"mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3"}
    assert r["measurement"] == MEASUREMENT
    assert r["peer"] is None and r["bound"] is None  # no --peer: the binding is shown, not judged
    assert r["policy"] == "(default)" and r["image"] == ""


def image_policy(path: Path, mr_td: str) -> str:
    path.write_text(f'[images.llama-cvm]\nmr_td = "{mr_td}"\n')
    return str(path)


# (case, quote, extra args (SAME/OTHER: a policy naming the quote's image / another), exit status,
# first line, a later line)
CASES = [
    ("collateral expired", "tdx_quote", ["--at", str(AFTER_COLLATERAL)], 1, "refused (invalid)", "TCBInfo expired"),
    ("an SGX enclave", "sgx_quote", ["--at", str(SGX_TIME)], 1, "refused (wrong-tee)", "INTEL-SA-00615"),
    ("another image", "tdx_quote", ["--policy", "OTHER"], 1, "refused (measurement)", "none of the policy's images"),
    ("its image", "tdx_quote", ["--policy", "SAME"], 0, "accepted", "image        llama-cvm"),
]


@slow
@pytest.mark.parametrize(
    ("quote", "extra", "status", "head", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_verdicts_and_exit_status(
    tmp_path: Path, quote: str, extra: list[str], status: int, head: str, line: str
) -> None:
    policies = {
        "SAME": image_policy(tmp_path / "same.toml", MR_TD),
        "OTHER": image_policy(tmp_path / "other.toml", "00" * 48),
    }
    at = [] if "--at" in extra else ["--at", str(SAMPLE_TIME)]
    out = verify(quote, *at, *[policies.get(a, a) for a in extra])
    assert out.returncode == status, out.stdout + out.stderr
    assert out.stdout.startswith(head) and line in out.stdout and out.stderr == ""


@slow
def test_a_peer_other_than_the_quotes_is_not_bound() -> None:
    peer = Identity.generate()
    out = verify("tdx_quote", "--at", str(SAMPLE_TIME), "--peer", peer.peer_id_str, "--json")
    assert out.returncode == 1, out.stderr
    r = json.loads(out.stdout)
    assert r["reason"] == "not-bound" and r["bound"] is False
    assert r["expected_report_data"] == report_data_for_peer(peer.peer_id).hex() != r["report_data"]


@slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--policy", "POLICY"], "no_such_key"),  # named, not a traceback
        (["--collateral", "MISSING"], "cannot read the collateral"),
        (["--peer", "12D3KooWnot-a-peer"], "--peer"),
    ],
    ids=["unknown policy key", "unreadable collateral", "bad peer id"],
)
def test_usage_and_config_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    (tmp_path / "p.toml").write_text("no_such_key = 1\n")
    files = {"POLICY": str(tmp_path / "p.toml"), "MISSING": str(tmp_path / "missing.json")}
    out = verify("tdx_quote", "--at", str(SAMPLE_TIME), *[files.get(a, a) for a in args])
    assert out.returncode == 2, out.stdout + out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""


@slow
def test_the_written_policy_reads_back_as_the_default_and_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "tee-policy.toml"
    out = cli("attest", "policy", "--out", str(path))
    assert out.returncode == 0, out.stderr
    assert load_policy(path) == DEFAULT_POLICY
    text = path.read_text()
    assert "# [images." in text and text.count("\n#") > 10  # commented, with an images example
    again = cli("attest", "policy", "--out", str(path))
    assert again.returncode == 2 and "--force" in again.stderr


@slow
def test_show_prints_the_binding_and_the_claim_of_a_file_quote(tmp_path: Path) -> None:
    data = tmp_path / "worker"
    identity = load_or_create_identity(data / "node.key")
    binding = report_data_for_peer(identity.peer_id).hex()
    out = cli("attest", "show", "--data-dir", str(data), "--tee", f"file:{SAMPLES / 'tdx_quote'}")
    assert out.returncode == 0, out.stderr
    assert identity.peer_id_str in out.stdout and binding in out.stdout
    assert f"tdx measurement {MEASUREMENT}" in out.stdout and MR_TD in out.stdout
    assert "NO: this quote was not made for this node's key" in out.stdout  # the sample is someone else's
    js = cli("attest", "show", "--data-dir", str(data), "--tee", f"file:{tmp_path / 'none'}", "--json")
    assert js.returncode == 1  # no evidence can be made: the reason says why
    r = json.loads(js.stdout)
    assert r["binding"] == binding and r["evidence"] is None and "cannot read the quote file" in r["error"]


# (case, config keys, what the error names): the worker's and client's TEE settings, in process
BAD_SETTINGS = [
    ("unknown source", {"tee": "sev-snp"}, "unknown quote source 'sev-snp'"),
    ("two collateral files", {"tee": "configfs-tsm", "tee_collateral": ["a.json", "b.json"]}, "one collateral file"),
    ("not collateral", {"tee": "configfs-tsm", "tee_collateral": [str(SAMPLES / "tdx_quote")]}, "collateral"),
    ("no lifetime", {"tee": "dstack", "tee_lifetime_s": -1.0}, "tee_lifetime_s"),
    ("bad policy file", {"tee_policy": str(SAMPLES / "README.md")}, "cannot read the TEE policy"),
    ("missing bundle file", {"tee_collateral": ["/nonexistent.json"]}, "cannot read the collateral"),
]


@pytest.mark.parametrize(("keys", "says"), [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS])
def test_bad_tee_settings_are_config_errors(keys: dict[str, object], says: str) -> None:
    cfg = config_mod.load(None, keys)
    with pytest.raises(ConfigError, match=re.escape(says)):
        attest.worker_attestation(cfg)
        attest.client_attestation(cfg)


def test_tee_settings_reach_the_node(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("allow_debug = true\n")
    toml = tmp_path / "worker.toml"
    collateral = SAMPLES / "tdx_quote_collateral.json"
    toml.write_text(f'tee = "file:{SAMPLES / "tdx_quote"}"\ntee_collateral = "{collateral}"\ntee_lifetime_s = 120\n')
    node = _node_config(config_mod.load(toml, {"tee_policy": str(policy)}))
    assert node.tee is not None and node.tee.collateral_file == collateral
    assert node.tee.refresh.lifetime_s == 120 and node.tee.refresh.refresh_before_s == 30  # a quarter of it
    assert node.attestation.policy.allow_debug and node.attestation.collateral_files == (collateral,)
    plain = _node_config(config_mod.load(None, {}))
    assert plain.tee is None and plain.attestation.policy == DEFAULT_POLICY and not plain.attestation.collateral_files
