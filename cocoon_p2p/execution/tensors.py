"""Named tensors on the wire: dtype, shape and raw little-endian bytes.

Pure data (no numpy import at module level): the job protocol and the simulator
handle tensors as bytes; backends convert with :func:`to_numpy` / :func:`from_numpy`.
A decoded tensor is always self-consistent: its byte length equals the product
of its shape times the item size of its dtype, and it stays within the limits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage
from cocoon_p2p.core.wire import expect_bytes, expect_int, expect_list, expect_str

if TYPE_CHECKING:
    import numpy as np

# dtype name -> item size in bytes. Names are numpy's, so conversion is direct.
DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
MAX_RANK = 8
MAX_NAME = 128


@dataclass(frozen=True, slots=True)
class Tensor:
    """One named tensor: ``data`` holds ``prod(shape)`` items of ``dtype``, little-endian, C order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise LocalProtocolError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")
        if len(self.shape) > MAX_RANK or any(d < 0 for d in self.shape):
            raise LocalProtocolError(f"tensor {self.name!r}: invalid shape {self.shape}")
        if len(self.data) != self.nbytes_expected:
            raise LocalProtocolError(
                f"tensor {self.name!r}: {len(self.data)} bytes for shape {self.shape} of {self.dtype}"
            )

    @property
    def nbytes_expected(self) -> int:
        n = DTYPES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.data]

    @classmethod
    def from_wire(cls, obj: Any, *, max_bytes: int) -> Tensor:
        """Parse and check a wire tensor; MalformedMessage on any inconsistency."""
        name, dtype, shape, data = expect_list(obj, 4, "tensor")
        name = expect_str(name, "tensor name", max_len=MAX_NAME, min_len=1)
        dtype = expect_str(dtype, "tensor dtype", max_len=16)
        if dtype not in DTYPES:
            raise MalformedMessage(f"tensor {name!r}: unsupported dtype {dtype!r}", code="bad-input")
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise MalformedMessage(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} dims")
        dims = tuple(expect_int(d, "tensor dim", hi=2**31) for d in shape)
        data = expect_bytes(data, "tensor data", max_len=max_bytes)
        try:
            return cls(name, dtype, dims, data)
        except LocalProtocolError as exc:
            raise MalformedMessage(str(exc), code="bad-input") from exc


def from_numpy(name: str, array: np.ndarray[Any, Any]) -> Tensor:
    """A Tensor holding a copy of ``array`` (made C-contiguous and little-endian)."""
    import numpy as np

    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return Tensor(name, dtype_name(a.dtype), tuple(int(d) for d in a.shape), a.tobytes())


def to_numpy(tensor: Tensor) -> np.ndarray[Any, Any]:
    """A read-only numpy view of the tensor's bytes."""
    import numpy as np

    return np.frombuffer(tensor.data, dtype=_little_endian(tensor.dtype)).reshape(tensor.shape)


# numpy builds dtype names and dtypes in Python (~9 us per tensor here): once per dtype is enough.
@functools.cache
def dtype_name(dtype: np.dtype[Any]) -> str:
    """numpy's name of ``dtype`` (``str(dtype)``), as the wire and IOSpec use it."""
    return str(dtype)


@functools.cache
def _little_endian(name: str) -> np.dtype[Any]:
    import numpy as np

    return np.dtype(name).newbyteorder("<")
