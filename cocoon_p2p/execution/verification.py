"""Checking results without re-running them: a generation in one pass, embeddings by cosine.

A greedy generation of N tokens costs a prefill and N - 1 one-token decoder steps.
Checking it costs one forward pass: the *verifier graph*, derived from the served
ONNX file by :func:`derive_verifier_graph`, runs prompt + returned tokens at once
and outputs, after every position, the greedy choice (``next_ids``), the top-2 logit
margin (``margin``) and how far below the top the next token's logit lies (``gap``).
:class:`GreedyVerifier` compares them with the returned tokens (:class:`TokenCheck`).

The verifier graph holds no weights: its initializers are external data that point
into the served file itself (the protobuf's raw bytes, at their offsets), so the
check runs the very weights whose sha256 is the model id, and costs no second copy
on disk. It is cached beside the model (or in a given folder) under the model's
sha256, which its metadata records.

Decode steps and a prefill multiply in different orders, so their logits differ in
the last bits, and a near-tie between the two best tokens could flip. The gap tells
such a position (a tiny gap, honest) from a cheat (a token the model ranked clearly
lower): see :data:`TIE_GAP`.

Pure apart from onnx and onnxruntime (imported when first needed): no trio.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .models import ModelError, ModelSpec, file_sha256

if TYPE_CHECKING:
    import onnx

VERIFIER_VERSION = 1  # bump when the surgery changes: cached graphs of another version are rebuilt
# Outputs, [batch, seq - logits_from]: after each position, the argmax of the logits
# (int64) and the top-1 minus top-2 logit (float32).
NEXT_IDS = "next_ids"
MARGIN = "margin"
GAP = "gap"  # [batch, seq - logits_from - 1] float32: top logit minus the next input token's
LOGITS_FROM = "logits_from"  # [1] int64 input, default 0: the first position whose logits are computed
META_SOURCE = "cocoon.verifier.source_sha256"
META_VERSION = "cocoon.verifier.version"
# Initializers smaller than this stay inline in the verifier graph (not worth an offset).
EXTERNAL_MIN_BYTES = 1024
# A mismatch whose token lies less than this below the top logit is a near-tie that float
# order may flip: tolerated (TokenCheck.accepted). benchmarks/verification.py measured decode
# and prefill top-2 margins differing by at most 4.6e-5 (8,460 positions, CPU, 1-2 threads;
# no honest mismatch), and 4-bit cheats' mismatches lying a median 1.02 below the top
# (3 of 572 under 0.01, each generation caught elsewhere): 0.01 is 200x the honest noise.
TIE_GAP = 0.01


class VerificationError(ModelError):
    """A verifier graph cannot be derived from this model, or a cached one does not match it."""


# ---- where the weights lie in the served file -----------------------------------------


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the protobuf message in [start, end)."""
    pos = start

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while buf[pos] & 0x80:
            value |= (buf[pos] & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
        pos += 1
        return int(value | (buf[pos - 1] << shift))

    while pos < end:
        key = varint()
        kind, size = key & 7, 0
        if kind == 0:
            varint()
        elif kind in (1, 5):
            size = 8 if kind == 1 else 4
        elif kind == 2:
            size = varint()
            yield key >> 3, pos, pos + size
        else:
            raise VerificationError(f"unexpected protobuf wire type {kind} at byte {pos}")
        pos += size


# Field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.name/raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW = 7, 5, 8, 9


def raw_data_offsets(model_path: Path) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) of its ``raw_data`` bytes inside the ONNX file.

    Reads the protobuf wire format directly (through mmap: the weights are skipped,
    not read), so that another graph can point at those bytes as external data."""
    found: dict[str, tuple[int, int]] = {}
    with model_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for number, start, end in _fields(buf, 0, len(buf)):
            if number != _MODEL_GRAPH:
                continue
            for inner, t_start, t_end in _fields(buf, start, end):
                if inner != _GRAPH_INITIALIZER:
                    continue
                name, raw = None, None
                for tf, s, e in _fields(buf, t_start, t_end):
                    if tf == _TENSOR_NAME:
                        name = bytes(buf[s:e]).decode()
                    elif tf == _TENSOR_RAW:
                        raw = (s, e - s)
                if name is not None and raw is not None:
                    found[name] = raw
    return found


# ---- the surgery ------------------------------------------------------------------------


def _const(graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto], name: str) -> np.ndarray[Any, Any] | None:
    """The integer value of ``name`` if it is an initializer or a Constant node's output."""
    from onnx import numpy_helper

    tensor = next((t for t in graph.initializer if t.name == name), None)
    node = producer.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        tensor = next((a.t for a in node.attribute if a.name == "value"), None)
    if tensor is None or tensor.data_type not in (6, 7):  # int32, int64: indices, not weights
        return None
    return np.asarray(numpy_helper.to_array(tensor))


def _is(value: np.ndarray[Any, Any] | None, want: list[int], *, scalar: bool = False) -> bool:
    return value is not None and (value.ndim == 0) == scalar and value.ravel().tolist() == want


def _all_position_logits(graph: onnx.GraphProto, logits: str) -> str:
    """Rewire the graph so that one value holds the logits of the positions from
    ``logits_from`` (a new input, default 0: all of them); return that value's name.

    ``logits`` must come from ``Gather(MatMul(Slice(hidden, -1:, axis 1), lm_head), -1, axis=1)``,
    as torch exports transformers' ``logits_to_keep=1`` (the Slice is optional): the
    Gather is left out, and the MatMul reads the hidden states from ``logits_from`` on."""
    from onnx import TensorProto, helper

    producer = {out: node for node in graph.node for out in node.output}
    select = producer.get(logits)
    axis = next((a.i for a in select.attribute if a.name == "axis"), 0) if select else None
    if (
        select is None
        or select.op_type != "Gather"
        or axis != 1
        or not _is(_const(graph, producer, select.input[1]), [-1], scalar=True)
    ):
        found = select.op_type if select else "a graph input"
        raise VerificationError(f"{logits!r} does not come from a Gather of position -1 on axis 1 (but {found})")
    full = select.input[0]
    head = producer.get(full)
    weight = next((t for t in graph.initializer if head and t.name == head.input[1]), None)
    if head is None or head.op_type != "MatMul" or weight is None or len(weight.dims) != 2:
        raise VerificationError("the last-position logits do not come from a MatMul by a 2-D lm_head weight")
    keep = producer.get(head.input[0])
    hidden = head.input[0]
    if keep is not None and keep.op_type == "Slice" and len(keep.input) >= 4:
        starts, axes = _const(graph, producer, keep.input[1]), _const(graph, producer, keep.input[3])
        steps = _const(graph, producer, keep.input[4]) if len(keep.input) > 4 and keep.input[4] else np.array([1])
        if _is(starts, [-1]) and _is(axes, [1]) and _is(steps, [1]):  # hidden[:, -1:]: the last position only
            hidden = keep.input[0]
    # An initializer listed as an input is an input with a default: all positions unless told.
    graph.input.append(helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1]))
    ints = {LOGITS_FROM: 0, "v/end": 2**62, "v/seq_axis": 1}
    graph.initializer.extend(helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in ints.items())
    head.input[0] = "v/kept_hidden"
    kept = helper.make_node("Slice", [hidden, LOGITS_FROM, "v/end", "v/seq_axis"], [head.input[0]], name="v/keep")
    nodes = list(graph.node)
    nodes.insert(nodes.index(head), kept)  # nodes stay in topological order
    del graph.node[:]
    graph.node.extend(nodes)
    return full


def _externalize(model: onnx.ModelProto, offsets: dict[str, tuple[int, int]], location: str) -> None:
    """Point large initializers at their bytes in the source file instead of holding them."""
    from onnx import TensorProto

    for tensor in model.graph.initializer:
        span = offsets.get(tensor.name)
        if span is not None and span[1] >= EXTERNAL_MIN_BYTES and tensor.HasField("raw_data"):
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(span[0])), ("length", str(span[1]))):
                tensor.external_data.add(key=key, value=value)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no graph output depends on any more."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, stack, keep = set(), [o.name for o in graph.output], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            keep.add(producer[name])
            stack += [i for i in graph.node[producer[name]].input if i]
    nodes, inits = (
        [n for i, n in enumerate(graph.node) if i in keep],
        [t for t in graph.initializer if t.name in needed],
    )
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)


def _add_outputs(graph: onnx.GraphProto, full: str, ids: str) -> None:
    """Replace the graph's outputs with NEXT_IDS, MARGIN and GAP, computed from the
    logits ``full`` ([batch, kept, vocab], positions from LOGITS_FROM on) and the input ``ids``."""
    from onnx import TensorProto, helper

    ints = {"v/two": 2, "v/last": -1, "v/one": 1, "v/zero": 0, "v/end": 2**62}
    graph.initializer.extend(helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in ints.items())
    graph.initializer.append(helper.make_tensor("v/sign", TensorProto.FLOAT, [2], [1.0, -1.0]))
    steps: list[tuple[str, list[str], list[str], dict[str, Any]]] = [
        # ArgMax keeps the first of equal maxima, as numpy's argmax in greedy_tokens
        ("ArgMax", [full], [NEXT_IDS], {"axis": -1, "keepdims": 0}),
        ("TopK", [full, "v/two"], ["v/top2", "v/top2_ids"], {"axis": -1}),
        ("Mul", ["v/top2", "v/sign"], ["v/signed"], {}),
        ("ReduceSum", ["v/signed", "v/last"], [MARGIN], {"keepdims": 0}),
        # GAP: how far below the top logit lies the token that follows each position
        ("Add", [LOGITS_FROM, "v/one"], ["v/next_from"], {}),
        ("Slice", [ids, "v/next_from", "v/end", "v/one"], ["v/next_tokens"], {}),
        ("Unsqueeze", ["v/next_tokens", "v/last"], ["v/next_index"], {}),
        ("Slice", [full, "v/zero", "v/last", "v/one"], ["v/followed"], {}),
        ("GatherElements", ["v/followed", "v/next_index"], ["v/picked"], {"axis": -1}),
        ("ReduceMax", ["v/followed"], ["v/top"], {"axes": [-1], "keepdims": 1}),
        ("Sub", ["v/top", "v/picked"], ["v/gap"], {}),
        ("Squeeze", ["v/gap", "v/last"], [GAP], {}),
    ]
    graph.node.extend(helper.make_node(op, i, o, name=f"{o[0]}/{op}", **a) for op, i, o, a in steps)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(NEXT_IDS, TensorProto.INT64, ["batch", "kept"]),
            helper.make_tensor_value_info(MARGIN, TensorProto.FLOAT, ["batch", "kept"]),
            helper.make_tensor_value_info(GAP, TensorProto.FLOAT, ["batch", "followed"]),
        ]
    )


def derive_verifier_graph(
    model_path: Path,
    out_path: Path,
    *,
    logits: str = "logits",
    input_ids: str = "input_ids",
    source_sha256: bytes | None = None,
) -> Path:
    """Write to ``out_path`` a graph that outputs, in one forward pass, the greedy
    token after every position (``next_ids`` [batch, seq] int64), the top-2 logit
    margin there (``margin``) and how far below the top logit the next input token
    lies (``gap``, one position fewer). Return ``out_path``. A new input
    ``logits_from`` (default 0) skips the lm_head for the positions before it.

    ``model_path`` is a served decoder that outputs the last position's ``logits``
    only; the lm_head's slice of the last hidden position and the final selection
    are removed, and ArgMax / TopK / GatherElements work over the vocabulary. The result holds
    no weights: they are external data pointing into ``model_path`` (same folder,
    same file name), so load it with :func:`open_verifier_session`. Its metadata
    records ``model_path``'s sha256 (``source_sha256`` if the caller knows it).
    VerificationError if the graph does not have the expected shape."""
    import onnx
    from onnx import helper

    digest = source_sha256 if source_sha256 is not None else file_sha256(model_path)
    offsets = raw_data_offsets(model_path)
    # weights already external stay so: the session resolves them from the model's folder
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if logits not in {o.name for o in graph.output}:
        raise VerificationError(f"{model_path} has no output {logits!r}")
    full = _all_position_logits(graph, logits)
    _add_outputs(graph, full, input_ids)
    del graph.value_info[:]  # shapes inferred for one position would now be wrong
    _prune(graph)
    _externalize(model, offsets, model_path.name)
    for key, value in ((META_SOURCE, digest.hex()), (META_VERSION, str(VERIFIER_VERSION))):
        helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, key: value})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")  # two processes may derive at once
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(out_path)  # whole or absent: a crash never leaves half a graph in the cache
    return out_path


def verifier_graph_path(spec: ModelSpec, cache: Path | None = None) -> Path:
    """Where the verifier graph of ``spec`` is cached: beside the model, or in ``cache``."""
    return (cache or spec.path.parent) / f"verifier-v{VERIFIER_VERSION}-{spec.id_hex}.onnx"


def recorded_source(graph_path: Path) -> str | None:
    """The source model's sha256 (hex) that a verifier graph records, None if it records none."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return props.get(META_SOURCE) if props.get(META_VERSION) == str(VERIFIER_VERSION) else None


def ensure_verifier_graph(spec: ModelSpec, cache: Path | None = None) -> Path:
    """The cached verifier graph of ``spec``, derived first if absent or made from other weights."""
    path = verifier_graph_path(spec, cache)
    if path.is_file() and recorded_source(path) == spec.id_hex:
        return path
    return derive_verifier_graph(spec.path, path, source_sha256=spec.model_id)


def open_verifier_session(graph_path: Path, model_path: Path, *, threads: int = 0) -> Any:
    """An onnxruntime session of a verifier graph whose weights lie in ``model_path``.

    The graph is loaded as bytes with ``model_path``'s folder as the folder of its
    external data, so the graph itself may be cached anywhere (onnxruntime refuses
    external paths that leave the graph's own folder)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    try:
        return ort.InferenceSession(graph_path.read_bytes(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise VerificationError(f"onnxruntime cannot load the verifier graph {graph_path}: {exc}") from exc


# ---- checking a generation --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenCheck:
    """How returned tokens compare with greedy decoding after the same prompt.

    ``agree[i]``: tokens[i] is the greedy choice after prompt + tokens[:i] (teacher-forced:
    a mismatch does not shift the later positions). ``gaps[i]``: the top logit there minus
    tokens[i]'s logit (0.0 where they agree). ``truncated``: fewer than max_tokens and no
    EOS (the worker stopped early). ``overrun``: tokens after an EOS, or beyond max_tokens."""

    agree: tuple[bool, ...]
    gaps: tuple[float, ...] = ()
    truncated: bool = False
    overrun: bool = False
    tie_gap: float = TIE_GAP

    @property
    def first_mismatch(self) -> int | None:
        """The first position whose token is not the greedy choice, None if all are."""
        return next((i for i, ok in enumerate(self.agree) if not ok), None)

    @property
    def agreement(self) -> float:
        """Share of positions that agree (1.0 for no tokens)."""
        return sum(self.agree) / len(self.agree) if self.agree else 1.0

    @property
    def first_fault(self) -> int | None:
        """The first mismatch that is no near-tie: its gap is ``tie_gap`` or more (or unknown)."""
        gaps = self.gaps + (float("inf"),) * (len(self.agree) - len(self.gaps))
        return next((i for i, ok in enumerate(self.agree) if not ok and gaps[i] >= self.tie_gap), None)

    @property
    def accepted(self) -> bool:
        """Honest within the tolerance: every mismatch a near-tie, and the right length."""
        return self.first_fault is None and not self.truncated and not self.overrun


@dataclass(frozen=True, slots=True)
class GreedyPass:
    """One verifier pass over prompt + tokens, position i following prompt + tokens[:i]:
    the greedy ids, the top-2 margins and the gaps of the tokens, each [len(tokens)]."""

    next_ids: np.ndarray[Any, Any]
    margins: np.ndarray[Any, Any]
    gaps: np.ndarray[Any, Any]


class GreedyVerifier:
    """Checks greedy generations of one model, in one forward pass each.

    Built from a generation ModelSpec (its file hashed at load: the verifier graph
    reads those bytes). ``cache``: where the verifier graph is kept (default: beside
    the model). ``threads``: onnxruntime intra-op threads (0: all cores)."""

    def __init__(
        self, spec: ModelSpec, *, cache: Path | None = None, threads: int = 0, tie_gap: float = TIE_GAP
    ) -> None:
        if spec.kind != "generation":
            raise ModelError(f"{spec.name} is a {spec.kind} model: only generation models have greedy tokens")
        self.spec = spec
        self.tie_gap = tie_gap
        self.graph_path = ensure_verifier_graph(spec, cache)
        self.session = open_verifier_session(self.graph_path, spec.path, threads=threads)
        self._past = [i.name for i in self.session.get_inputs() if i.name.startswith("past.")]

    def greedy_pass(self, prompt_ids: Sequence[int], tokens: Sequence[int]) -> GreedyPass:
        """Run prompt + tokens once. VerificationError unless 1 <= len(prompt_ids) and
        the whole fits the model's context."""
        ids = [*prompt_ids, *tokens]
        n = len(ids)
        if not prompt_ids or n > self.spec.max_context:
            raise VerificationError(f"{len(prompt_ids)} prompt and {len(tokens)} tokens: 1..{self.spec.max_context}")
        empty = np.zeros((1, self.spec.kv_heads, 0, self.spec.head_dim), dtype=np.float32)
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :],
            # position p's logits choose token p + 1: the first returned token follows the prompt's
            # last; the lm_head (a fifth of the work per position) skips the prompt before it
            LOGITS_FROM: np.array([len(prompt_ids) - 1], dtype=np.int64),
            **dict.fromkeys(self._past, empty),
        }
        next_ids, margins, gaps = self.session.run([NEXT_IDS, MARGIN, GAP], feeds)
        k = len(tokens)
        return GreedyPass(next_ids[0, :k], margins[0, :k], gaps[0, :k])

    def check(
        self,
        prompt_ids: Sequence[int],
        tokens: Sequence[int],
        *,
        max_tokens: int | None = None,
        eos: Sequence[int] | None = None,
    ) -> TokenCheck:
        """Compare ``tokens`` with greedy decoding after ``prompt_ids``. With ``max_tokens``,
        also check the length: a generation ends at its first EOS (``eos``, default the
        model's) or at max_tokens. VerificationError if it exceeds the model's context."""
        stop = set(self.spec.eos if eos is None else eos)
        first_eos = next((i for i, t in enumerate(tokens) if t in stop), None)
        overrun = first_eos is not None and first_eos < len(tokens) - 1
        truncated = False
        if max_tokens is not None:
            overrun = overrun or len(tokens) > max_tokens
            truncated = len(tokens) < max_tokens and first_eos is None
        if not tokens:
            return TokenCheck(agree=(), truncated=truncated, tie_gap=self.tie_gap)
        run = self.greedy_pass(prompt_ids, tokens)
        return TokenCheck(
            agree=tuple(bool(w == t) for w, t in zip(run.next_ids.tolist(), tokens, strict=True)),
            gaps=tuple(float(g) for g in run.gaps),
            truncated=truncated,
            overrun=overrun,
            tie_gap=self.tie_gap,
        )


# ---- embeddings -------------------------------------------------------------------------


def cosine_agreement(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Cosine similarity of each row of ``a`` and ``b`` (same shape; axis 0 is the row,
    the rest flattened), in float64. Two zero rows count as 1.0, one zero row as 0.0."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    rows = a.shape[0] if a.ndim else 1
    x = np.asarray(a, dtype=np.float64).reshape(rows, -1)
    y = np.asarray(b, dtype=np.float64).reshape(rows, -1)
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    both = nx * ny
    cos = np.divide(np.sum(x * y, axis=1), both, out=np.zeros(rows), where=both > 0)
    cos[(nx == 0) & (ny == 0)] = 1.0
    clipped: np.ndarray[Any, Any] = np.clip(cos, -1.0, 1.0)
    return clipped
