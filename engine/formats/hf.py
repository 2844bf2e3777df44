"""Hugging Face checkpoint directories, plain or quantized by AutoAWQ, read into GGUF-named tensors.

A directory holds config.json, the weights as *.safetensors (sharded ones listed in
model.safetensors.index.json), tokenizer.json or tokenizer.model, and tokenizer_config.json.

Q and K: HF checkpoints rotate pairs (i, i + head_dim/2) ("rotate_half"); perfx, like GGUF, rotates
adjacent pairs (2i, 2i+1). Reading permutes the rows of q_proj and k_proj per head as llama.cpp's
converter does (`permute_qk`); writing a checkpoint applies the inverse (`unpermute_qk`).

Qwen2ForCausalLM is the same block with biases on q_proj, k_proj and v_proj: they become
`blk.N.attn_{q,k,v}.bias`, the q and k biases permuted like the rows of their weights.

AutoAWQ "gemm" checkpoints: per linear `qweight` int32 [in, out/8] and `qzeros` int32 [in/group, out/8],
each word holding 8 output channels in the nibble order (0, 2, 4, 6, 1, 3, 5, 7), and `scales` fp16
[in/group, out]; w = (q - z) * s. They become INT4 tensors without requantizing.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import ModelConfig, checked_config
from ..errors import ModelFileError, PerfxError
from ..text.tokenizer import Tokenizer
from .features import hf_requests, refuse_unsupported
from .loader import ModelFile
from .perfx_format import read_safetensors
from .tensors import QTensor, int4_tensor

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
QKV_BIASED = ("Qwen2ForCausalLM",)     # architectures whose q/k/v projections (only) have biases
QKV = ("attn_q", "attn_k", "attn_v")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # output channel held by nibble i of a packed word

GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str:
    """The HF module name of a GGUF tensor name, without the ".weight" (or ".bias") suffix."""
    base = gguf_name.removesuffix(".weight").removesuffix(".bias")
    if base.startswith("blk."):
        _, i, part = base.split(".", 2)
        return f"model.layers.{i}.{next(k for k, v in LAYER_NAMES.items() if v == part)}"
    return next(k for k, v in GLOBAL_NAMES.items() if v == base)


def gguf_name(module: str) -> str | None:
    """The GGUF tensor name (".weight" included) of an HF module name, or None when perfx has no such tensor."""
    if module in GLOBAL_NAMES:
        return GLOBAL_NAMES[module] + ".weight"
    m = _LAYER.match(module)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of an HF q_proj / k_proj (or of anything indexed by its output channels) in GGUF order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`: GGUF rows back in HF order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- config -----------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PerfxError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise PerfxError(f"{path} is not valid JSON ({e}); fix or replace it") from None
    if not isinstance(data, dict):
        raise PerfxError(f"{path} is not a JSON object")
    return data


def architecture(cfg: dict) -> str:
    """The model class an HF config.json names ("LlamaForCausalLM", ...)."""
    names = cfg.get("architectures")
    if names is None:
        return str(cfg.get("model_type", "?"))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelFileError(f"'architectures' is {names!r:.60}, not a list of class names; the config is corrupt")
    return names[0]


HF_KEYS = {   # ModelConfig field: its config.json key
    "n_layers": "num_hidden_layers", "dim": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "ffn_dim": "intermediate_size",
    "vocab_size": "vocab_size", "ctx_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
    "rope_base": "rope_theta", "tied_embedding": "tie_word_embeddings",
}


def config_from_hf(cfg: dict, directory: Path) -> ModelConfig:
    """A ModelConfig from an HF config.json, refusing what perfx's LLaMA block cannot run."""
    where = directory / "config.json"
    try:
        arch = architecture(cfg)
    except ModelFileError as e:
        raise ModelFileError(f"{where}: {e}") from None
    if arch not in ARCHITECTURES:
        raise PerfxError(f"{where}: architecture {arch} is not supported (supported: {', '.join(ARCHITECTURES)})")
    name = "qwen2" if arch in QKV_BIASED else "llama"
    refuse_unsupported(where, name, hf_requests(cfg))

    values = {field: cfg[key] for field, key in HF_KEYS.items() if cfg.get(key) is not None}
    for field in ("n_layers", "dim", "n_heads", "ffn_dim", "vocab_size", "ctx_len"):
        if field not in values:
            raise PerfxError(f"{where}: '{HF_KEYS[field]}' is missing; the config is incomplete")
    dim, n_heads = values["dim"], values["n_heads"]
    if "head_dim" not in values and isinstance(dim, int) and isinstance(n_heads, int) and n_heads > 0:
        values["head_dim"] = dim // n_heads
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if isinstance(window, int) and not isinstance(window, bool) and window > 0 and isinstance(values["ctx_len"], int):
        values["ctx_len"] = min(values["ctx_len"], window)     # within the window, plain attention is the same
    values.setdefault("n_kv_heads", n_heads)
    values.setdefault("norm_eps", 1e-6)
    values.setdefault("rope_base", 10000.0)
    values.setdefault("tied_embedding", False)
    values.update(arch=name, rope_dim=values.get("head_dim", 0), name=str(cfg.get("_name_or_path") or directory.name))
    return checked_config(values, str(where), HF_KEYS)


def awq_config(cfg: dict, directory: Path) -> dict | None:
    """The AutoAWQ quantization config (config.json's quantization_config or quant_config.json), checked."""
    q = cfg.get("quantization_config")
    if q is None and (directory / "quant_config.json").is_file():
        q = read_json(directory / "quant_config.json")
    if not q:
        return None
    if not isinstance(q, dict):
        raise ModelFileError(f"{directory}: quantization_config is {q!r:.40}, not an object; the config is corrupt")
    method = q.get("quant_method", "awq")
    if method != "awq":
        raise PerfxError(f"{directory}: quantization method {method!r} is not supported (perfx imports AutoAWQ)")
    bits = int(q.get("bits", q.get("w_bit", 4)))
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    version = str(q.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not q.get("zero_point", True):
        raise PerfxError(f"{directory}: AutoAWQ {bits}-bit '{version}' zero_point={q.get('zero_point', True)} is "
                         "not supported; perfx imports 4-bit GEMM checkpoints with zero points")
    if group not in (32, 64, 128):
        raise PerfxError(f"{directory}: AutoAWQ group size {group} is not supported (32, 64 or 128)")
    return {"bits": 4, "group_size": group, "version": "gemm"}


# ---- weights ----------------------------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PerfxError(f"{directory}: shard {missing[0]} listed in {index.name} is missing; download it")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise PerfxError(f"{directory} has PyTorch .bin weights; perfx reads .safetensors: re-save the model "
                             "with safe_serialization=True")
        raise PerfxError(f"{directory} has no *.safetensors weights")
    return files


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, cols/8] in AutoAWQ's nibble order -> uint8 [rows, cols] in 0..15."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    out = np.empty((*words.shape, 8), np.uint8)
    for i, channel in enumerate(AWQ_ORDER):
        out[..., channel] = (words >> np.uint32(4 * i)) & np.uint32(0xF)
    return out.reshape(words.shape[0], -1)


def read_hf(directory: str | Path) -> ModelFile:
    """Open a Hugging Face checkpoint directory (plain or AutoAWQ) as a ModelFile."""
    directory = Path(directory)
    cfg = read_json(directory / "config.json")
    config = config_from_hf(cfg, directory)
    awq = awq_config(cfg, directory)
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise PerfxError(f"{directory} has no tokenizer.json or tokenizer.model; copy the model's tokenizer files "
                         "into it")
    tokenizer = Tokenizer.from_files(directory)

    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for f in weight_files(directory):
        st = read_safetensors(f)
        arrays.update(st.arrays)
        dtypes.update(st.dtypes)

    biased = architecture(cfg) in QKV_BIASED
    expected = expected_shapes(config, biased)
    modules: dict[str, dict[str, str]] = {}
    for name in arrays:
        if IGNORED.match(name):
            continue
        module, _, kind = name.rpartition(".")
        target = gguf_name(module)
        if kind == "bias" and not (biased and target is not None and target.split(".")[-2] in QKV):
            raise PerfxError(f"{directory}: tensor {name} is a bias, which perfx's model has only on q_proj, "
                             f"k_proj and v_proj of {', '.join(QKV_BIASED)} (this is {architecture(cfg)})")
        if target is None or kind not in ("weight", "qweight", "qzeros", "scales", "bias"):
            raise PerfxError(f"{directory}: tensor {name} is not part of a LLaMA model; the checkpoint's "
                             "architecture differs from its config.json")
        modules.setdefault(module, {})[kind] = name

    tensors: dict[str, QTensor] = {}
    for module, parts in modules.items():
        target = gguf_name(module)
        if target == "output.weight" and config.tied_embedding:
            continue
        shape = expected[target]
        if "weight" in parts:
            tensors[target] = _plain(target, arrays[parts["weight"]], dtypes[parts["weight"]], shape, config,
                                     parts["weight"], directory)
        elif awq is not None and {"qweight", "qzeros", "scales"} <= set(parts):
            tensors[target] = _awq(target, {k: arrays[v] for k, v in parts.items()}, shape, awq["group_size"],
                                   config, module, directory)
        else:
            raise PerfxError(f"{directory}: {module} has {sorted(parts)}, neither a weight nor AutoAWQ's "
                             "qweight/qzeros/scales")
        if "bias" in parts:
            bias = target.removesuffix(".weight") + ".bias"
            tensors[bias] = _plain(bias, arrays[parts["bias"]], dtypes[parts["bias"]], expected[bias], config,
                                   parts["bias"], directory)
    if "output.weight" not in tensors and not config.tied_embedding:
        config = replace(config, tied_embedding=True)
    for name in expected:
        if name not in tensors and not (name == "output.weight" and config.tied_embedding):
            suffix = name.rpartition(".")[2]
            raise PerfxError(f"{directory}: tensor {hf_name(name)}.{suffix} is missing; the checkpoint is incomplete")
    metadata = {"config.json": cfg, **({"quantization_config": awq} if awq else {})}
    return ModelFile(directory, "awq" if awq else "hf", config, tensors, tokenizer, metadata)


def expected_shapes(c: ModelConfig, biased: bool = False) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor by GGUF name; with `biased`, the Q, K and V biases too."""
    shapes = {"token_embd.weight": (c.vocab_size, c.dim), "output_norm.weight": (c.dim,),
              "output.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (c.dim,), p + "ffn_norm.weight": (c.dim,),
            p + "attn_q.weight": (c.q_dim, c.dim), p + "attn_k.weight": (c.kv_dim, c.dim),
            p + "attn_v.weight": (c.kv_dim, c.dim), p + "attn_output.weight": (c.dim, c.q_dim),
            p + "ffn_gate.weight": (c.ffn_dim, c.dim), p + "ffn_up.weight": (c.ffn_dim, c.dim),
            p + "ffn_down.weight": (c.dim, c.ffn_dim),
        })
        if biased:
            shapes.update({p + "attn_q.bias": (c.q_dim,), p + "attn_k.bias": (c.kv_dim,),
                           p + "attn_v.bias": (c.kv_dim,)})
    return shapes


def _heads(name: str, c: ModelConfig) -> int:
    """Heads whose rows (or bias values) `permute_qk` reorders in this tensor, or 0."""
    part = name.split(".")[-2]
    return c.n_heads if part == "attn_q" else c.n_kv_heads if part == "attn_k" else 0


def _plain(name: str, a: np.ndarray, dtype: str, shape: tuple[int, ...], c: ModelConfig, hf: str,
           directory: Path) -> QTensor:
    qtype = {"F32": "F32", "F16": "F16", "BF16": "BF16"}.get(dtype)
    if qtype is None:
        raise PerfxError(f"{directory}: tensor {hf} is {dtype}; perfx reads F32, F16 and BF16 weights")
    if tuple(a.shape) != shape:
        raise PerfxError(f"{directory}: tensor {hf} has shape {list(a.shape)}, expected {list(shape)} "
                         "from config.json")
    if _heads(name, c):
        a = permute_qk(np.asarray(a), _heads(name, c))
    return QTensor(name, qtype, shape, a)


def _awq(name: str, parts: dict[str, np.ndarray], shape: tuple[int, ...], group: int, c: ModelConfig,
         module: str, directory: Path) -> QTensor:
    rows, cols = shape
    if cols % group or rows % 8:
        raise PerfxError(f"{directory}: {module} has {cols} inputs and {rows} outputs; AutoAWQ group {group} "
                         "needs inputs a multiple of the group and outputs a multiple of 8")
    expected = {"qweight": (cols, rows // 8), "qzeros": (cols // group, rows // 8), "scales": (cols // group, rows)}
    for kind, want in expected.items():
        if tuple(parts[kind].shape) != want:
            raise PerfxError(f"{directory}: tensor {module}.{kind} has shape {list(parts[kind].shape)}, expected "
                             f"{list(want)} (AutoAWQ GEMM layout, group {group})")
    if parts["scales"].dtype != np.float16 or parts["qweight"].dtype != np.int32:
        raise PerfxError(f"{directory}: {module} must have int32 qweight/qzeros and F16 scales (AutoAWQ GEMM layout)")
    q = unpack_awq(parts["qweight"]).T                     # [out, in]
    z = unpack_awq(parts["qzeros"]).T.astype(np.float32)   # [out, in/group]
    s = np.asarray(parts["scales"]).T.astype(np.float32)
    zero = (-z * s).astype(np.float16)
    if _heads(name, c):
        h = _heads(name, c)
        q, s, zero = permute_qk(q, h), permute_qk(s, h), permute_qk(zero, h)
    return int4_tensor(name, np.ascontiguousarray(q), s, zero, group)
