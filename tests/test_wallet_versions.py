"""Wallets on pytoniq: what the tonsdk code made still loads at the same address and signs the
same messages; v4r2 and v5r1 wallets deploy and send (bodies, StateInits) on the local chain."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from pytoniq_core import Address, Cell, begin_cell

from cocoon_p2p.core.durable import StateFileDamaged
from cocoon_p2p.payments import messages as m
from cocoon_p2p.payments.chain import ChainError, Wallet, address_of, read_channel, state_init
from cocoon_p2p.payments.contract import payment_channel_code
from cocoon_p2p.payments.wallet import InvalidMnemonic, WalletContract, WalletVersion, check_mnemonic
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

TON = 1_000_000_000
FEE = TON // 20
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")

# Made by the tonsdk wallet code this module replaced (Wallet.load_or_create, tonsdk 1.0.15,
# v4r2), before it changed: every data directory holds such a file, and must keep its address.
OLD = (
    "amateur romance normal marriage huge stomach rescue insect athlete armed lottery weapon "
    "critic book camera surround okay scrap close black veteran nasty unveil glance"
).split()
OLD_ADDRESS = "0:9a0291e01fdbd46d56981e8b8086d14227a71a8e83674c97c5708721e55b5cad"
OLD_PUBLIC_KEY = "13d617107f115873e2344859e6e994248131705ececeba984805895fd5d15df5"
OLD_2 = (
    "myth spring squeeze kit weekend food now smooth west friend west famous cushion economy "
    "talent conduct exile vacant buyer sponsor salute army raw unique"
).split()
OLD_2_ADDRESS = "0:ecc252e9fef47d663f5d6ba65d6a8c9f7a37037e465765131d00e56fb9a06df9"
# tonsdk's messages for OLD, as cell hashes (BOC flags differ between libraries, cells do not):
# its deploy, and a transfer of 123456789 nanoton (bounceable) to 0:11..11 at seqno 7, valid
# until 1700000060, with a 96-bit body.
OLD_DEPLOY_HASH = "ed02d711236687e1113034cd403e188bf1f9eeaa947412355306345745ff4c97"
OLD_TRANSFER_HASH = "5ed476189a8c2929a85bac13fffb2f94f52f7389db915e4ce8b62249cdf77d5e"
# v5r1 addresses of the same keys, derived apart from pytoniq: @ton/crypto's key, @ton/ton's
# data layout (signature allowed, seqno, wallet id, key, no extensions) and @ton/core's hash.
V5R1_ADDRESSES = {
    False: "0:75cdc2f7c44bb28eb224e42ed6c240916791ea24bffb659fed507fb4e820aca3",  # mainnet, id 0x7fffff11
    True: "0:5098adb857e10d70f043e6116c6ea813a618076b2784a2e95bc9c926b5df2260",  # testnet, id 0x7ffffffd
}


def old_wallet_file(path: Path, words: list[str], **extra: object) -> Path:
    """A wallet.json as the tonsdk code wrote it (``extra`` adds or overrides keys)."""
    path.write_text(json.dumps({"mnemonic": words, "version": "v4r2", **extra}))
    os.chmod(path, 0o600)
    return path


# ---- compatibility with the tonsdk wallets ----


@pytest.mark.parametrize("words, address", [(OLD, OLD_ADDRESS), (OLD_2, OLD_2_ADDRESS)])
def test_a_wallet_made_by_the_tonsdk_code_loads_at_the_same_address(
    tmp_path: Path, words: list[str], address: str
) -> None:
    wallet = Wallet.load_or_create(old_wallet_file(tmp_path / "wallet.json", words))
    assert (wallet.address, wallet.version) == (address, WalletVersion.V4R2)
    assert Wallet.from_mnemonic(words).address == address
    assert json.loads((tmp_path / "wallet.json").read_text())["mnemonic"] == words  # left as it was
    # Older still: no version key; and asking for v5r1 does not convert a stored wallet.
    (tmp_path / "wallet.json").write_text(json.dumps({"mnemonic": words}))
    assert Wallet.load_or_create(tmp_path / "wallet.json", version=WalletVersion.V5R1).address == address


def test_v4r2_messages_are_the_cells_tonsdk_signed() -> None:
    wallet = Wallet.from_mnemonic(OLD)
    assert wallet.contract.public_key.hex() == OLD_PUBLIC_KEY
    assert SigningKey(wallet.secret_key[:32]).verify_key.encode().hex() == OLD_PUBLIC_KEY  # test_chain's use
    assert Cell.one_from_boc(wallet.deploy_message()).hash.hex() == OLD_DEPLOY_HASH
    body = begin_cell().store_uint(0x12345678, 32).store_uint(42, 64).end_cell()
    sent = wallet.transfer_message("0:" + "11" * 32, 123_456_789, 7, bounce=True, valid_until=1_700_000_060, body=body)
    assert Cell.one_from_boc(sent).hash.hex() == OLD_TRANSFER_HASH


@pytest.mark.parametrize("testnet", [False, True])
def test_v5r1_addresses_match_the_reference_implementation(testnet: bool) -> None:
    wallet = Wallet.from_mnemonic(OLD, WalletVersion.V5R1, testnet=testnet)
    assert wallet.address == V5R1_ADDRESSES[testnet]
    assert wallet.contract.wallet_id == WalletContract.default_wallet_id(WalletVersion.V5R1, testnet=testnet)


@pytest.mark.parametrize("version", list(WalletVersion))
def test_a_new_wallet_stores_its_version_and_id(tmp_path: Path, version: WalletVersion) -> None:
    path = tmp_path / "wallet.json"
    made = Wallet.load_or_create(path, version=version, testnet=True)
    stored = json.loads(path.read_text())
    assert (stored["version"], stored["wallet_id"]) == (version.value, made.contract.wallet_id)
    again = Wallet.load_or_create(path)  # a later run's defaults (v4r2, mainnet) change nothing
    assert (again.address, again.version) == (made.address, version)
    assert again.address == Wallet.from_mnemonic(stored["mnemonic"], version, testnet=True).address


# ---- bad mnemonics and files ----


@pytest.mark.parametrize(
    "words, problem",
    [
        (OLD[:23], "has 24 words, not 23"),
        ([*OLD[:2], "tonsdk", *OLD[3:]], "not in the mnemonic word list: 3: 'tonsdk'"),
        ([OLD[1], OLD[0], *OLD[2:]], "checksum"),  # two words swapped
    ],
)
def test_a_bad_mnemonic_is_a_clear_error(tmp_path: Path, words: list[str], problem: str) -> None:
    with pytest.raises(InvalidMnemonic, match=problem):
        check_mnemonic(words)
    with pytest.raises(InvalidMnemonic, match=problem):
        Wallet.from_mnemonic(words, WalletVersion.V5R1)
    path = old_wallet_file(tmp_path / "wallet.json", words)
    with pytest.raises(StateFileDamaged, match=f"wallet.json.*not a valid TON mnemonic.*{problem}"):
        Wallet.load_or_create(path)


@pytest.mark.parametrize(
    "extra, problem",
    [({"version": "v3r2"}, "unknown wallet version 'v3r2'"), ({"wallet_id": -1}, "not a 32-bit unsigned")],
)
def test_a_stored_wallet_of_an_unknown_kind_is_refused(tmp_path: Path, extra: dict[str, object], problem: str) -> None:
    path = old_wallet_file(tmp_path / "wallet.json", OLD, **extra)
    before = path.read_bytes()
    with pytest.raises(StateFileDamaged, match=problem):
        Wallet.load_or_create(path)
    assert path.read_bytes() == before  # never replaced


# ---- on the local chain ----


def _wallet(version: WalletVersion) -> Wallet:
    """v4r2: the wallet the tonsdk code made; v5r1: a wallet of the same keys."""
    return Wallet.from_mnemonic(OLD, version)


def _open_channel(chain: LocalChain, client: Wallet, worker: Wallet) -> str:
    """The payer's channel open: deploy with a StateInit and deposit, then the init message."""
    key_a, key_b = SigningKey(client.secret_key[:32]), SigningKey(worker.secret_key[:32])
    data = m.initial_data(
        channel_id=7,
        key_a=bytes(key_a.verify_key),
        key_b=bytes(key_b.verify_key),
        addr_a=Address(client.address),
        addr_b=Address(worker.address),
        quarantine_s=3600,
    )
    init = state_init(payment_channel_code(), data)
    channel = address_of(init)
    landed = client.transfer(chain, channel, TON + FEE, body=m.top_up(TON, 0), init=init)
    assert landed.succeeded and chain.state(channel) == "active"
    client.transfer(chain, channel, FEE, body=m.init_channel(7, TON, 0, key=key_a, is_a=True))
    return channel


@pytest.mark.slow
@needs_node
@pytest.mark.parametrize("version", list(WalletVersion))
def test_a_wallet_deploys_sends_bodies_and_state_inits(version: WalletVersion) -> None:
    with open_local_chain() as chain:
        wallet, worker = _wallet(version), chain.new_wallet(TON)
        chain.fund(wallet.address, 5 * TON)
        assert wallet.seqno(chain) == 0
        wallet.deploy(chain)
        assert chain.state(wallet.address) == "active" and wallet.seqno(chain) == 1

        comment = begin_cell().store_uint(0, 32).store_snake_string("hello").end_cell()
        fresh = Wallet.create()  # no code yet: the value must stay, so the message does not bounce
        landed = wallet.transfer(chain, fresh.address, TON // 10, body=comment)
        assert landed.in_value == TON // 10 and landed.in_op == 0 and chain.balance(fresh.address) == TON // 10
        assert wallet.seqno(chain) == 2

        channel = _open_channel(chain, wallet, worker)
        on_chain = read_channel(chain, channel)
        assert (on_chain.state, on_chain.balance_a, on_chain.addr_a) == (1, TON, wallet.address)
        assert wallet.seqno(chain) == 4


@pytest.mark.slow
@needs_node
@pytest.mark.parametrize("version", list(WalletVersion))
def test_transfers_expire_by_the_chain_clock_not_this_machines(version: WalletVersion) -> None:
    with open_local_chain() as chain:
        wallet, target = _wallet(version), Wallet.create()
        chain.fund(wallet.address, TON)
        wallet.deploy(chain)
        chain.advance(3600)  # a quarantine test's jump: the chain's clock is an hour ahead of ours
        stamped_here = wallet.transfer_message(
            target.address, 1, wallet.seqno(chain), bounce=False, valid_until=int(time.time()) + 60
        )
        with pytest.raises(ChainError, match="not accepted"):
            chain.send_boc(stamped_here)
        wallet.transfer(chain, target.address, TON // 10)  # stamped by the chain's clock
        assert chain.balance(target.address) == TON // 10 and wallet.seqno(chain) == 2
