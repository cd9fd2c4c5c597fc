"""Logging set-up for node programs: readable lines, or JSON with --log-json.

Two kinds of lines leave a node program:

- Log records, on stderr: ``HH:MM:SS LEVEL logger: message peer=... job=...`` in text mode,
  one JSON object per line under ``--log-json`` (``ts``, ``level``, ``logger``, ``msg``,
  the context fields of :mod:`cocoon_p2p.core.logfields` present on the record, ``exc``).
- The program's own output, through :func:`say`. Stdout lines (``listening <multiaddr>``,
  ``serving ...``, ``wallet <address>``...) are what scripts and tests read: they are printed
  as they are in both modes, and under ``--log-json`` also logged, so the JSON log tells the
  whole story. Stderr lines (the client's bill, its fund line) are printed as they are in
  text mode, and are JSON records instead under ``--log-json``: there every stderr line is
  one JSON object. Neither kind is subject to ``--log-level``: what the program says, it
  always says.
"""

from __future__ import annotations

import enum
import json
import logging
import sys
import time
from collections.abc import Mapping
from types import TracebackType

from cocoon_p2p.core.logfields import FIELDS

OUTPUT_LOGGER = "cocoon.output"  # the logger of what the program says (see say())
BASE_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")  # a JSON line's own keys: no field may take one

_output = logging.getLogger(OUTPUT_LOGGER)


class To(enum.Enum):
    """Where a line of the program's output goes."""

    STDOUT = "stdout"  # machine-read: printed in both modes (and logged under --log-json)
    STDERR = "stderr"  # for the operator: printed in text mode, a JSON record under --log-json


class _State:
    as_json = False
    bound: dict[str, object] = {}  # fields every JSON line carries (the node's own id)


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The context fields a log call passed with ``extra=`` (in :data:`FIELDS` order)."""
    return {name: record.__dict__[name] for name in FIELDS if record.__dict__.get(name) is not None}


def _plain(value: object) -> object:
    """A JSON value for anything: bytes as hex, what json cannot encode as its str()."""
    return value.hex() if isinstance(value, bytes) else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's context fields
    (plus those bound with :func:`bind`), and exc (or stack) when present."""

    def __init__(self, bound: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.bound = bound if bound is not None else _State.bound

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in {**self.bound, **record_fields(record)}.items():
            obj[name] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=_plain)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message`` then the record's context fields as ``key=value``
    (before a traceback, if any). Bound fields are left out: a terminal shows one node."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.converter = time.localtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extra = record_fields(record)
        return line + "".join(f" {k}={_text(v)}" for k, v in extra.items()) if extra else line


def _text(value: object) -> str:
    """A field's value in a text line: as it is, quoted when a space or '=' would make the
    ``key=value`` list ambiguous."""
    text = value.hex() if isinstance(value, bytes) else str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '="' for c in text) else text


def setup(level: str, as_json: bool) -> None:
    """Send every log record to stderr, as text or as JSON lines, from ``level`` up (program
    output through :func:`say` is not filtered). Under ``as_json`` Python's warnings and an
    uncaught exception are log records too, so no plain line reaches stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _output.setLevel(logging.DEBUG)  # what the program says is not a matter of --log-level
    _State.as_json = as_json
    logging.captureWarnings(as_json)
    sys.excepthook = _log_uncaught if as_json else sys.__excepthook__


def bind(context: Mapping[str, object]) -> None:
    """Add ``context`` (from :func:`~cocoon_p2p.core.logfields.fields`, e.g. the node's own
    id) to every JSON line from now on."""
    _State.bound.update(context)


def say(
    msg: str, context: Mapping[str, object] | None = None, *, to: To = To.STDOUT, level: int = logging.INFO
) -> None:
    """A line of the program's output (see the module docstring): printed to ``to`` as it
    is, except an stderr line under --log-json; logged (with ``context``, the fields of
    :func:`~cocoon_p2p.core.logfields.fields`) under --log-json."""
    if not (_State.as_json and to is To.STDERR):
        print(msg, file=sys.stderr if to is To.STDERR else sys.stdout, flush=True)
    if _State.as_json:
        _output.log(level, msg, extra=context)


def say_err(msg: str, context: Mapping[str, object] | None = None, *, level: int = logging.INFO) -> None:
    """:func:`say` on stderr: a line for the operator, printed as it is in text mode, a JSON
    record under --log-json."""
    say(msg, context, to=To.STDERR, level=level)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("cocoon.uncaught").critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))
