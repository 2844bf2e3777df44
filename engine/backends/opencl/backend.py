"""The OpenCL backend: the operators of `engine.model` as kernel launches on one device.

Weights are repacked once at load (`DeviceMatrix`, see matmul.py); every activation buffer is
allocated once for up to `max_tokens` tokens, so a decode step only enqueues kernels. Operators take
and return `Act` handles: a buffer, its row width and the number of tokens it holds now. Each
product's output buffer is named with its matrix at load (`Proj`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pyopencl as cl

from ...config import ModelConfig
from ...model import Weights
from .. import Backend, Capabilities, DeviceReport, Launch
from ..numpy_backend import OPTIONAL_NORMS, check_pageable
from .bandwidth import bandwidth
from .devices import Selection, check_memory, describe
from .fused import DEFAULT_PARAMS as FUSED_DEFAULTS
from .fused import EmbeddingTable, FusedOps
from .matmul import DeviceMatrix, Matmul, Norm, NormIn, XPrep
from .paged import PagedAttention, PagedBatch, check_batch, check_rows
from .runtime import Runtime
from .weights import device_bytes

MAX_TOKENS = 512      # tokens per pass; longer prompts run in passes of this size
LOGIT_ROWS = 16       # logits computed and read back this many rows at a time


@dataclass(frozen=True)
class Act:
    buf: cl.Buffer    # f32 [max_tokens, width], of which the first T rows hold this pass's tokens
    width: int
    T: int
    norm: cl.Buffer | None = None   # f32 [width]: the rows stand for rmsnorm(row) * norm, which the
                                    # GEMV reading them computes in its prologue (gemv_norm_in)

    def rows(self, T: int) -> Act:
        """The same buffer holding T tokens (built directly: dataclasses.replace, 14 times a layer, cost a
        decode step hundreds of µs)."""
        return self if T == self.T else Act(self.buf, self.width, T, self.norm)


@dataclass(frozen=True)
class Proj:
    """A weight matrix and the activation buffer its product writes."""

    m: DeviceMatrix
    out: Act          # [max_tokens, rows of m]

    @property
    def nbytes(self) -> int:
        return self.m.nbytes


@dataclass(frozen=True)
class Chosen:
    """A greedy token being computed: the read of the device's argmax, enqueued."""
    done: cl.Event
    slot: np.ndarray  # int32 [1], filled when `done` completes

    def result(self) -> int:
        self.done.wait()
        return int(self.slot[0])


@dataclass
class Layer:
    attn_norm: cl.Buffer     # f32 [dim]
    wqkv: Proj               # [q_dim + 2 kv_dim, dim] (+ bias f32 [q_dim + 2 kv_dim], Qwen2) -> qkv
    wo: Proj                 # [dim, q_dim] -> delta
    ffn_norm: cl.Buffer      # f32 [dim]
    w_gate_up: DeviceMatrix  # [2 ffn, dim] -> ffn (act(gate) * up)
    w_down: Proj             # [dim, ffn] -> delta
    q_norm: cl.Buffer | None = None          # f32 [head_dim] (Gemma 3)
    k_norm: cl.Buffer | None = None          # f32 [head_dim] (Gemma 3)
    post_attn_norm: cl.Buffer | None = None  # f32 [dim] (Gemma)
    post_ffn_norm: cl.Buffer | None = None   # f32 [dim] (Gemma)


@dataclass
class DeviceWeights:
    tok_embd: EmbeddingTable
    layers: list[Layer]
    output_norm: cl.Buffer   # f32 [dim]
    output: DeviceMatrix     # [vocab, dim]

    @property
    def nbytes(self) -> int:
        mats = [m for l in self.layers for m in (l.wqkv, l.wo, l.w_gate_up, l.w_down)] + [self.output]
        return sum(m.nbytes for m in mats)


def buffer_bytes(root: object) -> int:
    """Total size of the distinct cl.Buffers reachable from `root` through containers and perfx objects."""
    seen: set[int] = set()
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, cl.Buffer):
            total += obj.size
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("perfx.engine.") and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


class OpenCLBackend(Backend):
    name = "opencl"

    def __init__(self, rt: Runtime, label: str, params: dict | None = None):
        """params: {"matmul": {...}, "fused": {...}}, the device's tuned -D values (tuning.py)."""
        self.rt = rt
        self.params = params or {}
        self.description = label
        kv_half = {**FUSED_DEFAULTS, **self.params.get("fused", {})}["kv_half"]
        self.capabilities = Capabilities(max_tokens=MAX_TOKENS, device_argmax=True, paged_kv=True,
                                         kv_bytes=2 if kv_half else 4, profiling=True)

    @classmethod
    def from_selection(cls, selection: Selection) -> OpenCLBackend:
        """The backend on a selected device, with the device's tuned parameters (tuning.py)."""
        from . import fused, matmul
        from .tuning import override_notice, params_for

        info = selection.info
        params = {"matmul": params_for(info, "matmul", matmul.DEFAULT_PARAMS),
                  "fused": params_for(info, "fused", fused.DEFAULT_PARAMS)}
        notice = override_notice(info, params)         # the device's perfx tune file: said, not silent
        if notice:
            selection.notices.append(notice)
        return cls(selection.runtime(), f"OpenCL {info.id} {info.name}", params)

    def report(self) -> DeviceReport:
        d = describe(self.rt.device)
        return DeviceReport(backend="OpenCL", device=d.id, name=d.name, kind=d.type)

    def prepare(self, transformer, progress) -> None:
        """Builds every program the model runs, from the manifest of an earlier load (builds.py)."""
        from .builds import build_kernels

        build_kernels(transformer, progress)

    def copy_bandwidth(self) -> float:
        return bandwidth(self.rt.device, fresh=True)

    @contextmanager
    def profile(self) -> Iterator[list[Launch]]:
        """Each launch inside the block, timed by OpenCL profiling events (Runtime.recording)."""
        launches: list[Launch] = []
        with self.rt.recording() as recorded:
            yield launches
        launches += [Launch(name, event.profile.start, event.profile.end, *(cost or (None, None)), host)
                     for name, event, cost, host in recorded]

    # --- loading --------------------------------------------------------------------------

    def load(self, config: ModelConfig, weights: Weights, ctx: int) -> DeviceWeights:
        rt, c = self.rt, config
        self.config, self.ctx = c, ctx
        stacks = [s for l in weights.layers for s in (l.wqkv, [l.wo], l.w_gate_up, [l.w_down])]
        held = sum(device_bytes(s) for s in stacks) + device_bytes([weights.output]) + 4 * weights.tok_embd.shape[1] * (
            2 * c.n_layers + 1)                            # the weight stacks in their device forms, the norms
        check_memory(rt.device, held + 2 * c.n_layers * c.kv_dim * ctx * 4,
                     f"{c.name or 'the model'} at context {ctx}")
        self.max_tokens = min(MAX_TOKENS, ctx)
        self.capabilities = replace(self.capabilities, max_tokens=self.max_tokens)
        self.matmul = Matmul(rt, self.params.get("matmul"))
        self.fused = FusedOps(rt, c, ctx, c.n_layers, self.params.get("fused"))
        self._allocate(c)
        self.weights = self._upload(weights)
        self._plan_group_sums(self.weights.layers)
        rt.queue.finish()
        return self.weights

    def _allocate(self, c: ModelConfig) -> None:
        """Activations [max_tokens, width], f32, and the host staging arrays, allocated once."""
        rt, T, f32 = self.rt, self.max_tokens, 4

        def act(width: int) -> Act:
            return Act(rt.empty(T * width * f32), width, T)

        self.x, self.h, self.delta = act(c.dim), act(c.dim), act(c.dim)
        self.qkv, self.attn, self.ffn = act(c.q_dim + 2 * c.kv_dim), act(c.q_dim), act(c.ffn_dim)
        self.h_rows = rt.empty(LOGIT_ROWS * c.dim * f32)              # f32 [LOGIT_ROWS, dim]
        self.logits_buf = rt.empty(LOGIT_ROWS * c.vocab_size * f32)   # f32 [LOGIT_ROWS, vocab]
        self.logits_host = np.empty((LOGIT_ROWS, c.vocab_size), np.float32)
        self.ids = rt.empty(T * 4)                                    # int32 [max_tokens]
        self.ids_host = np.empty(T, np.int32)
        self.token = rt.empty(4)                                      # int32 [1]: argmax result
        self.token_host = np.empty(2, np.int32)      # two slots: a step ahead may be read while one waits
        self.next_slot = 0
        self.rows_buf = rt.empty(LOGIT_ROWS * 4)                      # int32 [LOGIT_ROWS]: rows to gather
        self.rows_host = np.empty(LOGIT_ROWS, np.int32)
        self.paged: PagedAttention | None = None                      # the serving pool (kv_pool)
        self.n_blocks = self.block_size = 0
        self.scheme: str | None = None     # matmul scheme forced for every product ("gemv" once serving)

    def _upload(self, weights: Weights) -> DeviceWeights:
        """The weights repacked on the device; QKV writes qkv, the o and down projections delta."""
        rt = self.rt

        def vec(t) -> cl.Buffer:
            return rt.to_device(t.dequantize().astype(np.float32))

        def mat(tensors, out: Act) -> Proj:
            return Proj(DeviceMatrix.from_qtensors(rt, tensors), out)

        layers = [
            Layer(vec(l.attn_norm),
                  Proj(DeviceMatrix.from_qtensors(rt, l.wqkv).with_bias(rt, l.bqkv), self.qkv),
                  mat([l.wo], self.delta), vec(l.ffn_norm), DeviceMatrix.from_qtensors(rt, l.w_gate_up),
                  mat([l.w_down], self.delta),
                  **{k: vec(getattr(l, k)) for k in OPTIONAL_NORMS if getattr(l, k) is not None})
            for l in weights.layers
        ]
        e = weights.tok_embd
        output = DeviceMatrix.from_qtensors(rt, [weights.output])
        if weights.output is e and output.fmt == "int8":
            table = EmbeddingTable.from_tiles(output)      # tied: the output matrix's rows, held once
        elif e.qtype in ("Q8_0", "INT8"):
            table = EmbeddingTable.from_q8(rt, *e.int8()[:2])
        else:
            table = EmbeddingTable.from_f32(rt, e.dequantize())
        return DeviceWeights(table, layers, vec(weights.output_norm), output)

    def _plan_group_sums(self, layers: list[Layer]) -> None:
        """The norms write the group sums of h (and h in int16 for the int-dot GEMV) for the int4 GEMVs
        that read it (QKV, gate+up), which then skip their own xsum or quantize launch: one launch
        fewer per product in decode."""
        rt, T, dim, f32 = self.rt, self.max_tokens, self.config.dim, 4
        (fmt, group), *others = {(m.fmt, m.group) for l in layers for m in (l.wqkv.m, l.w_gate_up)}
        self.h_xs, self.xs_group = None, 0
        self.epilogues: dict[int, Norm] = {}     # norm weight's int_ptr -> the epilogue (_epilogue)
        if not others and fmt == "int4" and (self.matmul.int_dot or not self.matmul.params["gemv_zero_inline"]):
            self.xs_group = group
            int16 = self.matmul.int_dot
            self.fused.group_sums(group, int16=int16)
            self.h_xs = XPrep(rt.empty(T * dim // group * f32),             # f32 [max_tokens, dim / group]
                              *((rt.empty(T * dim * 2), rt.empty(T * dim // 32 * f32))  # int16 [max_tokens, dim],
                                if int16 else ()))                                      # f32 [max_tokens, dim / 32]

    @property
    def device_bytes(self) -> int:
        """Bytes of the device buffers allocated so far: weights, KV cache, activations, scratch."""
        return buffer_bytes(vars(self))

    # --- operators --------------------------------------------------------------------------

    def embed(self, table: EmbeddingTable, ids: np.ndarray | None, scale: float = 1.0) -> Act:
        """x [T, dim] = the embeddings of ids (times scale); ids None: of the token the last argmax
        chose (T = 1), read where it is, on the device."""
        if ids is None:
            self.fused.embed(table, self.token, 1, self.x.buf)
            T = 1
        else:
            T = len(ids)
            self.ids_host[:T] = ids
            cl.enqueue_copy(self.rt.queue, self.ids, self.ids_host[:T], is_blocking=False)
            self.fused.embed(table, self.ids, T, self.x.buf)
        if scale != 1.0:
            self.fused.scale(self.x.buf, T * self.config.dim, scale)
        return self.x.rows(T)

    def rmsnorm(self, x: Act, w: cl.Buffer) -> Act:
        if self._norm_in(x.T):
            return replace(x, norm=w)
        self.fused.rmsnorm(x.buf, w, x.T, self.h.buf, self.h_xs)
        return self.h.rows(x.T)

    def _norm_in(self, T: int) -> bool:
        """Whether the norms of T tokens are left to the GEMVs that read them (gemv_norm_in: GPUs)."""
        return bool(self.matmul.params["gemv_norm_in"]) and (self.scheme or self.matmul.scheme(T)) == "gemv"

    def _normalised(self, h: Act) -> Act:
        """h with its rows normalised in a buffer, for a reader that cannot normalise them itself."""
        if h.norm is None:
            return h
        self.fused.rmsnorm(h.buf, h.norm, h.T, self.h.buf, self.h_xs)
        return self.h.rows(h.T)

    def _prologue(self, x: Act) -> NormIn | None:
        return None if x.norm is None else NormIn(x.norm, self.config.norm_eps)

    def add_rmsnorm(self, x: Act, delta: Act, w: cl.Buffer) -> tuple[Act, Act]:
        self.fused.add_rmsnorm(x.buf, delta.buf, w, x.T, self.h.buf, self.h_xs)
        return x, self.h.rows(x.T)

    def residual_rmsnorm(self, x: Act, a: Act, w: Proj, norm: cl.Buffer,
                         post: cl.Buffer | None = None) -> tuple[Act, Act]:
        """x += a @ W^T, h = rmsnorm(x) * norm (and h's group sums). In a decode step (the GEMV scheme)
        one launch: the GEMV adds into x in place and its last work-group normalises; otherwise the
        product, then add_rmsnorm. With gemv_norm_in (GPUs) the GEMV adds into x and h is x itself,
        marked with its norm, which the GEMVs reading it apply in their prologue. With a post-norm
        (Gemma): the product, then one launch that adds its rmsnorm * post to x and normalises the sum."""
        if post is not None:
            delta = self.linear(a, w)
            self.fused.post_add_rmsnorm(x.buf, delta.buf, post, norm, x.T, self.h.buf, self.h_xs)
            return x, self.h.rows(x.T)
        if self._norm_in(x.T):       # x += a @ W^T in the GEMV's epilogue; the next GEMV normalises
            self.matmul.linear(a.buf, w.m, x.T, x.buf, accumulate=True, scheme="gemv")
            return x, replace(x, norm=norm)
        if (self.scheme or self.matmul.scheme(x.T)) == "gemv" and self.matmul.params["gemv_norm"] \
                and w.m.bias is None:
            self.matmul.residual_norm(a.buf, w.m, x.T, x.buf, self._epilogue(norm), xs=self._sums_of(a, w.m))
            return x, self.h.rows(x.T)
        return self.add_rmsnorm(x, self.linear(a, w), norm)

    def _epilogue(self, norm: cl.Buffer) -> Norm:
        """The GEMV's norm epilogue writing h (and its group sums) with the weight `norm`, made once."""
        epilogue = self.epilogues.get(norm.int_ptr)
        if epilogue is None:
            epilogue = self.epilogues[norm.int_ptr] = Norm(norm, self.h.buf, self.h_xs, self.xs_group,
                                                           self.config.norm_eps)
        return epilogue

    def _sums_of(self, x: Act, w: DeviceMatrix) -> XPrep | None:
        """The group sums (and int16 blocks) of x the norm wrote, when x is h and w an int4 matrix of
        their group."""
        if self.h_xs is not None and x.buf is self.h.buf and w.fmt == "int4" and w.group == self.xs_group:
            return self.h_xs
        return None

    def linear(self, x: Act, w: Proj) -> Act:
        self.matmul.linear(x.buf, w.m, x.T, w.out.buf, scheme=self.scheme, xs=self._sums_of(x, w.m),
                           norm_in=self._prologue(x))
        return w.out.rows(x.T)

    def qk_norm(self, qkv: Act, q_norm: cl.Buffer, k_norm: cl.Buffer) -> Act:
        """Each Q head of qkv = rmsnorm(head) * q_norm, each K head by k_norm, in place (Gemma 3)."""
        self.fused.head_rmsnorm(qkv.buf, q_norm, k_norm, qkv.T)
        return qkv

    def attention(self, qkv: Act, layer: int, start_pos: int) -> Act:
        self.fused.attention(qkv.buf, qkv.T, layer, start_pos, self.attn.buf)
        return self.attn.rows(qkv.T)

    def swiglu(self, h: Act, w_gate_up: DeviceMatrix) -> Act:
        self.matmul.swiglu(h.buf, w_gate_up, h.T, self.ffn.buf, scheme=self.scheme,
                           xs=self._sums_of(h, w_gate_up), act=self.config.act, norm_in=self._prologue(h))
        return self.ffn.rows(h.T)

    def logits(self, h: Act, output: DeviceMatrix, all_logits: bool) -> np.ndarray:
        """Logits of every token [T, vocab], or of the last one [1, vocab], read back to the host."""
        return self.logits_rows(h, output, np.arange(0 if all_logits else h.T - 1, h.T))

    def argmax_async(self, h: Act, output: DeviceMatrix) -> Chosen:
        """Enqueues argmax_last: the token stays on the device (the next embed(ids=None) reads it) and
        its read into one of two host slots is enqueued without waiting."""
        dim, q = self.config.dim, self.rt.queue
        last = h.buf
        if h.T > 1:
            cl.enqueue_copy(q, self.h_rows, h.buf, byte_count=dim * 4, src_offset=(h.T - 1) * dim * 4,
                            dst_offset=0)
            last = self.h_rows
        self.matmul.linear(last, output, 1, self.logits_buf, norm_in=self._prologue(h))
        self.fused.argmax(self.logits_buf, self.config.vocab_size, self.token)
        slot = self.token_host[self.next_slot:self.next_slot + 1]
        self.next_slot ^= 1
        return Chosen(cl.enqueue_copy(q, slot, self.token, is_blocking=False), slot)

    # --- paged KV cache (engine.paged) -----------------------------------------------------

    def kv_pool(self, n_blocks: int, block_size: int) -> None:
        """Allocates the block pool [n_layers, n_blocks, n_kv_heads, block_size, head_dim] (fp16 with
        kv_half) and its step metadata (paged.py), replacing an earlier pool; the contiguous cache stays.

        From then on the backend is batch-invariant: every matrix product runs token by token through
        the GEMV and attention one token per work-group, so a token's logits are bit for bit the same
        whichever sequences share its step (serving's replies do not depend on the load)."""
        c = self.config
        check_pageable(c)
        self.paged = None
        kv_bytes = 2 if self.fused.params["kv_half"] else 4
        one = c.n_layers * n_blocks * c.n_kv_heads * block_size * c.head_dim * kv_bytes   # K or V
        check_memory(self.rt.device, self.device_bytes + 2 * one,
                     f"a KV pool of {n_blocks} blocks of {block_size} positions", one)
        self.paged = PagedAttention(self.rt, c, self.fused, self.max_tokens, n_blocks, block_size, qt_max=1)
        self.n_blocks, self.block_size = n_blocks, block_size
        self.scheme = "gemv"

    @property
    def kv_pool_bytes(self) -> int:
        return self.paged.nbytes if self.paged is not None else 0

    def begin_paged(self, batch: PagedBatch) -> None:
        """Checks one step of a batch over the pool and uploads its positions and block table."""
        if self.paged is None:
            check_batch(batch, 0, 0, self.ctx)      # raises: no pool
        self.paged.begin(batch)

    def paged_attention(self, qkv: Act, layer: int) -> Act:
        self.paged.attention(qkv.buf, qkv.T, layer, self.attn.buf)
        return self.attn.rows(qkv.T)

    def logits_rows(self, h: Act, output: DeviceMatrix, rows: np.ndarray) -> np.ndarray:
        """Logits [len(rows), vocab] of the given rows of h: gathered into h_rows LOGIT_ROWS at a
        time (the embedding gather, h as the table), one product each, read back."""
        rows = check_rows(rows, h.T)
        h = self._normalised(h)
        dim, q = self.config.dim, self.rt.queue
        table = EmbeddingTable(vocab=h.T, dim=dim, w=h.buf)
        out = np.empty((len(rows), self.config.vocab_size), np.float32)
        for start in range(0, len(rows), LOGIT_ROWS):
            n = min(LOGIT_ROWS, len(rows) - start)
            self.rows_host[:n] = rows[start:start + n]   # rewritten only after the blocking read below
            cl.enqueue_copy(q, self.rows_buf, self.rows_host[:n], is_blocking=False)
            self.fused.embed(table, self.rows_buf, n, self.h_rows)
            self.matmul.linear(self.h_rows, output, n, self.logits_buf, scheme=self.scheme)
            cl.enqueue_copy(q, self.logits_host[:n], self.logits_buf)
            out[start:start + n] = self.logits_host[:n]
        return out
