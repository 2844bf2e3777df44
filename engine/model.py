"""The transformer, written once against a backend's small set of fused operators.

Per layer (pre-norm LLaMA block; `h` is always the normalised residual stream):

    qkv  = linear(h, wqkv)                      Q, K and V as one matrix product (+ their biases, Qwen2)
    qkv  = qk_norm(qkv, q_norm, k_norm)         Gemma 3 only: each Q and K head RMS-normalised
    a    = attention(qkv, layer)                RoPE, KV-cache write, QK^T, softmax, .V (contiguous or paged cache)
    x, h = residual_rmsnorm(x, a, wo, ffn_norm)  x += linear(a, wo), h = rmsnorm(x): on a GPU or PoCL one launch
    f    = swiglu(h, w_gate_up)                 gate and up as one product, silu(gate) * up
    x, h = residual_rmsnorm(x, f, w_down, next norm)

The last layer's "next norm" is the output norm, so the logits are linear(h, output).

Gemma 3 varies the block through its config: the embedding scaled by sqrt(dim), Q and K heads
RMS-normalised before RoPE (q_norm, k_norm), sliding-window attention with its own RoPE base on the
local layers, the attention and FFN outputs RMS-normalised before each residual add (the `post` norm of
residual_rmsnorm) and GeGLU in place of SwiGLU. GGUF files store Gemma's (1 + w) norm weights with the
1 already added, so every norm is the plain rmsnorm(x) * w.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .backends import Backend
from .config import ModelConfig
from .errors import PerfxError, TokenIdError
from .formats.tensors import QTensor
from .paged import PagedBatch


@dataclass
class LayerWeights:
    attn_norm: QTensor             # [dim]
    wqkv: list[QTensor]            # [q_dim, dim], [kv_dim, dim], [kv_dim, dim]: stacked into one matrix
    wo: QTensor                    # [dim, q_dim]
    ffn_norm: QTensor              # [dim]
    w_gate_up: list[QTensor]       # [ffn, dim], [ffn, dim]: stacked into one matrix
    w_down: QTensor                # [dim, ffn]
    bqkv: list[QTensor] | None = None  # [q_dim], [kv_dim], [kv_dim]: biases of Q, K, V (Qwen2), or None
    q_norm: QTensor | None = None          # [head_dim]: RMSNorm of each Q head (Gemma 3)
    k_norm: QTensor | None = None          # [head_dim]: RMSNorm of each K head (Gemma 3)
    post_attn_norm: QTensor | None = None  # [dim]: RMSNorm of the attention output (Gemma)
    post_ffn_norm: QTensor | None = None   # [dim]: RMSNorm of the FFN output (Gemma)

    def norms(self) -> list[QTensor]:
        """The optional norms this layer has."""
        return [t for t in (self.q_norm, self.k_norm, self.post_attn_norm, self.post_ffn_norm) if t is not None]


@dataclass
class Weights:
    tok_embd: QTensor              # [vocab, dim]
    layers: list[LayerWeights]
    output_norm: QTensor           # [dim]
    output: QTensor                # [vocab, dim]; the embedding itself when tied

    def tensors(self) -> list[QTensor]:
        """Every tensor once (the tied embedding too), the small norms first."""
        tensors = {id(t): t for t in (self.output_norm, *(n for l in self.layers for n in (l.attn_norm, l.ffn_norm)))}
        tensors.update({id(t): t for l in self.layers for t in (*(l.bqkv or ()), *l.wqkv, l.wo, *l.w_gate_up,
                                                                 l.w_down, *l.norms())})
        tensors.update({id(t): t for t in (self.tok_embd, self.output)})
        return list(tensors.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the weights as stored (the tied embedding counted once)."""
        return sum(t.nbytes for t in self.tensors())


def weights_from_tensors(t: dict[str, QTensor], config: ModelConfig, path) -> Weights:
    """The model's weights from tensors named as in GGUF, each checked for its expected shape."""
    c = config
    expected = {
        "token_embd.weight": (c.vocab_size, c.dim), "output.weight": (c.vocab_size, c.dim),
        "output_norm.weight": (c.dim,), "attn_norm.weight": (c.dim,), "ffn_norm.weight": (c.dim,),
        "attn_q.weight": (c.q_dim, c.dim), "attn_k.weight": (c.kv_dim, c.dim), "attn_v.weight": (c.kv_dim, c.dim),
        "attn_output.weight": (c.dim, c.q_dim), "ffn_gate.weight": (c.ffn_dim, c.dim),
        "ffn_up.weight": (c.ffn_dim, c.dim), "ffn_down.weight": (c.dim, c.ffn_dim),
        "attn_q.bias": (c.q_dim,), "attn_k.bias": (c.kv_dim,), "attn_v.bias": (c.kv_dim,),
        "attn_q_norm.weight": (c.head_dim,), "attn_k_norm.weight": (c.head_dim,),
        "post_attention_norm.weight": (c.dim,), "post_ffw_norm.weight": (c.dim,),
    }

    def need(name: str) -> QTensor:
        if name not in t:
            raise PerfxError(f"{path}: tensor {name} is missing; the file is incomplete")
        shape = expected[name.split(".", 2)[-1] if name.startswith("blk.") else name]
        if tuple(t[name].shape) != shape:
            raise PerfxError(f"{path}: tensor {name} has shape {list(t[name].shape)}, expected {list(shape)}")
        return t[name]

    def biases(i: int) -> list[QTensor] | None:
        """Layer i's Q, K and V biases: all three or none."""
        names = [f"blk.{i}.attn_{n}.bias" for n in "qkv"]
        present = [n for n in names if n in t]
        if not present:
            return None
        if len(present) < 3:
            missing = next(n for n in names if n not in t)
            raise PerfxError(f"{path}: tensor {missing} is missing while {present[0]} is present; "
                             "Q, K and V biases come all three or none")
        return [need(n) for n in names]

    layers = [
        LayerWeights(
            attn_norm=need(f"blk.{i}.attn_norm.weight"),
            wqkv=[need(f"blk.{i}.attn_q.weight"), need(f"blk.{i}.attn_k.weight"), need(f"blk.{i}.attn_v.weight")],
            wo=need(f"blk.{i}.attn_output.weight"),
            ffn_norm=need(f"blk.{i}.ffn_norm.weight"),
            w_gate_up=[need(f"blk.{i}.ffn_gate.weight"), need(f"blk.{i}.ffn_up.weight")],
            w_down=need(f"blk.{i}.ffn_down.weight"),
            bqkv=biases(i),
            **({"q_norm": need(f"blk.{i}.attn_q_norm.weight"), "k_norm": need(f"blk.{i}.attn_k_norm.weight")}
               if c.qk_norm else {}),
            **({"post_attn_norm": need(f"blk.{i}.post_attention_norm.weight"),
                "post_ffn_norm": need(f"blk.{i}.post_ffw_norm.weight")} if c.post_norms else {}),
        )
        for i in range(c.n_layers)
    ]
    if len({l.bqkv is None for l in layers}) > 1:
        i = next(i for i, l in enumerate(layers) if l.bqkv is None)
        raise PerfxError(f"{path}: layer {i} has no Q, K and V biases while other layers have them")
    embd = need("token_embd.weight")
    output = need("output.weight") if "output.weight" in t else embd
    return Weights(embd, layers, need("output_norm.weight"), output)


def checked_ids(ids, vocab_size: int) -> np.ndarray:
    """ids as int64 [n], each checked to lie in 0..vocab_size-1: a TokenIdError (a ValueError) in one line
    otherwise, before any backend indexes its embedding with them."""
    try:
        a = np.asarray(ids)
    except (ValueError, TypeError, OverflowError):
        a = np.asarray(ids, dtype=object)
    whole = a.dtype.kind in "iu" or a.dtype == object and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in a.reshape(-1))
    if a.ndim != 1 or a.size and not whole:
        raise TokenIdError(f"token ids must be a flat sequence of integers (got {a.dtype} of shape {list(a.shape)})")
    bad = [int(v) for v in a[(a < 0) | (a >= vocab_size)][:1]] if a.size else []
    if bad:
        raise TokenIdError(f"token id {bad[0]} is outside the vocabulary of {vocab_size} tokens (0..{vocab_size - 1})")
    return a.astype(np.int64)


class Transformer:
    """Runs the forward pass on a backend, which owns the weights on its device and the KV cache."""

    def __init__(self, config: ModelConfig, weights: Weights, backend: Backend, ctx: int):
        self.config = config
        self.ctx = ctx
        self.backend = backend
        self.w = backend.load(config, weights, ctx)

    def passes(self, n: int) -> Iterator[tuple[int, int]]:
        """(offset, end) of each pass over n tokens: a backend takes a long prompt in passes of its
        longest pass (capabilities.max_tokens)."""
        step = self.backend.capabilities.max_tokens or max(n, 1)
        for i in range(0, n, step):
            yield i, min(i + step, n)

    def forward(self, ids: np.ndarray, start_pos: int, all_logits: bool = True) -> np.ndarray:
        """Logits [len(ids), vocab] (or [1, vocab] for the last token) continuing the cache at start_pos."""
        out = []
        for i, end in self.passes(len(ids)):
            h = self._layers(ids[i:end], self._contiguous(start_pos + i))
            if all_logits or end == len(ids):
                out.append(self.backend.logits(h, self.w.output, all_logits))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def next_token(self, ids: np.ndarray, start_pos: int) -> int:
        """The greedy next token after ids; a backend with a device argmax reads back one int."""
        return self.backend.argmax_last(self._prompt(ids, start_pos), self.w.output)

    def greedy(self, ids: np.ndarray, start_pos: int, limit: int) -> Iterator[int]:
        """Up to `limit` greedy tokens after ids (the cache continued at start_pos), each the argmax
        after the one before it, fed back as the next input; stops early at the end of the context.

        A backend that keeps the chosen token on the device (capabilities.device_argmax) runs
        one step ahead: the next step is enqueued before this token is read back, so the device never
        waits for the host. A step runs only where `limit` and the context allow one more token; if the
        caller stops early, the step ahead has only written the cache past the tokens kept, which the
        next call overwrites before reading."""
        end = min(start_pos + len(ids) + limit - 1, self.ctx)     # positions of the fed-back tokens: < end
        if limit < 1:
            return
        if not self.backend.capabilities.device_argmax:
            token = self.next_token(ids, start_pos)
            for pos in range(start_pos + len(ids), end):
                yield token
                token = self.next_token(np.array([token]), pos)
            yield token
            return
        chosen = self.backend.argmax_async(self._prompt(ids, start_pos), self.w.output)
        for pos in range(start_pos + len(ids), end):
            h = self._layers(None, self._contiguous(pos))        # input: the token just chosen, on the device
            ahead = self.backend.argmax_async(h, self.w.output)
            yield chosen.result()
            chosen = ahead
        yield chosen.result()

    def _prompt(self, ids: np.ndarray, start_pos: int):
        """Runs ids through every layer, in passes; the last pass's final normalised hidden states
        (a backend handle)."""
        for i, end in self.passes(len(ids)):
            h = self._layers(ids[i:end], self._contiguous(start_pos + i))
        return h

    def forward_paged(self, ids: np.ndarray, batch: PagedBatch):
        """Final normalised hidden states [T, dim] (a backend handle) of one step of a batch of sequences
        over the backend's paged KV pool (engine.paged); read logits with backend.logits_rows."""
        self.backend.begin_paged(batch)
        return self._layers(ids, self.backend.paged_attention)

    def _contiguous(self, start_pos: int) -> Callable:
        """Attention over the backend's one contiguous KV cache, new tokens from start_pos."""
        return lambda qkv, layer: self.backend.attention(qkv, layer, start_pos)

    def _layers(self, ids: np.ndarray, attend: Callable):
        """Runs every layer; returns the normalised final hidden states (a backend handle).
        attend(qkv, layer) is the attention operator: over a contiguous cache or a paged one."""
        ops, w = self.backend, self.w
        n = len(w.layers)
        if ids is not None:
            ids = checked_ids(ids, self.config.vocab_size)

        def post(norm) -> tuple:          # the post-norm argument, passed only where the model has one
            return () if norm is None else (norm,)

        x = ops.embed(w.tok_embd, ids, self.config.embed_scale)
        h = ops.rmsnorm(x, w.layers[0].attn_norm)
        for i, layer in enumerate(w.layers):
            qkv = ops.linear(h, layer.wqkv)
            if layer.q_norm is not None:
                qkv = ops.qk_norm(qkv, layer.q_norm, layer.k_norm)
            a = attend(qkv, i)
            x, h = ops.residual_rmsnorm(x, a, layer.wo, layer.ffn_norm, *post(layer.post_attn_norm))
            f = ops.swiglu(h, layer.w_gate_up)
            next_norm = w.layers[i + 1].attn_norm if i + 1 < n else w.output_norm
            x, h = ops.residual_rmsnorm(x, f, layer.w_down, next_norm, *post(layer.post_ffn_norm))
        return h
