"""Dishonest workers' backends, for adversarial tests and ``cocoon-node demo --cheating-worker``.

:class:`CheatingBackend` runs the real model, then, on a share of its runs, replaces
every float output by values of the same shape and dtype that are wrong: random rows
scaled to the real rows' norms (so an embedding still looks like a unit vector).
:class:`TruncatingBackend` ends generations early with an end-of-sequence token. The
frames stay valid; only checking the values can tell.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from cocoon_p2p.execution.backends import Backend


class CheatingBackend:
    """Wraps ``inner``; cheats on each run with probability ``rate``."""

    def __init__(self, inner: Backend, *, rate: float, seed: int = 0) -> None:
        self.inner = inner
        self.rate = rate
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.name, self.device = inner.name, inner.device
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.runs = 0
        self.cheated_runs = 0
        self.cheated_rows = 0

    def run(self, feeds: dict[str, np.ndarray[Any, Any]], *, release: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        out = self.inner.run(feeds, release=release)
        self.runs += 1
        if self.rng.random() >= self.rate:
            return out
        self.cheated_runs += 1
        wrong = {}
        for name, value in out.items():
            if not np.issubdtype(value.dtype, np.floating) or value.size == 0:
                wrong[name] = value
                continue
            fake = self.np_rng.standard_normal(value.shape).astype(value.dtype)
            rows = value.reshape(value.shape[0], -1) if value.ndim else value.reshape(1, -1)
            fake_rows = fake.reshape(rows.shape)
            scale = np.linalg.norm(rows, axis=1, keepdims=True) / np.maximum(
                np.linalg.norm(fake_rows, axis=1, keepdims=True), 1e-12
            )
            wrong[name] = (fake_rows * scale).reshape(value.shape).astype(value.dtype)
            self.cheated_rows += rows.shape[0]
        return wrong

    def close(self) -> None:
        self.inner.close()


class TruncatingBackend:
    """Wraps a generation model's ``inner``: after ``keep`` tokens of a generation it makes
    an end-of-sequence token the model's choice, so the worker stops early and saves the
    rest of the compute, in a result that looks finished. A verify job catches it: at that
    position the model's own choice is another token."""

    def __init__(self, inner: Backend, *, keep: int, eos: int) -> None:
        self.inner = inner
        self.keep, self.eos = keep, eos
        self.name, self.device = inner.name, inner.device
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.step = 0
        self.truncated = 0  # generations it cut short

    def run(self, feeds: dict[str, np.ndarray[Any, Any]], *, release: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        out = self.inner.run(feeds, release=release)
        past = feeds.get("past.0.key")
        self.step = 0 if past is None or past.shape[2] == 0 else self.step + 1  # a prefill starts a generation
        if self.step == self.keep:
            logits = out["logits"].copy()
            logits[..., self.eos] = logits.max() + 10.0
            out = {**out, "logits": logits}
            self.truncated += 1
        return out

    def close(self) -> None:
        self.inner.close()
