"""What one job may ask of a model: input limits, checked before any work starts (pure).

A job's cost grows with its input (texts, characters, tokens) while its price is
per item or per token, so without limits one client can hold a worker's CPU for a
minute and its memory for good (issue 15: 256 texts of 30,000 characters for
MiniLM: 55 s of CPU, 268 MB -> 4.9 GB). Every served model has an
:class:`InputLimits`, derived from the model (:meth:`InputLimits.for_model`) or
given by the operator, which the executor enforces in ``check`` (refusing with
``too-large`` or ``bad-input``) and which a node can advertise with the model.

Text longer than the model's window (``max_text_tokens``):

* embeddings are **truncated** (:attr:`Overflow.TRUNCATE`): the model embeds the
  text's first ``max_seq`` tokens, as sentence-transformers does for
  all-MiniLM-L6-v2 (trained with a 256-token window) and as this worker always
  has; the cost of a truncated text is that of a full window, no more, and the
  character limits refuse texts so long that most of them would be thrown away;
* generation prompts are **refused** (:attr:`Overflow.REFUSE`): cutting a chat
  prompt would cut the question (its end) and answer another one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cocoon_p2p.core.errors import ConfigError

if TYPE_CHECKING:
    from .models import ModelSpec

TOO_LARGE = "too-large"  # the job protocol's codes (as in executor, backends)
BAD_INPUT = "bad-input"

MAX_ROWS = 1 << 16  # a tensor job's rows: as the largest dimension a backend takes
CHARS_PER_WINDOW_TOKEN = 32  # an embedding text: this many characters per window token at most
JOB_CHARS_PER_TOKEN = 8  # characters per job: this many per token of the job's token budget


class Overflow(enum.Enum):
    """What happens to a text longer than the model's window."""

    TRUNCATE = "truncate"
    REFUSE = "refuse"


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """The most one job may ask of a model; anything more is refused before work starts.

    ``max_items``: texts (embedding) or rows (tensor) per job. ``max_text_chars``:
    characters per text (a generation job's prompt is its one text).
    ``max_total_chars``: characters per job. ``max_text_tokens``: tokens of one text
    the model takes (embedding: its window; generation: the prompt), beyond which
    ``overflow`` applies. ``max_job_tokens``: tokens per job after truncation (the
    compute an embedding job may cost; also the most tokens one backend run holds,
    whatever the batch). ``max_new_tokens``: a generation job's ``max_tokens`` at most.
    """

    max_items: int
    max_text_chars: int
    max_total_chars: int
    max_text_tokens: int
    overflow: Overflow
    max_job_tokens: int
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_items", "max_text_chars", "max_total_chars", "max_text_tokens", "max_job_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"input limit {name} must be at least 1, not {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"input limit max_new_tokens must not be negative, not {self.max_new_tokens}")

    @classmethod
    def for_model(cls, spec: ModelSpec) -> InputLimits:
        """Safe defaults from the model's own figures.

        * embedding (MiniLM: ``max_seq`` 256, ``max_batch`` 32): 8 batches' worth of
          texts per job (256), 8,192 characters per text (32 per window token: far
          past the window for prose), a budget of one full batch of full windows
          (8,192 tokens; about 7 s on 2 CPU cores), 8 characters per budget token
          in all (65,536); tokens past the window are truncated.
        * generation (SmolLM2: ``max_context`` 2048): one prompt of at most 16
          characters per context token that, with the tokens asked for, fits the
          context (refused otherwise). New tokens are bounded by the context alone:
          they are paid one by one, and the worker stops between any two of them
          on cancel or deadline.
        * tensor: rows up to the largest dimension a backend takes; the frame
          limit (8 MiB) bounds the rest.
        """
        if spec.kind == "embedding":
            budget = spec.max_batch * spec.max_seq
            return cls(
                max_items=spec.max_batch * 8,
                max_text_chars=spec.max_seq * CHARS_PER_WINDOW_TOKEN,
                max_total_chars=budget * JOB_CHARS_PER_TOKEN,
                max_text_tokens=spec.max_seq,
                overflow=Overflow.TRUNCATE,
                max_job_tokens=budget,
            )
        if spec.kind == "generation":
            return cls(
                max_items=1,
                max_text_chars=spec.max_context * 16,
                max_total_chars=spec.max_context * 16,
                max_text_tokens=spec.max_context,
                overflow=Overflow.REFUSE,
                max_job_tokens=spec.max_context,
                max_new_tokens=spec.max_context,
            )
        return cls(
            max_items=MAX_ROWS,
            max_text_chars=1,
            max_total_chars=1,
            max_text_tokens=1,
            overflow=Overflow.REFUSE,
            max_job_tokens=MAX_ROWS,
        )

    def check_for(self, spec: ModelSpec) -> InputLimits:
        """These limits, if ``spec`` can honour them; ConfigError if not (a text window
        wider than the model's, a generation budget beyond its context)."""
        if spec.kind == "embedding" and self.max_text_tokens > spec.max_seq:
            raise ConfigError(
                f"{spec.name}: a window of {self.max_text_tokens} tokens exceeds the model's {spec.max_seq}"
            )
        if spec.kind == "generation" and self.max_new_tokens < 1:
            raise ConfigError(f"{spec.name}: a generation model needs max_new_tokens >= 1")
        if spec.kind == "generation" and self.max_text_tokens > spec.max_context:
            raise ConfigError(f"{spec.name}: prompts of {self.max_text_tokens} tokens exceed the context")
        return self

    def to_wire(self) -> dict[str, Any]:
        """The limits as plain values (for an announcement, ``status`` or a log)."""
        return {
            "max_items": self.max_items,
            "max_text_chars": self.max_text_chars,
            "max_total_chars": self.max_total_chars,
            "max_text_tokens": self.max_text_tokens,
            "overflow": self.overflow.value,
            "max_job_tokens": self.max_job_tokens,
            "max_new_tokens": self.max_new_tokens,
        }
