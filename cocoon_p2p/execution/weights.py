"""Content-addressed ids for the weights an engine serves (GGUF files, safetensors folders).

A worker that fronts an engine (:mod:`.engine`) names the weights the engine loaded;
the model id it advertises is a digest of those bytes, so a client asking for an id
gets exactly those weights, and a 4-bit variant never shares an id with its fp32
original (different bytes, different id):

* a GGUF file: the SHA-256 of the file (what ``sha256sum`` prints), as for ONNX models;
* a safetensors folder: the SHA-256 of a manifest, ``[[relative path, size, sha256],
  ...]`` sorted by path, over its ``*.safetensors`` shards, ``config.json`` and the
  tokenizer and generation files beside them (domain ``cocoon/weights-manifest/1``).

Hashing gigabytes takes a while, so each file's digest is cached in a small JSON file
keyed by its path, size, mtime, inode and ctime: a file replaced in place (even with
its mtime kept, as ``cp -p`` does) changes its ctime and is hashed again.

The variant (quantization) comes from the GGUF header's ``general.file_type`` (else
the file name), or from a safetensors ``config.json`` (``quantization_config``, else
``torch_dtype``). No I/O beyond reading those files.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cocoon_p2p.core import wire
from cocoon_p2p.core.durable import write_atomic

from .models import ModelError, file_sha256

MANIFEST_DOMAIN = b"cocoon/weights-manifest/1\0"
CACHE_VERSION = 1
# Files of a safetensors folder that change what the engine computes, besides the shards.
SIDE_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    }
)
GGUF_MAGIC = b"GGUF"
MAX_GGUF_KEYS = 1 << 16  # a header claiming more is not one we read
MAX_GGUF_STRING = 1 << 24
# llama.cpp's LLAMA_FTYPE values (include/llama.h), as variant names.
GGUF_FILE_TYPES = {
    0: "fp32", 1: "fp16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k", 11: "q3_k_s",
    12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k",
    19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s", 22: "iq3_xs", 23: "iq3_xxs", 24: "iq1_s", 25: "iq4_nl",
    26: "iq3_s", 27: "iq3_m", 28: "iq2_s", 29: "iq2_m", 30: "iq4_xs", 31: "iq1_m", 32: "bf16", 36: "tq1_0",
    37: "tq2_0", 38: "mxfp4_moe", 39: "nvfp4", 40: "q1_0", 41: "q2_0",
}  # fmt: skip
_NAME_VARIANT = re.compile(r"(?i)(i?q\d(?:_[a-z0-9]+)*|tq\d_\d|bf16|fp?16|fp?32)")
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8"}
# GGUF value types: the fixed-size ones by their struct format.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class WeightsFormat(enum.Enum):
    """How the weights are stored."""

    GGUF = "gguf"
    SAFETENSORS = "safetensors"


@dataclass(frozen=True)
class WeightFile:
    """One hashed file: its path relative to the weights' root, size and SHA-256."""

    path: str
    size: int
    sha256: bytes


@dataclass(frozen=True)
class Weights:
    """Weights an engine serves, identified: ``model_id`` is what a worker advertises.

    ``cache_hits`` counts the files whose digest came from the cache (not re-read)."""

    path: Path
    model_id: bytes
    format: WeightsFormat
    variant: str
    files: tuple[WeightFile, ...]
    cache_hits: int = 0

    @property
    def id_hex(self) -> str:
        return self.model_id.hex()


class DigestCache:
    """Files' SHA-256 by (path, size, mtime, inode, ctime), kept in a JSON file (None: in memory)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}  # a damaged cache only costs a re-hash
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
                self._entries = data["files"]

    @staticmethod
    def _stamp(st: os.stat_result) -> dict[str, int]:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}

    def digest(self, path: Path) -> tuple[bytes, int, bool]:
        """(SHA-256, size, whether it came from the cache) of ``path``."""
        key = str(path.resolve())
        st = path.stat()
        stamp = self._stamp(st)
        entry = self._entries.get(key)
        if entry is not None and all(entry.get(k) == v for k, v in stamp.items()):
            try:
                return bytes.fromhex(str(entry["sha256"])), st.st_size, True
            except (KeyError, ValueError):
                pass
        digest = file_sha256(path)
        if path.stat().st_mtime_ns != st.st_mtime_ns:  # written while we read: do not remember it
            return digest, st.st_size, False
        self._entries[key] = {**stamp, "sha256": digest.hex()}
        self._dirty = True
        return digest, st.st_size, False

    def save(self) -> None:
        """Write the cache back (atomically) if it learnt anything."""
        if self.path is None or not self._dirty:
            return
        body = json.dumps({"version": CACHE_VERSION, "files": self._entries}, sort_keys=True, indent=1)
        write_atomic(self.path, body.encode(), mode=0o644)
        self._dirty = False


def identify_weights(path: Path, *, cache_file: Path | None = None) -> Weights:
    """The id, format and variant of a GGUF file or a safetensors folder at ``path``.

    Digests are cached in ``cache_file`` (None: not kept). ModelError when ``path`` is
    neither a GGUF file nor a folder holding ``*.safetensors`` files."""
    cache = DigestCache(cache_file)
    try:
        if path.is_file():
            weights = _gguf(path, cache)
        elif path.is_dir():
            weights = _safetensors(path, cache)
        else:
            raise ModelError(f"weights {path} do not exist")
    finally:
        cache.save()
    return weights


def _gguf(path: Path, cache: DigestCache) -> Weights:
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (nor a safetensors folder)")
    file_type = gguf_file_type(path)
    variant = GGUF_FILE_TYPES.get(file_type, f"ftype{file_type}") if file_type is not None else _variant_of_name(path)
    digest, size, hit = cache.digest(path)
    return Weights(path, digest, WeightsFormat.GGUF, variant, (WeightFile(path.name, size, digest),), int(hit))


def _safetensors(folder: Path, cache: DigestCache) -> Weights:
    chosen = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and (p.suffix == ".safetensors" or p.name in SIDE_FILES)
    )
    if not any(p.suffix == ".safetensors" for p in chosen):
        raise ModelError(f"{folder} holds no *.safetensors files")
    files, hits = [], 0
    for p in chosen:
        digest, size, hit = cache.digest(p)
        files.append(WeightFile(p.relative_to(folder).as_posix(), size, digest))
        hits += hit
    manifest = wire.pack([[f.path, f.size, f.sha256] for f in files])
    model_id = hashlib.sha256(MANIFEST_DOMAIN + manifest).digest()
    return Weights(folder, model_id, WeightsFormat.SAFETENSORS, _config_variant(folder), tuple(files), hits)


def _config_variant(folder: Path) -> str:
    """A safetensors model's variant from its config: its quantization, else its dtype."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        bits = quant.get("bits") or quant.get("w_bit")
        return f"{quant['quant_method']}-{bits}bit" if bits else str(quant["quant_method"])
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "unknown")
    return _DTYPES.get(dtype, dtype)


def _variant_of_name(path: Path) -> str:
    """A GGUF file's quantization as its name spells it (``...Q4_K_M.gguf``), else ``unknown``."""
    for part in reversed(re.split(r"[.\-]", path.stem)):
        if _NAME_VARIANT.fullmatch(part):
            name = part.lower()
            return {"f16": "fp16", "f32": "fp32"}.get(name, name)
    return "unknown"


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` from a GGUF header (None when absent). Reads only the header's
    key-value pairs, up to that key. ModelError for a header it cannot parse."""
    with path.open("rb") as f:
        try:
            return _read_file_type(f)
        except (struct.error, UnicodeDecodeError, EOFError) as exc:
            raise ModelError(f"{path}: damaged GGUF header ({exc})") from exc


def _read_file_type(f: BinaryIO) -> int | None:
    magic, version = struct.unpack("<4sI", _read(f, 8))
    if magic != GGUF_MAGIC or version < 2:
        raise ModelError(f"unsupported GGUF version {version}")
    _tensors, keys = struct.unpack("<QQ", _read(f, 16))
    if keys > MAX_GGUF_KEYS:
        raise ModelError(f"GGUF header claims {keys} keys")
    for _ in range(keys):
        key = _string(f)
        vtype = struct.unpack("<I", _read(f, 4))[0]
        if key == "general.file_type" and vtype in _GGUF_SCALARS:
            fmt = "<" + _GGUF_SCALARS[vtype]
            return int(struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0])
        _skip_value(f, vtype)
    return None


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError("truncated GGUF header")
    return data


def _string(f: BinaryIO) -> str:
    n = struct.unpack("<Q", _read(f, 8))[0]
    if n > MAX_GGUF_STRING:
        raise ModelError(f"GGUF string of {n} bytes")
    return _read(f, n).decode("utf-8")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _GGUF_SCALARS:
        f.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == _GGUF_STRING:
        n = struct.unpack("<Q", _read(f, 8))[0]
        f.seek(n, os.SEEK_CUR)
    elif vtype == _GGUF_ARRAY:
        etype, count = struct.unpack("<IQ", _read(f, 12))
        if etype in _GGUF_SCALARS:
            f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[etype]), os.SEEK_CUR)
        else:
            for _ in range(count):  # strings (a tokenizer's vocabulary) or nested arrays
                _skip_value(f, etype)
    else:
        raise ModelError(f"unknown GGUF value type {vtype}")
