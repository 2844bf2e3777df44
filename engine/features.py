"""What a model file asks for, against what each architecture implements: the rest is refused, never dropped.

A GGUF file asks by its "{arch}." metadata keys and by its tensors; a Hugging Face config.json by the keys
that change the computation. Each architecture declares, as data, the keys and tensors perfx runs for it;
a file asking for anything else (Llama 3's `rope_freqs`, `{arch}.rope.scaling.*`, a sliding window, logit
soft-capping, experts, an unknown tensor) is refused in one line that names every such request. To support
a feature, implement it and add its entry to the architecture's set.

Entries: "KEY" for a GGUF key without its "{arch}." prefix, "tensor NAME" for a tensor (its "blk.N."
prefix dropped), "config KEY" or "config KEY=VALUE" for a config.json key.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

from .errors import ModelFileError

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

SUPPORTED: dict[str, frozenset[str]] = {   # by perfx's architecture name (ModelConfig.arch)
    "llama": LLAMA,
    "qwen2": LLAMA,
}

# GGUF keys whose value asks for nothing when it is one of these (e.g. rope.scaling.type "none")
NEUTRAL = {
    "rope.scaling.type": ("none",), "rope.scaling.factor": (0.0, 1.0), "rope.scaling.attn_factor": (1.0,),
    "rope.scaling.original_context_length": None, "rope.scaling.finetuned": None,   # None: any value
    "expert_count": (0,), "expert_used_count": (0,), "attention.causal": (True,),
    "attention.sliding_window": (0,), "final_logit_softcapping": (0.0,), "attn_logit_softcapping": (0.0,),
    "embedding_scale": (1.0,), "residual_scale": (1.0,), "logit_scale": (1.0,),
    "attention.clamp_kqv": (0.0,), "use_parallel_residual": (False,),
}

# config.json keys that change the computation, with the values that ask for nothing
HF_NEUTRAL = {
    "rope_scaling": (None, {}), "partial_rotary_factor": (None, 1, 1.0), "attention_bias": (None, False),
    "mlp_bias": (None, False), "hidden_act": (None, "silu"), "sliding_window": (None, 0),
    "attn_logit_softcapping": (None, 0, 0.0), "final_logit_softcapping": (None, 0, 0.0),
    "num_local_experts": (None, 0, 1), "num_experts": (None, 0, 1), "qk_layernorm": (None, False),
    "use_qk_norm": (None, False), "logits_scaling": (None, 1, 1.0), "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0), "attention_multiplier": (None,), "pretraining_tp": (None, 1),
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _neutral(value, allowed) -> bool:
    """Whether `value` is one of `allowed` (None: any value), True and 1 told apart."""
    return allowed is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def gguf_requests(arch: str, metadata: dict, tensor_names: Iterable[str], n_layers: int) -> list[str]:
    """Every "{arch}." key (with a non-neutral value) and every tensor of a GGUF file, as entries."""
    out = []
    for key, value in metadata.items():
        if key.startswith(arch + "."):
            name = key[len(arch) + 1:]
            if name in NEUTRAL and _neutral(value, NEUTRAL[name]):
                continue
            out.append(f"{name}={value!r:.40}")
    for t in tensor_names:
        m = _BLOCK.match(t)
        out.append(f"tensor {m.group(2)}" if m and int(m.group(1)) < n_layers else f"tensor {t}")
    return out


def hf_requests(cfg: dict) -> list[str]:
    """The config.json keys that change the computation, where their value asks for something."""
    out = []
    for key, allowed in HF_NEUTRAL.items():
        value = cfg.get(key)
        if key == "sliding_window" and cfg.get("use_sliding_window") is False:
            continue
        if key == "rope_scaling" and isinstance(value, dict) and value.get("rope_type", value.get("type")) in (
                None, "default"):
            continue
        if not _neutral(value, allowed):
            out.append(f"config {key}")
    return out


def refuse_unsupported(where, arch: str, requests: Iterable[str]) -> None:
    """A ModelFileError naming every request that `arch` does not implement (the entry or its KEY before '=')."""
    supported = SUPPORTED.get(arch, frozenset())
    missing = list(dict.fromkeys(r for r in requests if r not in supported and r.split("=")[0] not in supported))
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelFileError(f"{where} asks for what perfx does not implement for {arch}: {shown}; "
                             "it would run wrong without them, so it is refused")
