"""Models and backends: hash checks, the onnxruntime backend, batching equals single runs."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cocoon_p2p.core.errors import MalformedMessage
from cocoon_p2p.execution.backends import BackendError, backend_choice, open_backend
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.backends.trt import tensorrt_unavailable_reason
from cocoon_p2p.execution.executor import BAD_INPUT, Executor, RunRequest
from cocoon_p2p.execution.models import ModelError, ModelSpec, load_model
from cocoon_p2p.execution.tensors import Tensor, from_numpy, to_numpy
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.testing.tinymodel import BIAS, WEIGHTS, build_tiny_model


def reference(x: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    return np.maximum(x @ np.array(WEIGHTS, dtype=np.float32) + np.array(BIAS, dtype=np.float32), 0)


def job(x: np.ndarray) -> RunRequest:  # type: ignore[type-arg]
    return RunRequest(inputs=(from_numpy("x", x),))


def test_model_id_is_the_file_hash_and_is_checked(tiny_model: ModelSpec, tmp_path: Path) -> None:
    assert tiny_model.model_id == hashlib.sha256(tiny_model.path.read_bytes()).digest()
    again = build_tiny_model(tmp_path / "again.onnx")  # a deterministic build: the same id
    assert load_model(again).model_id == tiny_model.model_id
    with pytest.raises(ModelError):
        load_model(again, expected_id=bytes(32))
    with pytest.raises(ModelError):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError):
        load_model(again, kind="embedding")  # no tokenizer


def test_onnxruntime_matches_reference_and_batches_split_back(tiny_model: ModelSpec) -> None:
    ex = Executor(tiny_model, OnnxRuntimeBackend(tiny_model.path, threads=1))
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 3, 2)]
    reqs = [job(x) for x in xs]
    keys = {ex.check(r) for r in reqs}
    assert len(keys) == 1
    together = ex.run(reqs)
    for x, out in zip(xs, together, strict=True):
        assert out.units == len(x)
        np.testing.assert_allclose(to_numpy(out.outputs[0]), reference(x), rtol=1e-6, atol=1e-6)
        (alone,) = ex.run([job(x)])
        assert to_numpy(alone.outputs[0]).tobytes() == to_numpy(out.outputs[0]).tobytes()


@pytest.mark.parametrize(
    "bad",
    [
        from_numpy("x", np.zeros((2, 5), dtype=np.float32)),  # wrong width
        from_numpy("x", np.zeros((2, 4), dtype=np.int32)),  # wrong dtype
        from_numpy("x", np.zeros((4,), dtype=np.float32)),  # wrong rank
        from_numpy("y", np.zeros((2, 4), dtype=np.float32)),  # wrong name
        from_numpy("x", np.zeros((0, 4), dtype=np.float32)),  # empty
    ],
)
def test_inputs_that_do_not_fit_the_model_are_bad_input(tiny_model: ModelSpec, bad: Tensor) -> None:
    ex = Executor(tiny_model, OnnxRuntimeBackend(tiny_model.path, threads=1))
    with pytest.raises(MalformedMessage) as err:
        ex.check(RunRequest(inputs=(bad,)))
    assert err.value.code == BAD_INPUT == jf.BAD_INPUT  # the job protocol's code, sent back as it is


@pytest.mark.parametrize(
    ("kind", "request_"),
    [
        ("tensor", RunRequest(texts=("a text",))),
        ("tensor", RunRequest()),
        ("embedding", RunRequest()),
        ("generation", RunRequest(texts=("one", "two"), max_tokens=4)),
        ("generation", RunRequest(texts=("prompt",), max_tokens=0)),
    ],
)
def test_requests_of_the_wrong_shape_are_bad_input(tiny_model: ModelSpec, kind: str, request_: RunRequest) -> None:
    ex = Executor(tiny_model, OnnxRuntimeBackend(tiny_model.path, threads=1))
    ex.spec = replace(tiny_model, kind=kind)  # the checks only read the kind
    with pytest.raises(MalformedMessage) as err:
        ex.check(request_)
    assert err.value.code == BAD_INPUT


@pytest.mark.parametrize("kind", ["embedding", "generation"])
def test_a_text_model_needs_its_tokenizer(tiny_model: ModelSpec, kind: str) -> None:
    with pytest.raises(ModelError):
        Executor(replace(tiny_model, kind=kind, tokenizer=None), OnnxRuntimeBackend(tiny_model.path, threads=1))


def test_backend_choice_explains_itself(tiny_model: ModelSpec, tmp_path: Path) -> None:
    name, why = backend_choice("auto")
    reason = tensorrt_unavailable_reason()
    assert (name == "tensorrt") == (reason is None)
    if reason is not None:
        assert why == reason
    with pytest.raises(BackendError):
        backend_choice("cuda-magic")
    with pytest.raises(BackendError):
        OnnxRuntimeBackend(tmp_path / "nothing.onnx")


@pytest.mark.skipif(tensorrt_unavailable_reason() is not None, reason=f"TensorRT: {tensorrt_unavailable_reason()}")
def test_tensorrt_matches_onnxruntime(tiny_model: ModelSpec, tmp_path: Path) -> None:
    trt = open_backend("tensorrt", tiny_model.path, model_id=tiny_model.model_id, cache_dir=tmp_path, max_batch=8)
    ort = OnnxRuntimeBackend(tiny_model.path)
    x = np.random.default_rng(5).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(trt.run({"x": x})["y"], ort.run({"x": x})["y"], rtol=1e-3, atol=1e-3)
    assert list(tmp_path.glob("*.engine"))  # cached: a second load skips the build
    again = open_backend("tensorrt", tiny_model.path, model_id=tiny_model.model_id, cache_dir=tmp_path, max_batch=8)
    np.testing.assert_allclose(again.run({"x": x})["y"], ort.run({"x": x})["y"], rtol=1e-3, atol=1e-3)


def test_outputs_off_the_batch_axis_are_not_split(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(  # y = the sum of every row: one row out, whatever came in
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1)],
        "total",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "total.onnx"))
    spec = load_model(tmp_path / "total.onnx")
    ex = Executor(spec, OnnxRuntimeBackend(spec.path, threads=1))
    xs = [np.full((n, 4), n, dtype=np.float32) for n in (1, 2, 3)]
    outs = ex.run([job(x) for x in xs])
    assert [float(to_numpy(o.outputs[0])[0, 0]) for o in outs] == [4.0, 16.0, 36.0]
    assert not ex.batchable
