"""Random-weight GGUF files in the exact layout llama.cpp writes for each architecture perfx runs.

    spec = GGUFSpec("gemma3")
    write_gguf(tmp_path / "g.gguf", spec)

Tensor names come from gguf-py's own tables (gguf.constants.MODEL_TENSORS / TENSOR_NAMES), metadata
keys from GGUFWriter's methods, as llama.cpp's converter uses them: Q and K rows in the order the
converter leaves them (rotate_half for NEOX-RoPE architectures: qwen2, gemma3, phi3), Gemma's norms
with their 1 already added, phi3's Q, K and V as one `attn_qkv` and gate and up as one `ffn_up`.
The vocabulary is a small SentencePiece one (tokenizer.ggml.model "llama": byte pieces, scored words)
or a byte-level BPE one ("gpt2", with the pre-tokenizer named by the spec), so that llama.cpp loads
the file and tokenizes plain text as perfx does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perfx.engine.synthetic import add_block_params
from tests.conftest import add_random_tensor

WORDS = ("the", "capital", "of", "france", "is", "paris", "a", "and", "to", "in", "it", "that", "was", "he",
         "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or",
         "had", "by", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there")
NEOX_ARCHS = ("qwen2", "gemma3", "phi3")


@dataclass(frozen=True)
class GGUFSpec:
    arch: str = "llama"
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16            # gemma3 writes key_length; others have dim / n_heads
    ffn_dim: int = 96
    ctx_len: int = 256
    rope_base: float = 10000.0
    qtype: str = "F16"            # the matrices' type (norms are F32, as llama.cpp needs)
    tied: bool = False
    vocab: str = "spm"            # "spm" (tokenizer.ggml.model llama) or "bpe" (gpt2)
    pre: str = "default"          # tokenizer.ggml.pre for "bpe"
    sliding_window: int = 0
    rope_freqs: bool = False      # Llama 3: a rope_freqs tensor of per-pair frequency divisors
    seed: int = 0
    extra: dict = field(default_factory=dict)   # more metadata: key -> value (typed by GGUFWriter)
    skip: tuple = ()              # tensor names left out (a broken file)


def spm_vocab(gemma: bool) -> tuple[list[str], list[float], list[int], dict]:
    """A SentencePiece vocabulary (pieces, scores, types) and its special ids."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    tokens = list(specials)
    types = [3] * len(specials)
    types[tokens.index("<unk>")] = 2
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [c for c in ".,?!'"]
    pieces += ["\u2581" + w for w in WORDS] + ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += ["th", "he", "in", "er", "an", "re", "on", "at"]
    pieces = list(dict.fromkeys(pieces))
    tokens += pieces
    types += [1] * len(pieces)
    ctl = ["<start_of_turn>", "<end_of_turn>"] if gemma else ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tokens += ctl
    types += [3] * len(ctl)
    while len(tokens) % 32:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    scores = [0.0 if t != 1 else -float(i) for i, t in enumerate(types)]
    for i, tok in enumerate(tokens):          # longer pieces score higher, as a trained model's do
        if types[i] == 1:
            scores[i] = len(tok) * 10.0 - i * 0.01
    ids = {"bos": tokens.index("<bos>" if gemma else "<s>"), "eos": tokens.index("<eos>" if gemma else "</s>"),
           "unk": tokens.index("<unk>")}
    if gemma:
        ids["pad"] = tokens.index("<pad>")
    return tokens, scores, types, ids


def bpe_vocab(pre: str) -> tuple[list[str], list[str], list[int], dict]:
    """A byte-level BPE vocabulary (tokens, merges, types) and its special ids."""
    from tests.conftest import byte_to_char

    tokens = list(byte_to_char())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "e r", "Ġ c", "Ġ i", "Ġ o", "o f", "Ġo f", "i s",
              "Ġi s", "Ġ p", "a r", "Ġp ar", "Ġpar i", "Ġpari s"]
    tokens += [a + b for a, b in (m.split(" ") for m in merges)]
    if pre == "llama-bpe":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"]
        bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bos, eos = "<|endoftext|>", "<|im_end|>"
    types = [1] * len(tokens)
    tokens += specials
    types += [3] * len(specials)
    while len(tokens) % 32:
        tokens.append(f"<|reserved_{len(tokens)}|>")
        types.append(3)
    return tokens, merges, types, {"bos": tokens.index(bos), "eos": tokens.index(eos)}


def write_gguf(path: Path, spec: GGUFSpec) -> dict[str, np.ndarray]:
    """Writes the file; returns its tensors as float32 values, named as in the file."""
    import gguf
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    s, rng = spec, np.random.default_rng(spec.seed)
    arch_enum = next(a for a, n in MODEL_ARCH_NAMES.items() if n == s.arch)
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[arch_enum]}
    gemma = s.arch == "gemma3"
    head_dim = s.head_dim if gemma else s.dim // s.n_heads
    q_dim, kv_dim = s.n_heads * head_dim, s.n_kv_heads * head_dim

    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(f"random-{s.arch}")
    add_block_params(w, n_layers=s.n_layers, ctx_len=s.ctx_len, dim=s.dim, ffn_dim=s.ffn_dim, n_heads=s.n_heads,
                     n_kv_heads=s.n_kv_heads, norm_eps=1e-6 if gemma else 1e-5, rope_base=s.rope_base,
                     rope_dim=None if gemma else head_dim)
    if gemma:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    for key, value in s.extra.items():
        getattr(w, f"add_{key}")(value)

    if s.vocab == "spm":
        tokens, scores, types, ids = spm_vocab(gemma)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(ids["unk"])
        if "pad" in ids:
            w.add_pad_token_id(ids["pad"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        if gemma:
            w.add_add_space_prefix(False)
    else:
        tokens, merges, types, ids = bpe_vocab(s.pre)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(s.pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_bos_token(s.pre == "llama-bpe")
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    vocab = len(tokens)

    stored: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], scale: float, offset: float = 0.0, qtype: str | None = None):
        base = name.rsplit(".", 1)[0]
        generic = base if not base.startswith("blk.") else "blk.{bid}." + base.split(".", 2)[2]
        assert generic in known, f"{generic} is not a {s.arch} tensor in gguf-py"
        if name in s.skip:
            rng.standard_normal(shape)          # drawn all the same: the other tensors keep their values
            return
        stored[name] = add_random_tensor(w, name, shape, qtype or s.qtype, rng, scale, offset)

    def norm(name: str, n: int) -> None:
        add(name, (n,), 0.1, 1.0, "F32")

    add("token_embd.weight", (vocab, s.dim), 1.0)
    if s.rope_freqs:      # Llama 3's factors: 1 for high frequencies, up to 8 for the lowest
        factors = np.linspace(1.0, 8.0, head_dim // 2).astype(np.float32)
        w.add_tensor("rope_freqs.weight", factors)
        stored["rope_freqs.weight"] = factors
    for i in range(s.n_layers):
        b = f"blk.{i}"
        norm(f"{b}.attn_norm.weight", s.dim)
        if s.arch == "phi3":
            add(f"{b}.attn_qkv.weight", (q_dim + 2 * kv_dim, s.dim), s.dim ** -0.5)
        else:
            add(f"{b}.attn_q.weight", (q_dim, s.dim), s.dim ** -0.5)
            add(f"{b}.attn_k.weight", (kv_dim, s.dim), s.dim ** -0.5)
            add(f"{b}.attn_v.weight", (kv_dim, s.dim), s.dim ** -0.5)
        if s.arch == "qwen2":
            for n, width in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                add(f"{b}.attn_{n}.bias", (width,), 0.1, 0.0, "F32")
        if gemma:
            norm(f"{b}.attn_q_norm.weight", head_dim)
            norm(f"{b}.attn_k_norm.weight", head_dim)
            norm(f"{b}.post_attention_norm.weight", s.dim)
            norm(f"{b}.post_ffw_norm.weight", s.dim)
        add(f"{b}.attn_output.weight", (s.dim, q_dim), q_dim ** -0.5)
        norm(f"{b}.ffn_norm.weight", s.dim)
        if s.arch == "phi3":
            add(f"{b}.ffn_up.weight", (2 * s.ffn_dim, s.dim), s.dim ** -0.5)
        else:
            add(f"{b}.ffn_gate.weight", (s.ffn_dim, s.dim), s.dim ** -0.5)
            add(f"{b}.ffn_up.weight", (s.ffn_dim, s.dim), s.dim ** -0.5)
        add(f"{b}.ffn_down.weight", (s.dim, s.ffn_dim), s.ffn_dim ** -0.5)
    norm("output_norm.weight", s.dim)
    if not s.tied:
        add("output.weight", (vocab, s.dim), s.dim ** -0.5 * 4)

    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
