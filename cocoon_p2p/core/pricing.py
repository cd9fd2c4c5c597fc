"""A worker's price for one model: nanoton per unit of input and per generated token.

As COCOON prices, a generation's prompt tokens and its completion tokens may cost
differently (a completion token takes a whole decode step; a prompt token a share of
one batched prefill). Every other unit (a tensor row, an embedded token, a verified
token) is priced as input. On the wire the completion price travels only when it
differs from the input price, so a flat price reads as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Price:
    """Nanoton per input unit (``unit``) and per generated token (``completion``)."""

    unit: int
    completion: int

    def __post_init__(self) -> None:
        if self.unit < 0 or self.completion < 0:
            raise ConfigError(f"a price is not negative: {self.unit}, {self.completion}")

    @classmethod
    def of(cls, unit: int, completion: int | None = None) -> Price:
        """``unit`` for everything, or ``completion`` per generated token when given."""
        return cls(unit, unit if completion is None else completion)

    @property
    def completion_wire(self) -> int | None:
        """The completion price as a message carries it: None when it is the input price."""
        return None if self.completion == self.unit else self.completion

    @property
    def highest(self) -> int:
        """The higher of the two: what a client's cap per unit is held against."""
        return max(self.unit, self.completion)

    def label(self, unit: str) -> str:
        """As people read it: ``1000/token``, or ``1000/token+3000/generated``."""
        flat = f"{self.unit}/{unit}"
        return flat if self.completion == self.unit else f"{flat}+{self.completion}/generated"

    def cost(self, units: int, completion_units: int = 0) -> int:
        """What ``units`` cost, ``completion_units`` of them generated tokens."""
        return (units - completion_units) * self.unit + completion_units * self.completion


FREE = Price(0, 0)  # what an unpaid network charges
