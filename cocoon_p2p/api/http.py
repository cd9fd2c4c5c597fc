"""A small HTTP/1.1 server on trio + h11, for the gateway and ``/metrics``.

h11 does the protocol (sans-IO); this adapter reads bytes, feeds it, and writes
what it produces. Keep-alive, request bodies capped at ``MAX_BODY``, a deadline
for each request to arrive, and streamed (chunked) responses for server-sent
events. Bound to 127.0.0.1 by the callers: it is a local API, not a public one.
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

    @classmethod
    def of_json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode())


Handler = Callable[[Request], Awaitable[Response]]


class _TooLarge(Exception):
    pass


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
    body = bytearray()
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_BODY:
                raise _TooLarge
        elif isinstance(part, h11.EndOfMessage):
            break
        else:
            raise h11.RemoteProtocolError("unexpected event in a request body")
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    return Request(event.method.decode("ascii"), path, query, headers, bytes(body))


async def _respond(conn: h11.Connection, stream: trio.SocketStream, resp: Response) -> None:
    headers = [("content-type", resp.content_type), ("server", SERVER.decode()), *resp.headers]
    if resp.stream is None:
        headers.append(("content-length", str(len(resp.body))))
    h = [(k.encode(), v.encode()) for k, v in headers]
    await _send(conn, stream, h11.Response(status_code=resp.status, headers=h))
    if resp.stream is None:
        await _send(conn, stream, h11.Data(data=resp.body))
    else:
        async with aclosing(resp.stream) as chunks:  # closed even when the client goes away
            async for chunk in chunks:
                await _send(conn, stream, h11.Data(data=chunk))
    await _send(conn, stream, h11.EndOfMessage())


def error_response(status: int, message: str) -> Response:
    return Response.of_json({"error": {"message": message, "type": "http_error", "param": None, "code": None}}, status)


async def _serve_connection(handler: Handler, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    request = await _read_request(conn, stream)
            except _TooLarge:
                await _respond(conn, stream, error_response(413, f"request body over {MAX_BODY} bytes"))
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
