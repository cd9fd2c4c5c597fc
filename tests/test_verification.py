"""Checking results without re-running them (cocoon_p2p.execution.verification).

The surgery is checked on a tiny causal decoder built here (fast); the real check on
SmolLM2, with its 4-bit variant as the cheat (slow: real models)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cocoon_p2p.execution.models import ModelError, ModelSpec, file_sha256
from cocoon_p2p.execution.verification import (
    GAP,
    LOGITS_FROM,
    MARGIN,
    NEXT_IDS,
    GreedyVerifier,
    TokenCheck,
    VerificationError,
    cosine_agreement,
    derive_verifier_graph,
    ensure_verifier_graph,
    open_verifier_session,
    raw_data_offsets,
    recorded_source,
    verifier_graph_path,
)

VOCAB, HIDDEN, MAX_POS = 64, 8, 32

# ---- cosine_agreement and TokenCheck (pure) ---------------------------------------------

E1, E2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ([E1], [E1], [1.0]),
        ([E1], [[5.0, 0.0, 0.0]], [1.0]),  # scale does not matter
        ([E1], [[-1.0, 0.0, 0.0]], [-1.0]),
        ([E1, E2], [E2, E2], [0.0, 1.0]),  # row by row
        ([[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [1.0]),  # two zero rows are equal
        ([[0.0, 0.0, 0.0]], [E1], [0.0]),
        ([[1.0, 1.0, 0.0]], [E1], [2**-0.5]),
    ],
)
def test_cosine_agreement(a: list[list[float]], b: list[list[float]], want: list[float]) -> None:
    got = cosine_agreement(np.array(a, dtype=np.float32), np.array(b, dtype=np.float32))
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_cosine_agreement_flattens_rows_and_refuses_other_shapes() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(cosine_agreement(x, 2 * x), [1.0, 1.0])
    with pytest.raises(ValueError):
        cosine_agreement(x, x[:1])


@pytest.mark.parametrize(
    ("check", "first_mismatch", "agreement", "first_fault", "accepted"),
    [
        (TokenCheck(agree=(True, True)), None, 1.0, None, True),
        (TokenCheck(agree=()), None, 1.0, None, True),
        (TokenCheck(agree=(True, False, False), gaps=(0.0, 3.0, 1.0)), 1, 1 / 3, 1, False),
        (TokenCheck(agree=(True, False), gaps=(0.0, 1e-4)), 1, 0.5, None, True),  # a near-tie flipped
        (TokenCheck(agree=(False, False), gaps=(1e-4, 0.5)), 0, 0.0, 1, False),  # a tie excuses no later fault
        (TokenCheck(agree=(True, False)), 1, 0.5, 1, False),  # no gaps known: no mismatch excused
        (TokenCheck(agree=(True,), gaps=(0.0,), truncated=True), None, 1.0, None, False),
        (TokenCheck(agree=(True,), gaps=(0.0,), overrun=True), None, 1.0, None, False),
    ],
)
def test_token_check_verdicts(
    check: TokenCheck, first_mismatch: int | None, agreement: float, first_fault: int | None, accepted: bool
) -> None:
    assert (check.first_mismatch, check.agreement, check.first_fault, check.accepted) == (
        first_mismatch,
        agreement,
        first_fault,
        accepted,
    )


# ---- the surgery, on a tiny causal decoder ---------------------------------------------


def _tiny_weights() -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(18)
    return {
        "emb": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "pos": rng.standard_normal((MAX_POS, HIDDEN)).astype(np.float32),
        "lm_head": rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32),
    }


def build_tiny_decoder(path: Path, *, last_position: bool = True) -> Path:
    """``logits = (cumsum(emb[ids] + pos[positions]) @ lm_head)[:, -1]``, exported the way
    torch exports ``logits_to_keep=1``: Slice(-1:) before the lm_head, Gather(-1) after.
    ``last_position`` False: the MatMul's output is the graph's output (no surgery possible)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, values: list[int], scalar: bool = False) -> Any:
        t = helper.make_tensor(name, TensorProto.INT64, [] if scalar else [len(values)], values)
        return helper.make_node("Constant", [], [name], value=t)

    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Gather", ["pos", "position_ids"], ["p"]),
        helper.make_node("Add", ["e", "p"], ["h"]),
        const("axis1", [1], scalar=True),
        helper.make_node("CumSum", ["h", "axis1"], ["hidden"]),  # causal: position p sees 0..p
        const("start", [-1]),
        const("end", [2**63 - 1]),
        const("axes", [1]),
        const("steps", [1]),
        helper.make_node("Slice", ["hidden", "start", "end", "axes", "steps"], ["last_hidden"]),
        helper.make_node("MatMul", ["last_hidden", "lm_head"], ["lm"]),
        const("minus_one", [-1], scalar=True),
        helper.make_node("Gather", ["lm", "minus_one"], ["logits"], axis=1),
    ]
    if not last_position:
        nodes[-4] = helper.make_node("MatMul", ["hidden", "lm_head"], ["logits"])
        del nodes[-3:]
    inits = [numpy_helper.from_array(a, n) for n, a in _tiny_weights().items()]
    graph = helper.make_graph(
        nodes,
        "tiny_decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _run(session: Any, ids: list[int], **extra: Any) -> dict[str, Any]:
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "position_ids": np.arange(len(ids))[None, :]}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds | extra), strict=True))


def test_raw_data_offsets_point_at_the_weights(tmp_path: Path) -> None:
    path = build_tiny_decoder(tmp_path / "tiny.onnx")
    offsets = raw_data_offsets(path)
    data = path.read_bytes()
    for name, array in _tiny_weights().items():
        start, length = offsets[name]
        assert data[start : start + length] == array.tobytes()


def test_the_verifier_graph_gives_every_positions_greedy_choice(tmp_path: Path) -> None:
    """next_ids[p] is what the served graph chooses after ids[:p + 1]; the graph is cached
    in another folder and holds no weights: it reads them from the served file."""
    import onnxruntime as ort

    model = build_tiny_decoder(tmp_path / "model" / "tiny.onnx")
    derived = derive_verifier_graph(model, tmp_path / "elsewhere" / "verifier.onnx")
    assert derived.stat().st_size < 2048  # the three 2 KiB weights are not in it
    assert recorded_source(derived) == file_sha256(model).hex()
    served = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    verifier = open_verifier_session(derived, model)
    ids = [3, 17, 42, 5, 60, 8, 8, 1]
    out = _run(verifier, ids)
    want = [int(np.argmax(_run(served, ids[: p + 1])["logits"][0])) for p in range(len(ids))]
    assert out[NEXT_IDS][0].tolist() == want
    w = _tiny_weights()
    full = np.cumsum(w["emb"][ids] + w["pos"][: len(ids)], axis=0) @ w["lm_head"]
    top2 = np.sort(full, axis=1)[:, -2:]
    np.testing.assert_allclose(out[MARGIN][0], top2[:, 1] - top2[:, 0], rtol=1e-5, atol=1e-5)
    followed = full[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(out[GAP][0], full[:-1].max(axis=1) - followed, rtol=1e-5, atol=1e-5)
    # logits_from skips the positions before it
    late = _run(verifier, ids, **{LOGITS_FROM: np.array([5], dtype=np.int64)})
    assert late[NEXT_IDS][0].tolist() == want[5:]
    assert late[GAP][0].shape == (len(ids) - 6,)


def test_a_graph_without_last_position_logits_is_refused(tmp_path: Path) -> None:
    model = build_tiny_decoder(tmp_path / "all.onnx", last_position=False)
    with pytest.raises(VerificationError, match="Gather of position -1"):
        derive_verifier_graph(model, tmp_path / "v.onnx")
    with pytest.raises(VerificationError, match="no output"):
        derive_verifier_graph(model, tmp_path / "v.onnx", logits="nope")


def test_the_graph_is_cached_by_model_id_and_rebuilt_for_other_weights(tmp_path: Path) -> None:
    model = build_tiny_decoder(tmp_path / "tiny.onnx")
    spec = ModelSpec(name="tiny", path=model, model_id=file_sha256(model), kind="generation")
    path = ensure_verifier_graph(spec, tmp_path / "cache")
    assert path == verifier_graph_path(spec, tmp_path / "cache") and spec.id_hex in path.name
    stamp = path.stat().st_mtime_ns
    assert ensure_verifier_graph(spec, tmp_path / "cache").stat().st_mtime_ns == stamp  # reused
    other = build_tiny_decoder(tmp_path / "other" / "tiny.onnx")
    derive_verifier_graph(other, path, source_sha256=b"\x01" * 32)  # a graph that records other weights
    assert ensure_verifier_graph(spec, tmp_path / "cache") == path
    assert recorded_source(path) == spec.id_hex  # rebuilt


def test_only_generation_models_have_a_greedy_verifier(tmp_path: Path) -> None:
    spec = ModelSpec(name="e", path=tmp_path / "e.onnx", model_id=b"\0" * 32, kind="embedding")
    with pytest.raises(ModelError, match="generation"):
        GreedyVerifier(spec)


# ---- SmolLM2: honest tokens, altered tokens, the 4-bit cheat ----------------------------

N = 24


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, GreedyVerifier, Any]:
    from tokenizers import Tokenizer

    from cocoon_p2p.execution.export import ensure_smollm2

    spec = ensure_smollm2()
    verifier = GreedyVerifier(spec, cache=tmp_path_factory.mktemp("verifiers"))
    return spec, verifier, Tokenizer.from_file(str(spec.tokenizer))


def _prompt(tok: Any, text: str) -> list[int]:
    from cocoon_p2p.execution.generation import chatml_prompt

    ids: list[int] = tok.encode(chatml_prompt([{"role": "user", "content": text}]), add_special_tokens=False).ids
    return ids


@pytest.fixture(scope="module", autouse=True)
def _release_backends() -> Iterator[None]:
    yield
    _backend.cache_clear()  # the sessions hold the models' weights: not beyond this module


@functools.cache
def _backend(path: Path) -> Any:
    """One onnxruntime session per model file for the whole module (loading one takes seconds)."""
    from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path)


def _greedy(spec: ModelSpec, ids: list[int], n: int) -> list[int]:
    from cocoon_p2p.execution.generation import greedy_tokens

    backend = _backend(spec.path)
    kv = {"layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim}
    return list(greedy_tokens(backend.run, ids, n, eos=spec.eos, **kv))


@pytest.mark.slow
def test_honest_tokens_verify_and_an_altered_one_fails_where_it_was_altered(
    smol: tuple[ModelSpec, GreedyVerifier, Any],
) -> None:
    spec, verifier, tok = smol
    assert verifier.graph_path.stat().st_size < 8 << 20  # the 650 MB of weights stay in the model file
    assert recorded_source(verifier.graph_path) == spec.id_hex
    ids = _prompt(tok, "Write a short story about a lighthouse keeper.")
    tokens = _greedy(spec, ids, N)
    assert len(tokens) == N
    honest = verifier.check(ids, tokens, max_tokens=N)
    assert honest.agreement == 1.0 and honest.first_mismatch is None and honest.accepted
    assert max(honest.gaps) == 0.0
    banana = tok.encode(" banana", add_special_tokens=False).ids[0]
    for position in (0, 9, N - 1):
        altered = list(tokens)
        altered[position] = banana if tokens[position] != banana else banana + 1
        check = verifier.check(ids, altered, max_tokens=N)
        assert check.first_mismatch == position == check.first_fault and not check.accepted
        assert check.agree[:position] == (True,) * position
    cut = verifier.check(ids, tokens[:10], max_tokens=N)  # stopped early without EOS
    assert cut.truncated and not cut.accepted and cut.agreement == 1.0


@pytest.mark.slow
def test_eos_ends_a_generation_and_nothing_may_follow_it(smol: tuple[ModelSpec, GreedyVerifier, Any]) -> None:
    spec, verifier, tok = smol
    ids = _prompt(tok, "What is the capital of France? Answer in one short sentence.")
    tokens = _greedy(spec, ids, 48)
    assert tokens[-1] in spec.eos and len(tokens) < 48  # this prompt's answer ends early
    early = verifier.check(ids, tokens, max_tokens=48)
    assert early.accepted and not early.truncated
    assert not verifier.check(ids, tokens[:-1], max_tokens=48).accepted  # the EOS dropped: truncated
    overrun = verifier.check(ids, [*tokens, tokens[0]], max_tokens=48)
    assert overrun.overrun and not overrun.accepted


@pytest.mark.slow
def test_four_bit_tokens_fail_the_fp32_check(smol: tuple[ModelSpec, GreedyVerifier, Any]) -> None:
    from cocoon_p2p.execution.export import ensure_smollm2_q4

    spec, verifier, tok = smol
    ids = _prompt(tok, "Explain how a payment channel works.")
    cheat = _greedy(ensure_smollm2_q4(), ids, N)
    check = verifier.check(ids, cheat, max_tokens=N)
    assert check.first_mismatch is not None and check.first_fault is not None and not check.accepted
    assert check.agreement < 1.0
