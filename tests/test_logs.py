"""Log lines of the node programs: context fields (peer, job, channel...) as JSON keys or a
``key=value`` suffix, and ``--log-json`` covering every stderr line of a real worker."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cocoon_p2p.nodes import logs

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.logfields import FIELDS, fields

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]
PEER = Identity.generate().peer_id
PEER_STR = fields(peer=PEER)["peer"]


class Opaque:
    """A value json cannot encode."""

    def __str__(self) -> str:
        return "opaque!"


def test_fields_print_ids_and_leave_out_what_is_unknown() -> None:
    assert fields() == {}
    got = fields(peer=PEER, job=7, channel=0xABC, model=b"\x01\x02", addr="/ip4/1.2.3.4/tcp/1", nanoton=0)
    assert got == {"peer": PEER_STR, "job": 7, "channel": "abc", "model": "0102", "addr": "/ip4/1.2.3.4/tcp/1",
                   "nanoton": 0}  # fmt: skip
    assert isinstance(PEER_STR, str) and PEER_STR.startswith("12D3KooW")
    assert fields(peer=b"", channel="", wallet="EQx") == {"wallet": "EQx"}  # an id not known yet: left out
    assert list(fields(nanoton=1, node="n", peer="p")) == ["node", "peer", "nanoton"]  # FIELDS order
    assert set(FIELDS).isdisjoint(logs.BASE_KEYS)  # a field never takes ts, level, msg...


def _exc_info() -> Any:
    try:
        raise ValueError("boom")
    except ValueError:
        return sys.exc_info()


# (case, extra, exc_info, JSON keys beyond ts/level/logger/msg, text suffix)
CASES: list[tuple[str, dict[str, object] | None, bool, dict[str, object], str]] = [
    ("no fields", None, False, {}, ""),
    (
        "fields",
        fields(peer=PEER, job=7, channel=0xABC, nanoton=5),
        False,
        {"peer": PEER_STR, "job": 7, "channel": "abc", "nanoton": 5},
        f" peer={PEER_STR} job=7 channel=abc nanoton=5",
    ),
    (
        "not serialisable: made strings",
        {"peer": Opaque(), "nanoton": Decimal("1.5"), "model": b"\xff"},
        False,
        {"peer": "opaque!", "model": "ff", "nanoton": "1.5"},
        " peer=opaque! model=ff nanoton=1.5",
    ),
    (
        "a space or '=' is quoted in text",
        {"addr": "a b", "wallet": "k=v"},
        False,
        {"addr": "a b", "wallet": "k=v"},
        ' addr="a b" wallet="k=v"',
    ),
    ("unknown extras are not fields", {"ts": "early", "level": "fake", "user": "x"}, False, {}, ""),
    ("exc", fields(job=3), True, {"job": 3}, " job=3"),
]


def _emit(formatter: logging.Formatter, extra: dict[str, object] | None, exc: bool) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.Logger("cocoon.test")  # not registered: no root handlers, no level from elsewhere
    logger.addHandler(handler)
    logger.info("job %s done", "X", extra=extra, exc_info=_exc_info() if exc else None)
    return out.getvalue()


@pytest.mark.parametrize(("case", "extra", "exc", "keys", "suffix"), CASES, ids=[c[0] for c in CASES])
def test_json_formatter(
    case: str, extra: dict[str, object] | None, exc: bool, keys: dict[str, object], suffix: str
) -> None:
    line = _emit(logs.JsonFormatter(bound={}), extra, exc)
    assert line.count("\n") == 1  # one line, even with a traceback
    obj = json.loads(line)
    assert isinstance(obj.pop("ts"), float)
    assert obj.pop("level") == "info" and obj.pop("logger") == "cocoon.test" and obj.pop("msg") == "job X done"
    if exc:
        assert obj.pop("exc").startswith("Traceback") and "ValueError: boom" in line
    assert obj == keys


@pytest.mark.parametrize(("case", "extra", "exc", "keys", "suffix"), CASES, ids=[c[0] for c in CASES])
def test_text_formatter(
    case: str, extra: dict[str, object] | None, exc: bool, keys: dict[str, object], suffix: str
) -> None:
    first, *rest = _emit(logs.TextFormatter(), extra, exc).splitlines()
    assert first.endswith(f" INFO    cocoon.test: job X done{suffix}")  # the fields before the traceback
    assert (rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom") if exc else rest == []


def test_bound_fields_are_on_every_json_line_and_a_record_s_own_win() -> None:
    bound = {"node": "me", "peer": "bound"}
    assert json.loads(_emit(logs.JsonFormatter(bound=bound), None, False))["node"] == "me"
    assert json.loads(_emit(logs.JsonFormatter(bound=bound), fields(peer="other"), False))["peer"] == "other"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """logs.setup() changes process-wide settings: put them back."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, logs._State.as_json, dict(logs._State.bound))
    yield
    root.handlers[:], level, sys.excepthook, logs._State.as_json, bound = saved
    root.setLevel(level)
    logs._State.bound.clear()
    logs._State.bound.update(bound)
    logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("as_json", "to", "stdout", "stderr_json"),
    [
        (False, logs.To.STDOUT, "listening /x\n", False),  # printed; not repeated on stderr
        (False, logs.To.STDERR, "", False),  # printed on stderr as it is
        (True, logs.To.STDOUT, "listening /x\n", True),  # still printed for tools, and logged
        (True, logs.To.STDERR, "", True),  # only the JSON record
    ],
)
def test_say(
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
    as_json: bool,
    to: logs.To,
    stdout: str,
    stderr_json: bool,
) -> None:
    logs.setup("ERROR", as_json)  # what the program says is not filtered by --log-level
    logs.say("listening /x", fields(peer="p"), to=to)
    out, err = capsys.readouterr()
    assert out == stdout
    if not stderr_json:
        assert err == ("listening /x\n" if to is logs.To.STDERR else "")
        return
    obj = json.loads(err)
    assert obj["msg"] == "listening /x" and obj["peer"] == "p" and obj["logger"] == logs.OUTPUT_LOGGER


def test_json_mode_logs_warnings_and_uncaught_exceptions(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.setup("INFO", True)
    warnings.showwarning("old api", DeprecationWarning, "lib.py", 1)  # what warnings.warn ends in
    try:
        raise KeyError("lost")
    except KeyError:
        sys.excepthook(*sys.exc_info())
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert "old api" in lines[0]["msg"] and lines[0]["level"] == "warning"
    assert lines[1]["level"] == "critical" and "KeyError: 'lost'" in lines[1]["exc"]


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as a JSON object (fails on the first that is not one)."""
    out = []
    for line in text.splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict) and {"ts", "level", "logger", "msg"} <= obj.keys(), line
        out.append(obj)
    return out


@pytest.mark.slow  # runs cocoon-node worker with a real model
def test_a_worker_under_log_json_writes_only_json_to_stderr(tmp_path: Path) -> None:
    worker = subprocess.Popen(
        [*CLI, "worker", "--data-dir", str(tmp_path / "w"), "--model", "minilm", "--log-json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        said = []
        while line := worker.stdout.readline():  # stdout: the plain lines tools read, as before
            said.append(line.rstrip("\n"))
            if line.startswith("serving "):
                break
        # run_peer says "serving" a moment before it waits for signals; a SIGTERM in between
        # would kill it unhandled (no "stopping" lines): let it get there
        time.sleep(1.0)
    finally:
        worker.send_signal(signal.SIGTERM)
        rest, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-3000:]
    said += rest.splitlines()
    assert said[0].startswith("listening /ip4/127.0.0.1/tcp/")
    assert said[-2:] == ["stopping", "served 0 jobs, earned 0 nanoton"]
    me = said[0].rsplit("/p2p/", 1)[1]

    records = _json_lines(err)
    by_msg = {r["msg"]: r for r in records}
    listening = by_msg[said[0]]
    assert listening["peer"] == me and listening["addr"] == said[0].split()[1]
    serving = next(r for r in records if r["msg"].startswith("serving "))
    assert serving["peer"] == me and serving["model"] == "all-minilm-l6-v2"
    warning = next(r for r in records if r["msg"].startswith("warning: "))  # loopback only: said on stderr
    assert warning["level"] == "warning" and warning["peer"] == me
    assert by_msg["served 0 jobs, earned 0 nanoton"]["nanoton"] == 0
    # every line of the output is in the JSON log, and from the first on each names the node
    assert set(said) <= by_msg.keys()
    assert all(r["node"] == me for r in records[records.index(listening) :])


@pytest.mark.slow  # runs cocoon-node
def test_an_error_under_log_json_is_a_json_line_too(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "worker", "--data-dir", str(tmp_path / "w"), "--log-json", "--model", str(tmp_path / "none.onnx")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and out.stdout == ""
    records = _json_lines(out.stderr)
    assert records and records[-1]["level"] in ("error", "critical"), out.stderr[-2000:]
    assert "none.onnx" in records[-1]["msg"] + records[-1].get("exc", "")
