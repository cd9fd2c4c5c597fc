"""The blocking HTTP client of an OpenAI-compatible engine (an :class:`~.engine.EngineTransport`).

Plain :mod:`http.client`, one connection per request (a local engine's connect costs
~0.1 ms, and a request that owns its connection can be cut off alone). Called from
worker threads, never on the event loop: nothing connects until a request is sent.
Every socket operation has a timeout (``connect_timeout_s`` to connect,
``read_timeout_s`` between two reads of a stream: keep-alive pings count).
:meth:`HttpEngineStream.close` may be called from another thread while a read
blocks: it shuts the socket down, so the read returns at once and the engine sees
the client leave (llama.cpp, vLLM and SGLang then stop generating that request).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from cocoon_p2p.core.errors import ConfigError

from .engine import EngineError, EngineFault, fault_for_status
from .engine_stream import error_message

READ_SIZE = 1 << 16
MAX_JSON_BYTES = 8 << 20  # a non-streamed answer (model lists, token counts, errors)


class HttpEngine:
    """An engine at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``); ``api_key``: sent as a Bearer token."""

    def __init__(
        self, base_url: str, *, api_key: str = "", connect_timeout_s: float = 5.0, read_timeout_s: float = 120.0
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"an engine URL is http(s)://HOST[:PORT]/v1, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.https else 80)
        self.base_path = url.path.rstrip("/")  # "/v1"
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _path(self, path: str, *, root: bool) -> str:
        return path if root else self.base_path + path

    def connect(self, timeout_s: float) -> http.client.HTTPConnection:
        """A new connection, connected (EngineError if it cannot be)."""
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=min(timeout_s, self.connect_timeout_s))
        try:
            conn.connect()
        except TimeoutError as exc:
            raise EngineError(EngineFault.TIMEOUT, f"engine {self.base_url}: connect timed out") from exc
        except OSError as exc:
            raise EngineError(EngineFault.UNREACHABLE, f"engine {self.base_url}: {exc}") from exc
        assert conn.sock is not None  # connected; for mypy
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(timeout_s)
        return conn

    def stream(self, path: str, body: dict[str, Any]) -> HttpEngineStream:
        return HttpEngineStream(self, self._path(path, root=False), json.dumps(body).encode())

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, root: bool = False, timeout_s: float
    ) -> tuple[int, Any]:
        conn = self.connect(timeout_s)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, self._path(path, root=root), body=data, headers=self.headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_JSON_BYTES)
        except TimeoutError as exc:
            raise EngineError(EngineFault.TIMEOUT, f"engine {self.base_url}{path}: no answer in {timeout_s} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(EngineFault.UNREACHABLE, f"engine {self.base_url}{path}: {exc!r}") from exc
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, None


class HttpEngineStream:
    """One streamed POST (an :class:`~.engine.EngineStream`)."""

    def __init__(self, engine: HttpEngine, path: str, body: bytes) -> None:
        self.engine = engine
        self.path = path
        self.body = body
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None  # ours: http.client hands it to the response and forgets it
        self._resp: http.client.HTTPResponse | None = None
        self._reading = False  # a read is under way (in some thread)
        self.closed = False

    def open(self) -> None:
        engine = self.engine
        conn = engine.connect(engine.read_timeout_s)
        with self._lock:  # a close() meanwhile must find the connection, or forbid it
            if self.closed:
                conn.close()
                raise EngineError(EngineFault.CLOSED, "closed before it was sent")
            self._conn, self._sock, self._reading = conn, conn.sock, True
        try:
            conn.request("POST", self.path, body=self.body, headers=engine.headers)
            resp = conn.getresponse()
        except TimeoutError as exc:
            raise self._lost(EngineFault.TIMEOUT, f"no answer in {engine.read_timeout_s} s") from exc
        except (OSError, AttributeError, http.client.HTTPException) as exc:  # AttributeError: a close() meanwhile
            raise self._lost(EngineFault.UNREACHABLE, repr(exc)) from exc
        finally:
            self._done_reading()
        with self._lock:
            self._resp = resp
        if resp.status >= 400:
            try:
                raw = resp.read(MAX_JSON_BYTES)
                message = error_message(json.loads(raw)) if raw else resp.reason
            except (OSError, ValueError, http.client.HTTPException):
                message = resp.reason
            self.close()
            raise EngineError(fault_for_status(resp.status), f"engine answered {resp.status}: {message}")

    def _lost(self, fault: EngineFault, why: str) -> EngineError:
        closed = self.closed
        self.close()
        if closed:
            return EngineError(EngineFault.CLOSED, "closed")
        return EngineError(fault, f"engine {self.engine.base_url}: {why}")

    def read(self) -> bytes:
        with self._lock:
            resp = self._resp
            if resp is None or self.closed:
                raise EngineError(EngineFault.CLOSED, "closed" if self.closed else "not open")
            self._reading = True
        try:
            return resp.read1(READ_SIZE)
        except TimeoutError as exc:
            raise self._lost(EngineFault.TIMEOUT, f"silent for {self.engine.read_timeout_s} s") from exc
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:  # a close() meanwhile
            raise self._lost(EngineFault.UNREACHABLE, f"stream lost: {exc!r}") from exc
        finally:
            self._done_reading()

    def _done_reading(self) -> None:
        with self._lock:
            self._reading = False
            release = self.closed
        if release:  # closed while we read: the socket is ours to let go of now
            self._release()

    def close(self) -> None:
        """Shut the socket down (a blocked read wakes; the engine sees us leave), then let it
        go, unless a read is under way in another thread: that read lets it go as it returns
        (http.client's objects must not be closed under a reader)."""
        with self._lock:
            self.closed = True
            sock, reading = self._sock, self._reading
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if not reading:
            self._release()

    def _release(self) -> None:
        with self._lock:
            conn, resp, self._conn, self._resp, self._sock = self._conn, self._resp, None, None, None
        if resp is not None:
            resp.close()
        if conn is not None:
            conn.close()
