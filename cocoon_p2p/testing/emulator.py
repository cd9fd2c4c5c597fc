"""The real payment-channel contract run in-process with pytvm's TVM emulator.

For contract-level tests and the simulator: the same code hash as on chain,
executed by TON's own libemulator, without a chain. Two pytvm 0.0.14 defects are
handled here: ``EmulatorEngineC.default()`` imports pkg_resources (gone from new
setuptools), so the library is located directly; and its ctypes declarations
pass the contract balance and message value as 32-bit integers, truncating
anything above 4.29 TON, so they are redeclared as 64-bit.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytoniq_core import Cell, Slice

from cocoon_p2p.core.errors import CocoonError


class EmulatorError(CocoonError):
    """pytvm is missing or its emulator library cannot be loaded."""


def _engine() -> Any:
    try:
        import pytvm
        from pytvm.engine import EmulatorEngineC
    except ImportError as exc:
        raise EmulatorError("pytvm is not installed") from exc
    lib = next((Path(pytvm.__file__).parent / "engine").glob("libemulator*"), None)
    if lib is None:
        raise EmulatorError("pytvm ships no libemulator for this platform")
    engine = EmulatorEngineC(str(lib))
    engine.lib.tvm_emulator_set_c7.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.c_uint64,
        ctypes.c_char_p,
        ctypes.c_char_p,
    ]
    engine.lib.tvm_emulator_send_internal_message.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
    engine.emulator_set_verbosity_level(0)
    return engine


def _b64(cell: Cell) -> bytes:
    import base64

    return base64.b64encode(cell.to_boc()).decode().encode()


@dataclass
class Outcome:
    """One message's execution: exit code, gas, and the messages the contract sent."""

    exit_code: int
    gas_used: int
    payouts: list[tuple[str, int]] = field(default_factory=list)  # (destination, value)


class ContractEmulator:
    """One contract instance: code + data, a clock and a balance, updated per message."""

    def __init__(self, code: Cell, data: Cell, *, address: str, now: int, balance: int = 0) -> None:
        self.engine = _engine()
        self.code, self.data = code, data
        self.address, self.now, self.balance = address, now, balance

    def send(self, body: Cell, value: int) -> Outcome:
        """Deliver an internal message carrying ``value`` nanoton; keep the new data on success."""
        emu = self.engine.tvm_emulator_create(_b64(self.code), _b64(self.data), 0)
        try:
            self.balance += value
            self.engine.lib.tvm_emulator_set_c7(emu, self.address.encode(), self.now, self.balance, b"00" * 32, None)
            raw = self.engine.lib.tvm_emulator_send_internal_message(emu, _b64(body), value)
            res = json.loads(raw)
        finally:
            self.engine.tvm_emulator_destroy(emu)
        exit_code = int(res.get("vm_exit_code", -1))
        out = Outcome(exit_code, int(res.get("gas_used", 0)))
        if exit_code in (0, 1):
            self.data = Cell.one_from_boc(res["new_data"])
            out.payouts = self._payouts(res.get("actions"))
            self.balance -= sum(v for _, v in out.payouts)
        else:
            self.balance -= value  # bounced
        return out

    def get(self, method: str) -> list[Any]:
        """Run a get-method; its result stack."""
        from pytoniq_core.tlb import VmStack
        from pytvm.utils import get_method_id

        emu = self.engine.tvm_emulator_create(_b64(self.code), _b64(self.data), 0)
        try:
            self.engine.lib.tvm_emulator_set_c7(emu, self.address.encode(), self.now, self.balance, b"00" * 32, None)
            res = json.loads(
                self.engine.lib.tvm_emulator_run_get_method(emu, get_method_id(method), _b64(VmStack.serialize([])))
            )
        finally:
            self.engine.tvm_emulator_destroy(emu)
        if int(res.get("vm_exit_code", -1)) not in (0, 1):
            raise EmulatorError(f"{method} failed with exit code {res.get('vm_exit_code')}")
        return list(VmStack.deserialize(Slice.one_from_boc(res["stack"])))

    @staticmethod
    def _payouts(actions: str | None) -> list[tuple[str, int]]:
        if not actions:
            return []
        from pytoniq_core.tlb.transaction import OutList

        result = []
        for action in OutList.deserialize(Slice.one_from_boc(actions)):
            info = action.out_msg.info
            result.append((info.dest.to_str(is_user_friendly=False), int(info.value.grams)))
        return result
