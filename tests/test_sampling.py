"""Sampling parameters: their checks and wire form, the sampler, stop strings in the token
stream, and (slow) seeded, stopped and logprob'd generations by SmolLM2 over the network."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cocoon_p2p.core.errors import MalformedMessage
from cocoon_p2p.core.wire import pack
from cocoon_p2p.execution.generation import TokenStream
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.sampling import GREEDY, Pick, Sampler, Sampling, TokenLogprob, stop_prefix_len
from cocoon_p2p.jobs import frames as jf


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.1},
        {"seed": -1},
        {"seed": 2**63},
        {"presence_penalty": 2.1},
        {"frequency_penalty": float("inf")},
        {"stop": ("a", "b", "c", "d", "e")},
        {"stop": ("",)},
        {"stop": ("x" * 65,)},
        {"logprobs": 21},
        {"logprobs": -1},
    ],
)
def test_out_of_range_parameters_are_bad_input(kwargs: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage) as err:
        Sampling(**kwargs)
    assert err.value.code == jf.BAD_INPUT


def test_the_wire_form_round_trips_in_thousandths() -> None:
    s = Sampling(temperature=0.7, top_p=0.9, seed=42, presence_penalty=-0.5, frequency_penalty=1.25,
                 stop=("\n\n", "END"), logprobs=3)  # fmt: skip
    assert Sampling.from_wire(s.to_wire()) == s
    assert Sampling.from_wire(GREEDY.to_wire()) == GREEDY and GREEDY.plain and GREEDY.greedy
    assert not Sampling(stop=("x",)).plain and Sampling(stop=("x",)).greedy
    for bad in (
        [700, 900, 42, 0, 0, [], 21],
        [0, 1000, -2, 0, 0, [], -1],
        [0, 0, -1, 0, 0, [], -1],
        [1.5, 1000, -1, 0, 0, [], -1],
        "x",
    ):
        with pytest.raises(MalformedMessage):
            Sampling.from_wire(bad)


def test_a_job_request_carries_sampling_and_old_requests_still_decode() -> None:
    base = dict(job_id=1, model_id=b"m" * 32, texts=("hi",), max_tokens=8, deadline_ms=5, max_price_nanoton=9)
    for req in (
        jf.JobRequest(**base),  # type: ignore[arg-type]
        jf.JobRequest(**base, verify_tokens=(1, 2)),  # type: ignore[arg-type]
        jf.JobRequest(**base, sampling=Sampling(temperature=1.0, seed=7, stop=("!",))),  # type: ignore[arg-type]
        jf.JobRequest(**base, verify_tokens=(3,), sampling=Sampling(stop=("a",))),  # type: ignore[arg-type]
    ):
        assert jf.decode_frame(jf.encode_frame(req)[4:]) == req
    wire = jf.JobRequest(**base).to_wire()  # type: ignore[arg-type]
    for bad in (wire + [[], [0] * 7], wire + [[1], "x"], wire + [[]]):
        with pytest.raises(MalformedMessage):
            jf.decode_frame(pack(bad))


def test_a_chunk_carries_one_logprobs_entry_per_token() -> None:
    lp = TokenLogprob("Hello", -0.25, (("Hello", -0.25), (" Hi", -1.5)))
    chunk = jf.JobChunk(job_id=1, seq=0, token_ids=(5,), text="Hello", logprobs=(lp,))
    assert jf.decode_frame(jf.encode_frame(chunk)[4:]) == chunk
    wire = jf.JobChunk(job_id=1, seq=0, token_ids=(5,), text="Hello").to_wire()
    for entries in ([["a", -1.0, []], ["b", -1.0, []]], [["a", 0.5, []]], [["a", -1.0, [["b", -1.0]] * 21]], [],
                    [["a", True, []]], [["a" * 300, -1.0, []]]):  # fmt: skip
        with pytest.raises(MalformedMessage):
            jf.decode_frame(pack(wire + [entries]))


def test_the_sampler() -> None:
    logits = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    assert Sampler().pick(logits).token == 1  # greedy: the argmax
    one = Sampler(Sampling(temperature=1.0, seed=3))
    seq = [one.pick(logits).token for _ in range(200)]
    again = Sampler(Sampling(temperature=1.0, seed=3))
    assert [again.pick(logits).token for _ in range(200)] == seq  # seeded: reproducible
    assert set(seq) == {0, 1, 2}  # sampled: every token in the support comes up
    assert abs(seq.count(1) / 200 - 0.6) < 0.12
    nucleus = Sampler(Sampling(temperature=1.0, top_p=0.5, seed=3))
    assert {nucleus.pick(logits).token for _ in range(100)} == {1}  # top_p 0.5: only the top token is in
    cold = Sampler(Sampling(temperature=0.05, seed=3))
    assert {cold.pick(logits).token for _ in range(100)} == {1}
    rep = Sampler(Sampling(frequency_penalty=2.0))
    assert [rep.pick(logits).token for _ in range(3)] == [1, 2, 0]  # each use costs a token 2
    withlp = Sampler(Sampling(logprobs=2)).pick(logits)
    assert withlp.token == 1 and withlp.logprob == pytest.approx(np.log(0.6), abs=1e-5)
    assert [i for i, _ in withlp.top] == [1, 2]


def test_stop_prefix_len() -> None:
    assert stop_prefix_len("hello wor", ("world",)) == 3
    assert stop_prefix_len("hello", ("world",)) == 0
    assert stop_prefix_len("ab", ("bc", "abc")) == 2
    assert stop_prefix_len("x", ("x",)) == 0  # a whole stop string is found, not held


class CharTokenizer:
    """Token id = a character's code point (enough to test the stream's text logic)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _stream(text: str, stop: tuple[str, ...], max_new: int = 100) -> TokenStream:
    picks: Iterator[Pick] = (Pick(ord(c)) for c in text)
    return TokenStream(CharTokenizer(), picks, eos=(0,), max_new=max_new, stop=stop)


@pytest.mark.parametrize(
    ("text", "stop", "want"),
    [
        ("one two three", ("two",), "one "),
        ("one two three", ("tw", "thr"), "one "),
        ("abcabd", ("abd",), "abc"),  # a held "ab" turns out not to be a stop: released
        ("no stop here", ("zzz",), "no stop here"),
        ("end with st", ("stop",), "end with st"),  # held to the end, then released
    ],
)
def test_a_stop_string_cuts_the_text_and_nothing_sent_is_part_of_it(
    text: str, stop: tuple[str, ...], want: str
) -> None:
    stream = _stream(text, stop, max_new=len(text))
    pieces = [piece for _, piece in stream]
    assert "".join(pieces) == stream.text == want
    assert stream.stopped == (want != text)


@pytest.mark.slow
async def test_seeded_sampling_stop_strings_and_logprobs_over_the_network() -> None:
    from cocoon_p2p.execution.export import ensure_smollm2
    from cocoon_p2p.execution.generation import chatml_prompt

    from .test_jobs import network

    spec: ModelSpec = ensure_smollm2()
    prompt = chatml_prompt([{"role": "user", "content": "Name three colours, then three animals."}])

    async def run(sampling: Sampling | None, max_tokens: int = 24) -> Any:
        assert client.job_client is not None
        return await client.job_client.infer(
            spec.model_id, texts=(prompt,), max_tokens=max_tokens, max_price=10, timeout_s=60, sampling=sampling
        )

    async with network(spec, workers=1) as (client, _, _):
        greedy = await run(None)
        assert (await run(GREEDY)).token_ids == greedy.token_ids  # the same job as no sampling
        words = greedy.text.split()
        stop = words[len(words) // 2]
        cut = await run(Sampling(stop=(stop,)))
        assert cut.text == greedy.text[: greedy.text.index(stop)] and len(cut.token_ids) < len(greedy.token_ids)
        hot = [await run(Sampling(temperature=1.2, seed=s)) for s in (1, 1, 2, 3)]
        assert hot[0].token_ids == hot[1].token_ids  # seeded: reproducible on the network too
        assert len({r.token_ids for r in hot}) >= 2  # different seeds, different answers
        lp = await run(Sampling(logprobs=3), max_tokens=8)
        assert lp.token_ids == greedy.token_ids[:8] and len(lp.logprobs) == 8
        for entry in lp.logprobs:
            assert len(entry.top) == 3 and entry.logprob <= 0.0
            assert entry.top[0][1] == pytest.approx(entry.logprob)  # greedy: the chosen token is the top one
