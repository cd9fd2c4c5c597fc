"""What a client accepts as a confidential worker: the TEE policy, read from TOML (pure).

An operator writes (every key optional; unknown keys are errors)::

    tee = "tdx"                          # the only TEE verified today
    accepted_status = ["UpToDate"]       # TCB statuses accepted
    accepted_advisories = []             # Intel advisory IDs accepted (e.g. "INTEL-SA-00615")
    allow_debug = false                  # a debuggable TD exposes its memory: never in production
    max_evidence_age_s = 86400           # older evidence is asked again
    verdict_ttl_s = 3600                 # how long a verdict stands before the peer is asked again

    [images.my-inference-image]          # none listed: any image passes (measurements reported)
    mr_td = "91eb2b44..."                # 96 hex digits each; an absent register matches anything
    rt_mr0 = "..."
    rt_mr1 = "..."
    rt_mr2 = "..."
    rt_mr3 = "..."

Statuses other than UpToDate (``SWHardeningNeeded``, ``ConfigurationNeeded``,
``ConfigurationAndSWHardeningNeeded``, ``OutOfDate``...) are opt-in, and each
advisory that comes with them must be listed too: accepting a platform means
accepting named, known weaknesses, not whatever the next one is.

Two keys exist for tests only and say so: ``insecure_skip_binding_for_tests``
(accept a quote whose REPORTDATA is not the peer's binding, so a test can
present a real sample quote) and ``insecure_fixed_time_for_tests`` (judge
collateral as of that unix time). A policy with either is never the default
and :attr:`TeePolicy.insecure` says so, for logs.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon_p2p.core.errors import ConfigError

REGISTERS = ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3")
REGISTER_HEX = 96  # 48 bytes
TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)
_KEYS = frozenset(
    {
        "tee",
        "accepted_status",
        "accepted_advisories",
        "allow_debug",
        "max_evidence_age_s",
        "verdict_ttl_s",
        "images",
        "insecure_skip_binding_for_tests",
        "insecure_fixed_time_for_tests",
    }
)


@dataclass(frozen=True)
class ImageMeasurements:
    """One approved image: the registers that must match (absent ones match anything)."""

    name: str
    registers: dict[str, bytes]

    def matches(self, measured: dict[str, bytes]) -> bool:
        return all(measured.get(k) == v for k, v in self.registers.items())


@dataclass(frozen=True)
class TeePolicy:
    """A client's rules for accepting a worker as confidential. :data:`DEFAULT_POLICY`:
    TDX, UpToDate only, no debug TDs, any image."""

    tee: str = "tdx"
    accepted_status: frozenset[str] = frozenset({"UpToDate"})
    accepted_advisories: frozenset[str] = frozenset()
    allow_debug: bool = False
    max_evidence_age_s: float = 86400.0
    verdict_ttl_s: float = 3600.0
    images: tuple[ImageMeasurements, ...] = ()
    insecure_skip_binding_for_tests: bool = False
    insecure_fixed_time_for_tests: int | None = None
    source: str = field(default="(default)", compare=False)

    @property
    def insecure(self) -> bool:
        return self.insecure_skip_binding_for_tests or self.insecure_fixed_time_for_tests is not None

    def image_for(self, measured: dict[str, bytes]) -> str | None:
        """The name of the approved image these registers match; "" when the policy names
        no images (any passes); None when it names some and none matches."""
        if not self.images:
            return ""
        return next((i.name for i in self.images if i.matches(measured)), None)

    def to_toml(self) -> str:
        """The policy as TOML that :func:`load_policy` reads back to an equal policy."""
        lines = [
            f'tee = "{self.tee}"',
            f"accepted_status = {_toml_list(sorted(self.accepted_status))}",
            f"accepted_advisories = {_toml_list(sorted(self.accepted_advisories))}",
            f"allow_debug = {str(self.allow_debug).lower()}",
            f"max_evidence_age_s = {self.max_evidence_age_s:g}",
            f"verdict_ttl_s = {self.verdict_ttl_s:g}",
        ]
        if self.insecure_skip_binding_for_tests:
            lines.append("insecure_skip_binding_for_tests = true")
        if self.insecure_fixed_time_for_tests is not None:
            lines.append(f"insecure_fixed_time_for_tests = {self.insecure_fixed_time_for_tests}")
        for image in self.images:
            lines += ["", f'[images."{image.name}"]']
            lines += [f'{k} = "{v.hex()}"' for k, v in image.registers.items()]
        return "\n".join(lines) + "\n"


DEFAULT_POLICY = TeePolicy()


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def load_policy(path: Path) -> TeePolicy:
    """Read a policy file. ConfigError names the file and the key for anything wrong."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the TEE policy: {exc}") from exc
    return parse_policy(data, source=str(path))


def parse_policy(data: dict[str, Any], *, source: str = "(inline)") -> TeePolicy:
    """A policy from already-parsed TOML. ConfigError for unknown keys and bad values."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {why}")

    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
    tee = data.get("tee", "tdx")
    if tee != "tdx":
        raise bad("tee", f"only 'tdx' is verified, not {tee!r}")
    statuses = _strings(data.get("accepted_status", ["UpToDate"]), "accepted_status", bad)
    for s in statuses:
        if s not in TCB_STATUSES:
            raise bad("accepted_status", f"unknown TCB status {s!r} (known: {', '.join(sorted(TCB_STATUSES))})")
    if "Revoked" in statuses:
        raise bad("accepted_status", "a revoked platform is never accepted")
    advisories = _strings(data.get("accepted_advisories", []), "accepted_advisories", bad)
    for key in ("allow_debug", "insecure_skip_binding_for_tests"):
        if not isinstance(data.get(key, False), bool):
            raise bad(key, "expected true or false")
    ages = {}
    for key, default in (("max_evidence_age_s", 86400.0), ("verdict_ttl_s", 3600.0)):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise bad(key, f"expected a positive number of seconds, not {value!r}")
        ages[key] = float(value)
    fixed = data.get("insecure_fixed_time_for_tests")
    if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int) or fixed <= 0):
        raise bad("insecure_fixed_time_for_tests", "expected a unix time in seconds")
    return TeePolicy(
        tee=tee,
        accepted_status=frozenset(statuses),
        accepted_advisories=frozenset(advisories),
        allow_debug=data.get("allow_debug", False),
        max_evidence_age_s=ages["max_evidence_age_s"],
        verdict_ttl_s=ages["verdict_ttl_s"],
        images=_images(data.get("images", {}), bad),
        insecure_skip_binding_for_tests=data.get("insecure_skip_binding_for_tests", False),
        insecure_fixed_time_for_tests=fixed,
        source=source,
    )


def _strings(value: Any, key: str, bad: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(key, "expected a list of strings")
    return list(value)


def _images(value: Any, bad: Any) -> tuple[ImageMeasurements, ...]:
    if not isinstance(value, dict):
        raise bad("images", "expected tables [images.NAME]")
    out = []
    for name, regs in value.items():
        where = f"images.{name}"
        if not isinstance(regs, dict) or not regs:
            raise bad(where, f"expected at least one of {', '.join(REGISTERS)}")
        registers = {}
        for reg, hexed in regs.items():
            if reg not in REGISTERS:
                raise bad(f"{where}.{reg}", f"unknown register (known: {', '.join(REGISTERS)})")
            try:
                raw = bytes.fromhex(hexed) if isinstance(hexed, str) else b""
            except ValueError:
                raw = b""
            if len(raw) * 2 != REGISTER_HEX:
                raise bad(f"{where}.{reg}", f"expected {REGISTER_HEX} hex digits")
            registers[reg] = raw
        out.append(ImageMeasurements(name, registers))
    return tuple(out)
