"""`perfx export`: a model perfx reads, written as a Hugging Face LlamaForCausalLM checkpoint
(Qwen2ForCausalLM when it has Q, K and V biases).

The directory gets config.json, generation_config.json, model.safetensors (float32 or float16, the
weights as perfx computes with them: quantized tensors are dequantized; q_proj and k_proj rows, and
their biases, back in HF's rotate_half order), tokenizer.json or tokenizer.model, and
tokenizer_config.json with the chat template. It appears only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import PerfxError
from ..model import weights_from_tensors
from ..text.tokenizer import Tokenizer
from .convert import check_writable, write_error
from .hf import hf_name, unpermute_qk
from .loader import open_model

DTYPES = {"fp32": (np.float32, "float32"), "fp16": (np.float16, "float16")}


def hf_config(c: ModelConfig, tokenizer: Tokenizer, torch_dtype: str, qkv_bias: bool = False) -> dict:
    """config.json: LlamaForCausalLM, or Qwen2ForCausalLM (whose q/k/v_proj have biases) with qkv_bias."""
    if qkv_bias:
        arch = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
    else:
        arch = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "mlp_bias": False}
    return {
        **arch,
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.ctx_len, "rms_norm_eps": float(str(np.float32(c.norm_eps))), "rope_theta": c.rope_base,
        "rope_scaling": None, "vocab_size": c.vocab_size, "tie_word_embeddings": c.tied_embedding,
        "hidden_act": "silu", "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": torch_dtype,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "_name_or_path": c.name,
    }


def hf_tensors(model, dtype: type) -> dict[str, np.ndarray]:
    """The model's tensors under HF names, dequantized, with q/k rows (and biases) in HF order."""
    c = model.config
    out = {}
    for name, t in model.tensors.items():
        if name == "output.weight" and c.tied_embedding:
            continue
        w = t.dequantize().reshape(t.shape)
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, c.n_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, c.n_kv_heads)
        suffix = ".bias" if name.endswith(".bias") else ".weight"
        out[hf_name(name) + suffix] = np.ascontiguousarray(w.astype(dtype))
    return out


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise PerfxError(f"{out} is a file; give a directory for the checkpoint")
        if not force:
            raise PerfxError(f"{out} exists; pass --force to replace it")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise PerfxError(f"{out} is not empty and holds no Hugging Face checkpoint; refusing to replace it")
    if not out.parent.is_dir():
        raise PerfxError(f"the folder {out.parent} does not exist; create it first")


def export_hf(source: str | Path, out_dir: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write `source` as a Hugging Face checkpoint directory `out_dir`."""
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise PerfxError(f"--dtype must be fp32 or fp16 (got {dtype})")
    out = Path(out_dir)
    check_output_dir(out, force)
    check_writable(out.parent, out.name)
    model = open_model(source)
    c = model.config
    c.check_plain("perfx export")
    qkv_bias = any(l.bqkv is not None for l in weights_from_tensors(model.tensors, c, model.path).layers)
    if c.rope_dim != c.head_dim:
        raise PerfxError(f"{model.path}: RoPE on {c.rope_dim} of {c.head_dim} head dimensions has no "
                         "LlamaForCausalLM equivalent")
    np_dtype, torch_dtype = DTYPES[dtype]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    umask = _umask()
    try:
        save_file(hf_tensors(model, np_dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok = model.tokenizer
        tok.save(tmp)
        tok_config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        fast = (tmp / "tokenizer.json").is_file()
        tok_config.update({"tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer",
                           "model_max_length": c.ctx_len})
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "config.json", hf_config(c, tok, torch_dtype, qkv_bias))
        _write_json(tmp / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        raise write_error(out, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
