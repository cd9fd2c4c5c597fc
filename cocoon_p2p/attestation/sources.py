"""Where a worker's TDX quote comes from: the kernel's configfs-tsm, dstack's guest agent, or a file.

Every source answers one blocking call, ``quote(report_data) -> bytes``: the raw
quote whose REPORTDATA holds ``report_data`` (the 64 bytes of :mod:`.binding`).
Producing a quote takes the TD a few seconds (the host's quoting enclave signs
it), so callers run it in a thread, never on the event loop. A source that
cannot produce a quote raises :class:`~.errors.EvidenceUnavailable` with a
message an operator can act on.

An adapter: it touches the filesystem (configfs) and, through ``dstack-sdk``,
a Unix socket. Nothing here judges a quote; the verifier does.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cocoon_p2p.attestation.errors import EvidenceUnavailable
from cocoon_p2p.core.errors import ConfigError

log = logging.getLogger(__name__)

TEE_TDX = "tdx"
TDX_PROVIDER = "tdx_guest"  # configfs-tsm ``provider`` of the Intel TDX guest driver
TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
TSM_INBLOB_BYTES = 64  # TSM_REPORT_INBLOB_MAX; the TDX driver wants exactly this many (TDX_REPORTDATA_LEN)
DSTACK_REPORT_DATA_MAX = 64
SOURCE_NAMES = ("configfs-tsm", "dstack", "file:<path>")
_NEEDS_ROOT = "permission denied: quotes through configfs-tsm need root (or write access to the report root)"


class QuoteSource(Protocol):
    """A producer of hardware quotes for this machine."""

    name: str  # "configfs-tsm", "dstack", "file"
    tee: str  # "tdx"

    def quote(self, report_data: bytes) -> bytes:
        """The raw quote carrying ``report_data``. BLOCKING (seconds); raises EvidenceUnavailable."""
        ...


# --- configfs-tsm (Linux >= 6.7, Documentation/ABI/testing/configfs-tsm) ---------------------------


class TsmFs:
    """The four filesystem operations :class:`TsmReportSource` performs, as a seam for tests.

    On a real configfs, ``mkdir`` makes the kernel create the entry's attribute
    files, writing ``inblob`` bumps ``generation``, reading ``outblob`` asks the
    TEE for a report, and ``rmdir`` drops the entry with its attributes. A test
    subclass emulates that on an ordinary directory. Errors are the ``OSError``
    the calls raise; the source turns them into messages.
    """

    def mkdir(self, path: Path) -> None:
        """Create a report entry."""
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        """Remove a report entry."""
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        """Read a whole attribute."""
        with open(path, "rb", buffering=0) as f:
            return f.read()

    def write(self, path: Path, data: bytes) -> None:
        """Write an attribute in one write; configfs commits a binary attribute on close."""
        with open(path, "wb", buffering=0) as f:
            f.write(data)


def available(root: Path = TSM_REPORT_ROOT) -> str | None:
    """Why configfs-tsm at ``root`` cannot serve quotes, or None when it looks usable (for start-up logs).

    Looks only: a TSM provider of the wrong kind or a failing host shows up at
    the first :meth:`TsmReportSource.quote`.
    """
    if root.is_dir():
        if not os.access(root, os.W_OK | os.X_OK):
            return f"{root} is not writable by this user: quotes through configfs-tsm need root (or write access to it)"
        return None
    configfs = root.parent.parent  # /sys/kernel/config
    if configfs.is_dir() and not any(configfs.iterdir()):
        return f"configfs is not mounted at {configfs} (mount -t configfs none {configfs})"
    return (
        f"no {root}: the kernel lacks configfs-tsm (Linux 6.7+, CONFIG_TSM_REPORTS) "
        "or this is not a confidential guest (no tdx_guest driver)"
    )


def _entry_name() -> str:
    return f"cocoon-{os.getpid()}-{secrets.token_hex(8)}"


@dataclass
class TsmReportSource:
    """TDX quotes through the kernel's configfs-tsm report interface.

    One quote, one fresh entry: ``mkdir`` a uniquely named entry under ``root``,
    check that ``provider`` is ``tdx_guest``, note ``generation``, write the
    64-byte ``inblob``, read ``outblob`` (the quote), and refuse the result
    unless ``generation`` moved by exactly our one write (the ABI's guard
    against another writer racing us on the same entry). The entry is always
    removed. ``privlevel`` is left alone: the ABI shows it only for TSMs with
    privilege levels (SEV-SNP VMPLs), never for TDX. Needs root, or write access
    to ``root``.

    ``fs`` is the seam for tests (an emulated configfs tree); production code
    keeps the default.
    """

    root: Path = TSM_REPORT_ROOT
    fs: TsmFs = field(default_factory=TsmFs)
    name: str = field(default="configfs-tsm", init=False)
    tee: str = field(default=TEE_TDX, init=False)

    def available(self) -> str | None:
        """Why this source cannot serve quotes, or None when it looks usable."""
        return available(self.root)

    def quote(self, report_data: bytes) -> bytes:
        """Generate a TDX quote over ``report_data`` (exactly 64 bytes). BLOCKING: seconds."""
        if len(report_data) != TSM_INBLOB_BYTES:
            raise ValueError(f"TDX report data has exactly {TSM_INBLOB_BYTES} bytes, not {len(report_data)}")
        if not self.root.is_dir():
            raise EvidenceUnavailable(available(self.root) or f"no {self.root}")
        entry = self.root / _entry_name()
        try:
            self.fs.mkdir(entry)
        except OSError as e:
            raise self._refusal("creating the report entry", entry, e) from e
        try:
            return self._generate(entry, report_data)
        finally:
            try:
                self.fs.rmdir(entry)
            except OSError as e:  # a leaked entry costs a little kernel memory, never a wrong quote
                log.warning("configfs-tsm: could not remove %s: %s", entry, e)

    def _generate(self, entry: Path, report_data: bytes) -> bytes:
        provider = self._read(entry / "provider").decode("ascii", "replace").strip()
        if provider != TDX_PROVIDER:
            raise EvidenceUnavailable(
                f"configfs-tsm provider is {provider!r}, not {TDX_PROVIDER!r}: this guest is not an Intel TDX guest"
            )
        before = self._generation(entry)
        try:
            self.fs.write(entry / "inblob", report_data)
        except OSError as e:
            raise self._refusal("writing inblob", entry / "inblob", e) from e
        outblob = self._read(entry / "outblob")
        after = self._generation(entry)
        if after != before + 1:
            raise EvidenceUnavailable(
                f"configfs-tsm entry {entry} was written by someone else while we used it "
                f"(generation {before} -> {after}, expected {before + 1}); quote refused, try again"
            )
        if not outblob:
            raise EvidenceUnavailable(
                f"configfs-tsm returned an empty outblob at {entry}: the TDX driver made no quote"
            )
        return outblob

    def _read(self, path: Path) -> bytes:
        try:
            return self.fs.read(path)
        except OSError as e:
            raise self._refusal(f"reading {path.name}", path, e) from e

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation").decode("ascii", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise EvidenceUnavailable(f"configfs-tsm generation at {entry} is not a number: {text!r}") from None

    def _refusal(self, doing: str, path: Path, e: OSError) -> EvidenceUnavailable:
        """An operator's message for an ``OSError`` from configfs-tsm."""
        why = {
            errno.EACCES: _NEEDS_ROOT,
            errno.EPERM: _NEEDS_ROOT,
            errno.ENOENT: "no such file: configfs-tsm is missing or the entry vanished",
            errno.ENXIO: "no TSM provider is registered: not a confidential guest, or the tdx_guest driver is gone",
            errno.EIO: "the host failed the TDX GetQuote request (is its quote generation service, QGS, running?)",
            errno.ETIMEDOUT: "the host did not answer the TDX GetQuote request in time",
            errno.EBUSY: "an earlier quote request is still in flight at the host; try again later",
            errno.EINTR: "interrupted while waiting for the quote",
            errno.EINVAL: "the driver refused the request (TDX wants exactly 64 bytes of report data)",
        }.get(e.errno or 0, e.strerror or str(e))
        return EvidenceUnavailable(f"configfs-tsm: {doing} at {path} failed: {why}")


# --- dstack guest agent ----------------------------------------------------------------------------


@dataclass
class DstackSource:
    """TDX quotes from the dstack guest agent, through ``dstack-sdk`` (0.5.x).

    ``endpoint`` is the agent's Unix socket path or HTTP URL; None lets the SDK
    choose (``DSTACK_SIMULATOR_ENDPOINT``, then ``/var/run/dstack.sock`` and its
    siblings). The agent puts ``report_data`` (at most 64 bytes, zero-padded)
    into the quote's REPORTDATA as it is. ``timeout`` bounds the request; SDKs
    before 0.5.2 take none and use their own.
    """

    endpoint: str | None = None
    timeout: float = 30.0
    name: str = field(default="dstack", init=False)
    tee: str = field(default=TEE_TDX, init=False)

    def quote(self, report_data: bytes) -> bytes:
        """Ask the guest agent for a quote over ``report_data``. BLOCKING: seconds."""
        if not 0 < len(report_data) <= DSTACK_REPORT_DATA_MAX:
            raise ValueError(f"dstack report data has 1 to {DSTACK_REPORT_DATA_MAX} bytes, not {len(report_data)}")
        try:
            # Imported by name: an optional dependency, typed as Any whether installed or not.
            sdk = importlib.import_module("dstack_sdk")
        except ImportError:
            raise EvidenceUnavailable("the dstack source needs the dstack SDK: pip install dstack-sdk") from None
        where = self.endpoint or "the default socket"
        try:
            try:
                client = sdk.DstackClient(self.endpoint, timeout=self.timeout)
            except TypeError:  # dstack-sdk < 0.5.2 has no timeout
                client = sdk.DstackClient(self.endpoint)
            response = client.get_quote(report_data)
            quote_hex = response.quote
        except FileNotFoundError as e:
            raise EvidenceUnavailable(f"dstack: no guest agent socket ({e}): is this a dstack CVM?") from e
        except Exception as e:  # httpx and pydantic errors: the SDK wraps none of them
            raise EvidenceUnavailable(f"dstack: GetQuote at {where} failed: {type(e).__name__}: {e}") from e
        try:
            quote = bytes.fromhex(quote_hex)
        except (TypeError, ValueError):
            raise EvidenceUnavailable(f"dstack: the guest agent at {where} returned a quote that is not hex") from None
        if not quote:
            raise EvidenceUnavailable(f"dstack: the guest agent at {where} returned an empty quote")
        return quote


# --- a fixed file ----------------------------------------------------------------------------------


@dataclass
class FileSource:
    """Serves the quote stored in ``quote_path``, whatever report data is asked for.

    For operators who replay evidence produced elsewhere (another tool inside
    the same TD) and for tests. It proves nothing about the binding unless the
    file was made for this peer, with :func:`.binding.report_data_for_peer` of
    this node's PeerId as REPORTDATA: a verifier refuses any other quote as
    not bound. The file is read on every call, so it can be replaced in place.
    """

    quote_path: Path
    name: str = field(default="file", init=False)
    tee: str = field(default=TEE_TDX, init=False)

    def quote(self, report_data: bytes) -> bytes:
        """The file's bytes (``report_data`` is ignored)."""
        try:
            data = self.quote_path.read_bytes()
        except OSError as e:
            raise EvidenceUnavailable(f"cannot read the quote file {self.quote_path}: {e.strerror or e}") from e
        if not data:
            raise EvidenceUnavailable(f"the quote file {self.quote_path} is empty")
        return data


def source_from_name(name: str, *, root: Path | None = None, endpoint: str | None = None) -> QuoteSource:
    """The source a CLI or config names: ``configfs-tsm``, ``dstack`` or ``file:<path>``.

    ``root`` applies to configfs-tsm (default :data:`TSM_REPORT_ROOT`), ``endpoint``
    to dstack. Raises ConfigError for an unknown name or an option that does not
    apply to the named source.
    """
    if root is not None and name != "configfs-tsm":
        raise ConfigError(f"the option root applies only to the configfs-tsm quote source, not {name!r}")
    if endpoint is not None and name != "dstack":
        raise ConfigError(f"the option endpoint applies only to the dstack quote source, not {name!r}")
    if name == "configfs-tsm":
        return TsmReportSource(root=root if root is not None else TSM_REPORT_ROOT)
    if name == "dstack":
        return DstackSource(endpoint=endpoint)
    if name.startswith("file:"):
        path = name.removeprefix("file:")
        if not path:
            raise ConfigError("the file quote source needs a path: file:<path>")
        return FileSource(Path(path).expanduser())
    raise ConfigError(f"unknown quote source {name!r}; known: {', '.join(SOURCE_NAMES)}")
