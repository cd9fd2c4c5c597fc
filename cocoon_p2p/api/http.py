"""A small HTTP/1.1 server on trio + h11, for the gateway and ``/metrics``.

h11 does the protocol (sans-IO); this adapter reads bytes, feeds it, and writes
what it produces. Keep-alive, request bodies capped at ``MAX_BODY`` (a larger Content-Length is
answered 413 before the body is read), a deadline
for each request to arrive, and streamed (chunked) responses for server-sent
events: a response's body may come from an async generator (``Response.stream``) or from
a writer (``Response.writer``), a function handed a :class:`ResponseSink` that runs in the
connection's task, so it may open nurseries (the gateway runs a request's jobs there) and
still choose its status after work has begun. A client that goes away is noticed on the
next write (trio.BrokenResourceError inside the writer, however deeply grouped), which
ends the writer and closes the connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

log = logging.getLogger(__name__)
MAX_BODY = 4 << 20
REQUEST_TIMEOUT_S = 30.0  # to receive one whole request
LINGER_S = 5.0  # how long a refused body is read and dropped before the connection is closed
SERVER = b"cocoon-p2p"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    stream: AsyncGenerator[bytes, None] | None = None  # chunks sent as they come (body is ignored)
    headers: list[tuple[str, str]] = field(default_factory=list)
    writer: Writer | None = None  # writes the whole response itself (body and stream are ignored)

    @classmethod
    def of_json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode())


Handler = Callable[[Request], Awaitable[Response]]


class ResponseSink:
    """Where a :attr:`Response.writer` writes: either one whole :meth:`respond`, or a
    :meth:`start` (the head of a chunked response) followed by :meth:`send` calls. A write
    after the client left raises trio.BrokenResourceError (or ClosedResourceError)."""

    def __init__(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        self._conn, self._stream = conn, stream
        self.status: int | None = None  # of the response begun, once begun
        self.streaming = False
        self._held = bytearray()  # the head and pieces waiting to go out with the next piece

    async def respond(self, response: Response) -> None:
        """Answer with a whole response (only before anything was sent)."""
        self._begin(response.status)
        await _respond(self._conn, self._stream, response)

    async def start(
        self, status: int = 200, *, content_type: str = "application/json", headers: list[tuple[str, str]] | None = None
    ) -> None:
        """Begin a streamed (chunked) response: its head goes out with the first piece
        (one write, one segment: each write may cost a wake-up of the client on a loaded host)."""
        self._begin(status)
        self.streaming = True
        self._held += self._conn.send(_head(status, content_type, headers or [], None)) or b""

    async def send(self, data: bytes, *, more: bool = False) -> None:
        """One piece of the body begun by :meth:`start`; ``more``: another follows at once,
        so this one waits to go out with it."""
        if not self.streaming:
            raise RuntimeError("send() before start()")
        self._held += self._conn.send(h11.Data(data=data)) or b""
        if not more:
            await self.flush()

    async def flush(self) -> None:
        """Send what is held."""
        if self._held:
            data, self._held = bytes(self._held), bytearray()
            await self._stream.send_all(data)

    async def end(self) -> None:
        """End a streamed response (what is held goes out with its end)."""
        self._held += self._conn.send(h11.EndOfMessage()) or b""
        await self.flush()

    def _begin(self, status: int) -> None:
        if self.status is not None:
            raise RuntimeError("the response was already begun")
        self.status = status


Writer = Callable[[ResponseSink], Awaitable[None]]


class _TooLarge(Exception):
    """The request's body is over MAX_BODY; ``unread``: how much of it the client may still send."""

    def __init__(self, unread: int) -> None:
        super().__init__(unread)
        self.unread = unread


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            await _send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
        data = await stream.receive_some(65536)
        conn.receive_data(data)


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
    event = await _next_event(conn, stream)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise h11.RemoteProtocolError("expected a request")
    declared = dict(event.headers).get(b"content-length")  # h11 has checked it is a number
    if declared is not None and int(declared) > MAX_BODY:
        raise _TooLarge(int(declared))  # answered before a byte of the body is read
    body = bytearray()
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_BODY:
                raise _TooLarge(int(declared) - len(body) if declared is not None else MAX_BODY)
        elif isinstance(part, h11.EndOfMessage):
            break
        else:
            raise h11.RemoteProtocolError("unexpected event in a request body")
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    return Request(event.method.decode("ascii"), path, query, headers, bytes(body))


def _head(status: int, content_type: str, extra: list[tuple[str, str]], length: int | None) -> h11.Response:
    headers = [("content-type", content_type), ("server", SERVER.decode()), *extra]
    if length is not None:
        headers.append(("content-length", str(length)))
    return h11.Response(status_code=status, headers=[(k.encode(), v.encode()) for k, v in headers])


def _client_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (a group: every leaf) says the client went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(e) for e in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | ConnectionError)


async def _watch(conn: h11.Connection, stream: trio.SocketStream, gone: trio.CancelScope) -> None:
    """While a writer runs: read what the client sends (kept for h11's next cycle), and
    cancel ``gone`` when it closes the connection, so a writer waiting for work (a job's
    first token) notices a client that left before its next write would have."""
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            gone.cancel()
            return
        conn.receive_data(data)


async def _write(conn: h11.Connection, stream: trio.SocketStream, writer: Writer) -> None:
    sink = ResponseSink(conn, stream)
    try:
        async with trio.open_nursery() as nursery:
            watched = trio.CancelScope()
            nursery.start_soon(_watch, conn, stream, watched)
            with watched:
                await writer(sink)
            nursery.cancel_scope.cancel()
        if watched.cancelled_caught:
            raise trio.BrokenResourceError("the client went away")
    except BaseException as exc:
        if _client_gone(exc):
            raise trio.BrokenResourceError("the client went away") from exc
        if not isinstance(exc, Exception):
            raise  # cancellation and the like
        log.exception("HTTP response writer failed")
        if sink.status is None:
            await _respond(conn, stream, error_response(500, f"internal error: {type(exc).__name__}"))
        return  # a response cut short: the connection is closed (h11 refuses a next cycle)
    if sink.status is None:
        await _respond(conn, stream, error_response(500, "internal error: no response was written"))
    elif sink.streaming:
        await sink.end()


async def _respond(conn: h11.Connection, stream: trio.SocketStream, resp: Response) -> None:
    if resp.writer is not None:
        return await _write(conn, stream, resp.writer)
    if resp.stream is None:  # head, body and end in one write: one syscall, one segment when small
        head = _head(resp.status, resp.content_type, resp.headers, len(resp.body))
        await stream.send_all(
            b"".join(conn.send(e) or b"" for e in (head, h11.Data(data=resp.body), h11.EndOfMessage()))
        )
        return
    await _send(conn, stream, _head(resp.status, resp.content_type, resp.headers, None))
    try:
        async with aclosing(resp.stream) as chunks:  # closed even when the client goes away
            async for chunk in chunks:
                await _send(conn, stream, h11.Data(data=chunk))
    except Exception as exc:
        if _client_gone(exc):
            raise
        log.exception("HTTP response stream failed")
        return  # cut short: the connection is closed (h11 refuses a next cycle)
    await _send(conn, stream, h11.EndOfMessage())


def error_response(status: int, message: str, *, kind: str = "http_error", code: str | None = None) -> Response:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return Response.of_json({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


async def _discard(stream: trio.SocketStream, unread: int) -> None:
    """After an early answer: tell the client we are done, then read and drop what it still
    sends (up to ``unread`` bytes, for ``LINGER_S``), so that closing with its bytes unread
    does not reset the connection before it has read the answer."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_S):
        while unread > 0 and (data := await stream.receive_some(65536)):
            unread -= len(data)


async def _serve_connection(handler: Handler, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    request = await _read_request(conn, stream)
            except _TooLarge as exc:
                too_large = f"request body over {MAX_BODY} bytes"
                await _respond(conn, stream, error_response(413, too_large, kind="invalid_request_error",
                                                            code="request_too_large"))  # fmt: skip
                await _discard(stream, exc.unread)
                return
            except (h11.RemoteProtocolError, trio.TooSlowError) as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(conn, stream, error_response(400, f"bad request: {exc}"))
                return
            if request is None:
                return
            try:
                response = await handler(request)
            except Exception as exc:  # a handler bug answers 500; the server goes on
                log.exception("HTTP handler failed")
                response = error_response(500, f"internal error: {type(exc).__name__}")
            await _respond(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, ConnectionError):
        return  # the client went away
    finally:
        await stream.aclose()


async def serve_http(handler: Handler, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; reports the bound port when started."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def one(stream: trio.SocketStream) -> None:
        await _serve_connection(handler, stream)

    await trio.serve_listeners(one, listeners)
