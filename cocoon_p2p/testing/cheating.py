"""A dishonest worker's backend, for adversarial tests and ``cocoon-node demo --cheating-worker``.

It runs the real model, then, on a share of its runs, replaces every float output by
values of the same shape and dtype that are wrong: random rows scaled to the real
rows' norms (so an embedding still looks like a unit vector). The frames stay valid;
only checking the values can tell.
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
