"""The HTTP layer under the gateway and /metrics: h11 over real sockets, bad input answered
and survived; the Prometheus exposition; the OpenAI request parsers."""

from __future__ import annotations

import json
import math

import pytest
import trio

from cocoon_p2p.api import openai as api
from cocoon_p2p.api.http import MAX_BODY, Request, Response, serve_http
from cocoon_p2p.core.metrics import Histogram, metric, parse, percentile, render


async def echo(req: Request) -> Response:
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    if req.path == "/stream":

        async def parts():  # type: ignore[no-untyped-def]
            for i in range(3):
                yield f"part{i};".encode()

        return Response(200, stream=parts(), content_type="text/plain")
    return Response.of_json({"method": req.method, "path": req.path, "query": req.query, "len": len(req.body)})


async def exchange(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        out = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


async def test_requests_keep_alive_streams_and_bad_input() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, echo, "127.0.0.1", 0)
        two = (
            b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        out = await exchange(port, two)  # two requests on one connection
        assert out.count(b"HTTP/1.1 200") == 2 and b'"query":"x=1","len":3' in out and b'"path":"/b"' in out
        out = await exchange(port, b"GET /stream HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert b"transfer-encoding: chunked" in out.lower() and b"part0;" in out and b"part2;" in out
        assert (await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400")
        big = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 10) + b"x" * (MAX_BODY + 10)
        assert (await exchange(port, big)).startswith(b"HTTP/1.1 413")
        out = await exchange(port, b"GET /boom HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 500") and b"RuntimeError" in out
        out = await exchange(port, b"GET /still-up HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200")  # the server survived all of the above
        nursery.cancel_scope.cancel()


def test_prometheus_exposition() -> None:
    h = Histogram(bounds=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    text = render(
        [
            metric("jobs_total", "counter", "Jobs", 3, outcome="ok"),
            metric("jobs_total", "counter", "Jobs", 1, outcome='we"ird'),
            metric("job_seconds", "histogram", "Latency", h),
        ]
    )
    assert text.count("# TYPE jobs_total counter") == 1
    assert 'jobs_total{outcome="ok"} 3' in text and 'jobs_total{outcome="we\\"ird"} 1' in text
    assert 'job_seconds_bucket{le="0.1"} 2' in text and 'job_seconds_bucket{le="1"} 3' in text
    assert 'job_seconds_bucket{le="+Inf"} 4' in text and "job_seconds_count 4" in text
    assert "job_seconds_sum 3.65" in text
    samples = parse(text)  # what `cocoon-node status` and the operator test read back
    assert samples['jobs_total{outcome="ok"}'] == 3 and samples["job_seconds_count"] == 4
    assert samples['job_seconds_bucket{le="+Inf"}'] == 4 and len(samples) == 7
    assert h.quantile(0.5) == 0.1 and h.quantile(1.0) == float("inf")


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"input": "x"},
        {"model": "m", "input": []},
        {"model": "m", "input": [1]},
        {"model": "m", "input": "x", "encoding_format": "int8"},
        {"model": "m", "input": ["x"] * (api.MAX_INPUTS + 1)},
        {"model": "m", "input": "x" * (api.MAX_TEXT + 1)},
    ],
)
def test_embedding_requests_are_checked(body: object) -> None:
    with pytest.raises(api.APIError) as err:
        api.parse_embeddings(body)
    assert err.value.status == 400 and err.value.body()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9},
    ],
)
def test_chat_requests_are_checked(body: object) -> None:
    with pytest.raises(api.APIError):
        api.parse_chat(body)


def test_chat_request_and_stream_chunk_shapes() -> None:
    req = api.parse_chat(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7, "stream": True,
         "stream_options": {"include_usage": True}}
    )  # fmt: skip
    assert req.max_tokens == 7 and req.stream and req.include_usage
    chunk = api.chat_chunk("id", 1, "m", delta={"content": "Hi"})
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    assert json.loads(chunk[6:])["choices"][0]["delta"] == {"content": "Hi"}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([3.0, 1.0, 2.0], 0) == 1 and percentile([7.0], 99) == 7
    assert math.isnan(percentile([], 50))


# ---- issue 15: hostile bodies to the gateway ----------------------------------------------------


def _post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


def _error_of(out: bytes) -> dict[str, object]:
    error = json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
    return dict(error)


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"", 0),
        (b'{"model": "m", "input": ["a", "b"]}', 2),
        (b'["[[[[", {"a": [1]}]', 3),  # brackets in strings do not nest
        (b'["\\"[[[", 1]', 1),  # nor after an escaped quote
        (b'["\\\\", [1]]', 2),  # an escaped backslash ends no string
        (b"[" * 100 + b"]" * 100, 100),
        (b"[" * 100, 100),  # not JSON: still counted, then refused by the parser
    ],
)
def test_nesting_depth_is_found_without_parsing(body: bytes, depth: int) -> None:
    assert api.nesting_depth(body) == depth


async def test_the_gateway_answers_deep_json_400_and_huge_bodies_413_before_parsing() -> None:
    from cocoon_p2p.api.gateway import Gateway
    from cocoon_p2p.node import Node

    from .netutil import fast_config

    async with Node(fast_config()) as node, trio.open_nursery() as nursery:
        gateway = Gateway(node, [], max_price_nanoton=1)  # a lone node: every request is refused before any job
        port = await nursery.start(gateway.serve, "127.0.0.1", 0)
        too_deep = api.MAX_JSON_DEPTH + 1
        for body in (
            b"[" * 100_000 + b"]" * 100_000,  # was a 500 RecursionError
            b"[" * 200_000,
            b'{"model": "m", "input": ' + b"[" * too_deep + b"]" * too_deep + b"}",
        ):
            for path in ("/v1/embeddings", "/v1/chat/completions"):
                out = await exchange(port, _post(path, body))
                assert out.startswith(b"HTTP/1.1 400"), out[:300]
                error = _error_of(out)
                assert error["type"] == "invalid_request_error" and error["code"] == "json_too_deep"
        out = await exchange(port, _post("/v1/embeddings", b'{"model": "m", "input": "x"}'))
        assert out.startswith(b"HTTP/1.1 404") and _error_of(out)["code"] == "model_not_found"  # parsed, shallow
        # A body over the limit is refused from its Content-Length, before a byte of it is read.
        head = b"POST /v1/embeddings HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        out = await exchange(port, head)
        assert out.startswith(b"HTTP/1.1 413") and _error_of(out)["code"] == "request_too_large"
        out = await exchange(port, b"GET /v1/nothing HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 404")  # still up
        nursery.cancel_scope.cancel()
