"""A tiny ONNX model built in code, for protocol tests and benchmarks.

``y = relu(x @ W + b)`` with x: float32 [batch, 4] and y: float32 [batch, 3];
fixed weights, so every build is byte-identical and has the same model id.
Needs the ``onnx`` package (a dev dependency) to build, not to serve.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = [
    [0.5, -0.25, 1.0],
    [0.125, 0.75, -0.5],
    [-1.0, 0.5, 0.25],
    [0.25, 0.125, 0.5],
]
BIAS = [0.1, -0.2, 0.3]


def build_tiny_model(path: Path, *, hidden: int = 0) -> Path:
    """Write the model to ``path`` and return it. ``hidden`` > 0 first passes x
    through two tanh layers of that width (4 -> hidden -> hidden -> 4): a compute
    load of about 2 x hidden^2 multiply-adds per row, for slow jobs in tests."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array(WEIGHTS, dtype=np.float32)
    nodes = []
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(BIAS, dtype=np.float32), "b")]
    src = "x"
    width = 4
    if hidden:
        rng = np.random.default_rng(7)
        v = (rng.standard_normal((4, hidden)) / 2).astype(np.float32)
        sq = (rng.standard_normal((hidden, hidden)) / hidden**0.5).astype(np.float32)
        u = (rng.standard_normal((hidden, 4)) / hidden**0.5).astype(np.float32)
        inits += [numpy_helper.from_array(a, n) for a, n in ((v, "V"), (sq, "S"), (u, "U"))]
        nodes += [helper.make_node("MatMul", ["x", "V"], ["h"]), helper.make_node("Tanh", ["h"], ["ht"])]
        nodes += [helper.make_node("MatMul", ["ht", "S"], ["s"]), helper.make_node("Tanh", ["s"], ["st"])]
        nodes += [helper.make_node("MatMul", ["st", "U"], ["h2"])]
        src, width = "h2", 4
    nodes += [
        helper.make_node("MatMul", [src, "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cocoon_tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cocoon-p2p")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
