"""The engine's HTTP client against a real local HTTP server (threads, 127.0.0.1): status
mapping, timeouts, refused connections, and a close from another thread that wakes a
blocked read and drops the connection the server was streaming on."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.execution.engine import EngineError, EngineFault, EngineGeneration
from cocoon_p2p.execution.engine_http import HttpEngine


class FakeEngine(BaseHTTPRequestHandler):
    """Streams a chunk every 20 ms until the client leaves; other routes from ``routes``."""

    routes: dict[str, tuple[int, Any]] = {}
    dropped = threading.Event()
    bodies: list[Any] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/slow":
            time.sleep(1.0)
        status, body = self.routes.get(self.path, (404, {"detail": "Not Found"}))
        self._json(status, body)

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        FakeEngine.bodies.append(json.loads(self.rfile.read(length)))
        if self.path != "/v1/completions":
            status, body = self.routes.get(self.path, (404, None))
            return self._json(status, body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for i in range(500):
                chunk = {"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:  # the client closed: what an engine notices, then stops generating
            FakeEngine.dropped.set()

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client gave up (the timeout test)
            pass


@pytest.fixture
def engine() -> Iterator[HttpEngine]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)
    server.daemon_threads = True
    FakeEngine.dropped = threading.Event()
    FakeEngine.bodies = []
    FakeEngine.routes = {
        "/v1/models": (200, {"data": [{"id": "m", "owned_by": "vllm", "max_model_len": 4096}]}),
        "/v1/bad": (400, {"error": {"message": "prompt too long"}}),
        "/v1/boom": (500, {"detail": "engine crashed"}),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpEngine(f"http://127.0.0.1:{server.server_address[1]}/v1", read_timeout_s=5.0)
    finally:
        server.shutdown()
        server.server_close()


def test_requests_and_status_codes(engine: HttpEngine) -> None:
    assert engine.request("GET", "/models", timeout_s=2)[1]["data"][0]["id"] == "m"
    assert engine.request("GET", "/health", root=True, timeout_s=2)[0] == 404
    stream = engine.stream("/bad", {"prompt": "x"})
    with pytest.raises(EngineError) as info:
        stream.open()
    assert info.value.fault is EngineFault.REJECTED and "prompt too long" in str(info.value)
    stream = engine.stream("/boom", {})
    with pytest.raises(EngineError) as info:
        stream.open()
    assert info.value.code == "backend" and "engine crashed" in str(info.value)


def test_timeout_and_refused(engine: HttpEngine) -> None:
    with pytest.raises(EngineError) as info:
        engine.request("GET", "/slow", timeout_s=0.2)
    assert info.value.fault is EngineFault.TIMEOUT
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError) as info:
        HttpEngine(f"http://127.0.0.1:{port}/v1").request("GET", "/models", timeout_s=1)
    assert info.value.fault is EngineFault.UNREACHABLE and info.value.code == "backend"


def test_close_from_another_thread_wakes_the_read_and_drops_the_connection(engine: HttpEngine) -> None:
    gen = EngineGeneration(engine.stream("/completions", {"prompt": "p"}), prompt="p", max_tokens=1000)
    assert gen.next_step() is not None  # connected, streaming
    outcome: list[BaseException | None] = []

    def drain() -> None:
        try:
            while gen.next_step() is not None:
                pass
            outcome.append(None)
        except BaseException as exc:  # noqa: B036  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=drain)
    reader.start()
    time.sleep(0.1)
    t0 = time.perf_counter()
    gen.close()
    reader.join(timeout=5)
    woke_s = time.perf_counter() - t0
    assert not reader.is_alive()
    (exc,) = outcome
    assert isinstance(exc, EngineError) and exc.fault is EngineFault.CLOSED
    assert FakeEngine.dropped.wait(5), "the server kept streaming to a closed connection"
    print(f"close() woke the blocked read in {woke_s * 1000:.1f} ms")


def test_closed_before_sent_sends_nothing(engine: HttpEngine) -> None:
    stream = engine.stream("/completions", {"prompt": "p"})
    stream.close()
    with pytest.raises(EngineError) as info:
        stream.open()
    assert info.value.fault is EngineFault.CLOSED
    assert FakeEngine.bodies == []


@pytest.mark.parametrize("url", ["ftp://x/v1", "127.0.0.1:8000", "http:///v1"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        HttpEngine(url)
