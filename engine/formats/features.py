"""What a model file asks for, against what each architecture implements: the rest is refused, never dropped.

A GGUF file asks by its "{arch}." metadata keys and by its tensors; a Hugging Face config.json by the keys
that change the computation. Each architecture declares, as data, the keys and tensors perfx runs for it;
a file asking for anything else (YaRN or LongRoPE scaling, logit soft-capping, experts, an unknown tensor) is refused in one line that names every such request. To support
a feature, implement it and add its entry to the architecture's set.

Entries: "KEY" for a GGUF key without its "{arch}." prefix, "tensor NAME" for a tensor (its "blk.N."
prefix dropped), "config KEY" for a config.json key ("config rope_scaling.TYPE" for a RoPE scaling type).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import ModelFileError

LLAMA = frozenset({
    # GGUF keys
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count", "tensor_data_layout",
    # tensors
    "tensor token_embd.weight", "tensor output_norm.weight", "tensor output.weight",
    *(f"tensor {t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                     "ffn_gate", "ffn_up", "ffn_down")),
    "tensor attn_q.bias", "tensor attn_k.bias", "tensor attn_v.bias",
    # config.json: a sliding window is run by capping the context at the window (identical within it)
    "config sliding_window",
})

# Llama 3's frequency factors (`rope_freqs`), linear RoPE scaling and a Mistral-style sliding window
LLAMA_3 = LLAMA | {"tensor rope_freqs.weight", "rope.scaling.type", "rope.scaling.factor",
                   "attention.sliding_window"}

GEMMA3 = LLAMA | {
    "attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa",
    "rope.scaling.type", "rope.scaling.factor",
    *(f"tensor {t}.weight" for t in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")),
}

PHI3 = LLAMA_3 | {"tensor attn_qkv.weight"}   # Q, K and V as one matrix; ffn_up holds gate and up

SUPPORTED: dict[str, frozenset[str]] = {   # by perfx's architecture name (ModelConfig.arch)
    "llama": LLAMA_3,
    "qwen2": LLAMA_3,
    "gemma3": GEMMA3,
    "phi3": PHI3,
}

# GGUF keys whose value asks for nothing when it is one of these (e.g. rope.scaling.type "none")
NEUTRAL = {
    "rope.scaling.type": ("none",), "rope.scaling.factor": (0.0, 1.0), "rope.scaling.attn_factor": (1.0,),
    "rope.scaling.original_context_length": None, "rope.scaling.finetuned": None,   # None: any value
    "rope.scale_linear": (1.0,),
    "expert_count": (0,), "expert_used_count": (0,), "attention.causal": (True,),
    "attention.sliding_window": (0,), "final_logit_softcapping": (0.0,), "attn_logit_softcapping": (0.0,),
    "embedding_scale": (1.0,), "residual_scale": (1.0,), "logit_scale": (1.0,),
    "attention.clamp_kqv": (0.0,), "use_parallel_residual": (False,),
}

# config.json keys that change the computation: (the values that ask for nothing, what the key asks for)
HF_KEYS = {
    "rope_scaling": ((None, {}), "scaled RoPE"), "partial_rotary_factor": ((None, 1, 1.0), "RoPE on part of a head"),
    "attention_bias": ((None, False), "biases on q/k/v_proj and o_proj"),
    "mlp_bias": ((None, False), "biases on gate/up/down_proj"), "hidden_act": ((None, "silu"), "another activation"),
    "sliding_window": ((None, 0), "sliding-window attention"),
    "attn_logit_softcapping": ((None, 0, 0.0), "soft-capped attention scores"),
    "final_logit_softcapping": ((None, 0, 0.0), "soft-capped logits"),
    "num_local_experts": ((None, 0, 1), "mixture of experts"), "num_experts": ((None, 0, 1), "mixture of experts"),
    "qk_layernorm": ((None, False), "Q and K norms"), "use_qk_norm": ((None, False), "Q and K norms"),
    "logits_scaling": ((None, 1, 1.0), "scaled logits"), "embedding_multiplier": ((None, 1, 1.0), "scaled embeddings"),
    "residual_multiplier": ((None, 1, 1.0), "scaled residuals"), "attention_multiplier": ((None,), "scaled attention"),
    "pretraining_tp": ((None, 1), "tensor-parallel slicing of the linears"),
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _neutral(value, allowed) -> bool:
    """Whether `value` is one of `allowed` (None: any value), True and 1 told apart."""
    return allowed is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def gguf_requests(arch: str, metadata: dict, tensor_names: Iterable[str], n_layers: int) -> dict[str, str]:
    """Every "{arch}." key (with a non-neutral value) and every tensor of a GGUF file: {entry: as shown}."""
    out = {}
    for key, value in metadata.items():
        if key.startswith(arch + "."):
            name = key[len(arch) + 1:]
            if not (name in NEUTRAL and _neutral(value, NEUTRAL[name])):
                out[name] = f"{key}={value!r:.40}"
    return {**out, **tensor_requests(tensor_names, n_layers)}


def tensor_requests(tensor_names: Iterable[str], n_layers: int) -> dict[str, str]:
    """Each tensor as an entry, "tensor NAME" with a "blk.N." prefix (N < n_layers) dropped."""
    out = {}
    for t in tensor_names:
        m = _BLOCK.match(t)
        out[f"tensor {m.group(2)}" if m and int(m.group(1)) < n_layers else f"tensor {t}"] = f"tensor {t}"
    return out


def hf_requests(cfg: dict) -> dict[str, str]:
    """The config.json keys that change the computation, where their value asks for something."""
    out = {}
    for key, (neutral, what) in HF_KEYS.items():
        value = cfg.get(key)
        if key == "sliding_window" and cfg.get("use_sliding_window") is False or _neutral(value, neutral):
            continue
        if key == "rope_scaling" and isinstance(value, dict):
            kind = value.get("rope_type", value.get("type"))
            if kind not in (None, "default"):
                out[f"config rope_scaling.{kind!s:.20}"] = f"rope_scaling {kind!r:.20}"
            continue
        out[f"config {key}"] = f"{key} {value!r:.40} ({what})"
    return out


def refuse_unsupported(where, arch: str, requests: dict[str, str], supported: frozenset[str] | None = None) -> None:
    """A ModelFileError naming every request (entry: as shown) that `arch` does not implement (or, given,
    that is not in `supported`: a format that carries less than GGUF)."""
    supported = SUPPORTED.get(arch, frozenset()) if supported is None else supported
    missing = [shown for entry, shown in requests.items() if entry not in supported]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelFileError(f"{where}: {shown} {'is' if len(missing) == 1 else 'are'} not supported by perfx for "
                             f"{arch}; it would run wrong without {'it' if len(missing) == 1 else 'them'}, so the "
                             "model is refused")
