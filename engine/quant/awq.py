"""AWQ (activation-aware weight quantization, Lin et al. 2023) to int4, on the NumPy reference model.

Calibration text runs through the float model one layer at a time (the inputs of layer i+1 are the
outputs of the unquantized layer i). For each layer, the inputs of its four groups of linears that
share an input are summarised over all calibration tokens:

    qkv      input rmsnorm(x) * attn_norm     scale folded into attn_norm
    o        input attention output           scale folded into the rows of v (and v's bias, Qwen2)
    gate+up  input rmsnorm(x) * ffn_norm      scale folded into ffn_norm
    down     input silu(gate) * up            scale folded into the rows of up

by x_mean (mean |x| per input channel) and the Gram matrix H = X^T X. For alpha in 0, 0.05, ... 0.95
the candidate s = x_mean^alpha / w_mean^(1 - alpha) (w_mean: mean of |w| / max |w| of its quantization
group, per input channel), normalised so that max(s) * min(s) = 1; W * s is quantized and the output
error of the group, sum over its linears of tr(E H E^T) with E = Q(W * s) / s - W, is exactly the
squared error of its outputs over every calibration token. The s with the smallest error is kept (no
scaling competes too, so the search never does worse than rounding on its own objective). With
grouped-query attention, s for o is shared by the heads that read one v head (geometric mean), so that
it folds into v exactly. Then the range of each quantization group of v, o, gate, up and down (not q, k)
is clipped by the shrink of its max |w| in 0, 5, ... 45% with the smallest error on the calibration
inputs, and every weight is rounded to nearest. Nothing is random: the same inputs give the same file.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends.numpy_backend import apply_rope, rope_tables
from ..config import ModelConfig
from ..errors import PerfxError
from ..formats.tensors import QTensor
from ..text.tokenizer import Tokenizer
from .quantize import fake_int4, int4, int4_group, relative_error

DEFAULT_CALIBRATION = Path(__file__).parents[1] / "data" / "calibration.txt"
CALIB_SAMPLES = 64
CALIB_SEQ_LEN = 512
ALPHAS = tuple(i / 20 for i in range(20))
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5
MIN_CALIB_TOKENS = 64
CHUNK_TOKENS = 4096

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NOT_CLIPPED = ("attn_q", "attn_k")


@dataclass
class Calibration:
    windows: np.ndarray           # int64 [samples, seq_len], BOS first where the vocabulary has one
    source: str                   # file name
    sha256: str

    def describe(self) -> dict:
        n, t = self.windows.shape
        return {"file": self.source, "sha256": self.sha256, "samples": int(n), "seq_len": int(t),
                "tokens": int(n * t)}


def calibration(tokenizer: Tokenizer, config: ModelConfig, path: Path | None = None,
                samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN) -> Calibration:
    """Windows of `seq_len` consecutive tokens of the calibration text (perfx's own by default)."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise PerfxError(f"cannot read the calibration file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PerfxError(f"the calibration file {path} is not UTF-8 text") from None
    ids = tokenizer.encode(text, special=False, add_bos=False)
    if len(ids) < MIN_CALIB_TOKENS:
        raise PerfxError(f"the calibration file {path} has {len(ids)} tokens; give at least {MIN_CALIB_TOKENS} "
                         f"(ideally {CALIB_SAMPLES} x {CALIB_SEQ_LEN})")
    seq_len = min(seq_len, config.ctx_len, len(ids))
    n = min(samples, len(ids) // seq_len)
    windows = np.array(ids[:n * seq_len], dtype=np.int64).reshape(n, seq_len)
    if tokenizer.bos_id is not None:
        windows[:, 0] = tokenizer.bos_id
    return Calibration(windows, path.name, hashlib.sha256(data).hexdigest())


# ---- statistics of one layer's inputs --------------------------------------------------------------


@dataclass
class InputStats:
    """Sum of |x| per channel and X^T X over the calibration tokens seen so far."""

    dim: int
    abs_sum: np.ndarray = field(init=False)
    gram: np.ndarray = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.abs_sum = np.zeros(self.dim, np.float64)
        self.gram = np.zeros((self.dim, self.dim), np.float64)

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x.reshape(-1, self.dim))
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        self.gram += np.dot(x.T, x)
        self.tokens += x.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_forward(x: np.ndarray, w: dict[str, np.ndarray], c: ModelConfig, cos: np.ndarray, sin: np.ndarray,
                  stats: dict[str, InputStats] | None = None) -> np.ndarray:
    """One LLaMA block on x [batch, T, dim] from position 0, as the NumPy backend computes it (Q, K and V
    biases added when `w` has "attn_q.bias", ...); records the inputs of the four groups of linears in `stats`."""
    B, T, _ = x.shape
    D, group = c.head_dim, c.n_heads // c.n_kv_heads
    h = rmsnorm(x, w["attn_norm"], c.norm_eps)

    def qkv(n: str) -> np.ndarray:
        y = h @ w[n].T
        return y + w[n + ".bias"] if n + ".bias" in w else y

    q = qkv("attn_q").reshape(B * T, c.n_heads, D)
    k = qkv("attn_k").reshape(B * T, c.n_kv_heads, D)
    v = qkv("attn_v").reshape(B, T, c.n_kv_heads, D)
    cos_t, sin_t = np.tile(cos[:T], (B, 1)), np.tile(sin[:T], (B, 1))
    q = apply_rope(q, cos_t, sin_t, c.rope_dim).reshape(B, T, c.n_kv_heads, group, D)
    k = apply_rope(k, cos_t, sin_t, c.rope_dim).reshape(B, T, c.n_kv_heads, D)
    q = np.ascontiguousarray(q.transpose(0, 2, 3, 1, 4)).reshape(B, c.n_kv_heads, group * T, D)
    kt = np.ascontiguousarray(k.transpose(0, 2, 3, 1))                 # [B, kv, D, T]
    scores = (q @ kt).reshape(B, c.n_kv_heads, group, T, T) * np.float32(1.0 / np.sqrt(D))
    scores[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    vt = np.ascontiguousarray(v.transpose(0, 2, 1, 3))                 # [B, kv, T, D]
    a = (p.reshape(B, c.n_kv_heads, group * T, T) @ vt).reshape(B, c.n_kv_heads, group, T, D)
    a = a.transpose(0, 3, 1, 2, 4).reshape(B, T, c.q_dim)
    x = x + a @ w["attn_output"].T
    h2 = rmsnorm(x, w["ffn_norm"], c.norm_eps)
    gate, up = h2 @ w["ffn_gate"].T, h2 @ w["ffn_up"].T
    f = gate / (1.0 + np.exp(-gate)) * up
    if stats is not None:
        for key, value in (("qkv", h), ("o", a), ("gate_up", h2), ("down", f)):
            stats[key].add(value)
    return x + f @ w["ffn_down"].T


# ---- the search -------------------------------------------------------------------------------------


def output_error(weights: list[np.ndarray], quantized: list[np.ndarray], gram: np.ndarray) -> float:
    """sum over linears of tr(E H E^T), E = quantized - weights: the squared output error over the tokens of H."""
    total = 0.0
    for w, wq in zip(weights, quantized):
        e = (wq - w).astype(gram.dtype)
        total += float(np.multiply(e @ gram, e).sum(dtype=np.float64))
    return total


@dataclass
class ScaleChoice:
    scale: np.ndarray        # per input channel; ones when no scaling won
    alpha: float | None      # None: no scaling
    error: float             # the group's output error with it
    plain_error: float       # the same without scaling (round to nearest alone)


def search_scale(weights: list[np.ndarray], stats: InputStats, group: int,
                 tie: Callable[[np.ndarray], np.ndarray] | None = None) -> ScaleChoice:
    """The per-input-channel scale of a group of linears sharing one input, by AWQ's grid search."""
    gram = stats.gram.astype(np.float32)
    stacked = np.concatenate(weights)
    rows, cols = stacked.shape
    g = np.abs(stacked).reshape(rows, cols // group, group)
    w_mean = (g / (g.max(axis=2, keepdims=True) + 1e-6)).reshape(rows, cols).mean(axis=0)
    x_mean = stats.mean.astype(np.float32)

    def error(s: np.ndarray) -> float:
        return output_error(weights, [fake_int4(w * s, group) / s for w in weights], gram)

    ones = np.ones(cols, np.float32)
    plain = error(ones)
    best = ScaleChoice(ones, None, plain, plain)
    for alpha in ALPHAS:
        s = np.maximum(x_mean ** alpha / (w_mean ** (1 - alpha) + 1e-4), 1e-4)
        if tie is not None:
            s = tie(s)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        if not np.all(np.isfinite(s)):
            continue
        err = error(s)
        if err < best.error:
            best = ScaleChoice(s, alpha, err, plain)
    return best


def search_clip(w: np.ndarray, gram: np.ndarray, group: int, grid: int = 20, max_shrink: float = 0.5) -> np.ndarray:
    """AWQ's clipping search: for each (row, group), the max |w| among absmax * (1 - i/grid),
    i < max_shrink * grid, whose quantized group gives the smallest error on the calibration inputs.

    gram is the inputs' X^T X [cols, cols]; the error of a group's partial products over all
    calibration tokens is e G e^T with e the group's weight error and G its diagonal block.
    """
    rows, cols = w.shape
    n = cols // group
    blocks = np.stack([gram[j * group:(j + 1) * group, j * group:(j + 1) * group] for j in range(n)])
    blocks = blocks.astype(np.float32)
    absmax = np.abs(w.reshape(rows, n, group)).max(axis=2)
    best, best_err = absmax.copy(), np.full((rows, n), np.inf)
    for i in range(int(max_shrink * grid)):
        clip = absmax * (1 - i / grid)
        e = np.ascontiguousarray((fake_int4(w, group, clip) - w).reshape(rows, n, group).transpose(1, 0, 2))
        err = np.multiply(np.matmul(e, blocks), e).sum(axis=2).T                 # [rows, n]
        better = err < best_err
        best[better], best_err[better] = clip[better], err[better]
    return best


def tie_heads(c: ModelConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    """For grouped-query attention: one scale per v channel, shared by the heads that read it."""
    group = c.n_heads // c.n_kv_heads
    if group == 1:
        return None

    def tie(s: np.ndarray) -> np.ndarray:
        per_kv = np.exp(np.log(s.reshape(c.n_kv_heads, group, c.head_dim)).mean(axis=1, keepdims=True))
        return np.broadcast_to(per_kv, (c.n_kv_heads, group, c.head_dim)).reshape(-1)

    return tie


GROUPS = (("qkv", ("attn_q", "attn_k", "attn_v"), "attn_norm"),
          ("o", ("attn_output",), "attn_v"),
          ("gate_up", ("ffn_gate", "ffn_up"), "ffn_norm"),
          ("down", ("ffn_down",), "ffn_up"))
INPUT_OF = {n: key for key, linears, _ in GROUPS for n in linears}


@dataclass
class Folded:
    weights: dict[str, np.ndarray]     # the layer's weights with the scales folded in
    col_scale: dict[str, np.ndarray]   # per linear: its columns were multiplied by this
    row_scale: dict[str, np.ndarray]   # per linear: its rows were multiplied by this


def fold_scales(w: dict[str, np.ndarray], scales: dict[str, np.ndarray], c: ModelConfig) -> Folded:
    """Multiply the columns of each group's linears by its s and fold 1/s into what produces their
    input (a norm weight, the rows of v or of up): the layer computes the same function."""
    w = {k: np.array(v, np.float32) for k, v in w.items()}
    col = {n: np.ones(w[n].shape[1], np.float32) for n in LINEARS}
    row = {n: np.ones(w[n].shape[0], np.float32) for n in LINEARS}
    for key, linears, into in GROUPS:
        if key not in scales:
            continue
        s = scales[key].astype(np.float32)
        for n in linears:
            w[n] *= s[None, :]
            col[n] = col[n] * s
        if into == "attn_v":
            s = s.reshape(c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim)[:, 0, :].reshape(-1)
        if into in row:
            w[into] /= s[:, None]
            row[into] = row[into] / s
            if into + ".bias" in w:
                w[into + ".bias"] /= s
        else:
            w[into] /= s
    return Folded(w, col, row)


@dataclass
class LayerResult:
    tensors: dict[str, QTensor]             # quantized linears and the norms that absorbed scales
    errors: dict[str, tuple[float, float]]  # name -> (weight error, output error), relative
    notes: dict[str, str]


def quantize_layer(i: int, w: dict[str, np.ndarray], stats: dict[str, InputStats], c: ModelConfig, group: int,
                   keep: set[str]) -> LayerResult:
    """Scale search, folding, clipping search and rounding for layer i's float weights `w` (by short
    name); linears in `keep` (kept exactly by the caller) are left as they are, and so are the groups
    they take part in."""
    ties = {"o": tie_heads(c)}
    groups = {n: int4_group(w[n].shape[1], group, f"blk.{i}.{n}.weight") for n in LINEARS}
    choices = {key: search_scale([w[n] for n in linears], stats[key], groups[linears[0]], ties.get(key))
               for key, linears, into in GROUPS if not (keep & {*linears, into})}
    folded = fold_scales(w, {k: ch.scale for k, ch in choices.items()}, c)
    tensors: dict[str, QTensor] = {}
    errors: dict[str, tuple[float, float]] = {}
    notes: dict[str, str] = {}
    for n in LINEARS:
        if n in keep:
            continue
        name = f"blk.{i}.{n}.weight"
        ws, s, stat = folded.weights[n], folded.col_scale[n], stats[INPUT_OF[n]]
        choice = choices.get(INPUT_OF[n])
        note = "no scaling" if choice is None or choice.alpha is None else f"alpha {choice.alpha:.2f}"
        clip = None
        if n not in NOT_CLIPPED:
            clip = search_clip(ws, stat.gram / np.outer(s, s), groups[n], CLIP_GRID, CLIP_MAX_SHRINK)
            absmax = np.abs(ws.reshape(ws.shape[0], -1, groups[n])).max(axis=2)
            note += f", {np.mean(clip < absmax):.0%} of groups clipped"
        t = int4(name, ws, groups[n], clip)
        effective = t.dequantize() / folded.row_scale[n][:, None] / s[None, :]
        gram = stat.gram.astype(np.float32)
        base = output_error([w[n]], [np.zeros_like(w[n])], gram)
        out_err = np.sqrt(output_error([w[n]], [effective], gram) / base) if base > 0 else 0.0
        tensors[name] = t
        errors[name] = (relative_error(w[n], effective), float(out_err))
        notes[name] = note
    for n in ("attn_norm", "ffn_norm"):
        name = f"blk.{i}.{n}.weight"
        tensors[name] = QTensor(name, "F32", folded.weights[n].shape, folded.weights[n])
    if "attn_v.bias" in w:
        name = f"blk.{i}.attn_v.bias"
        tensors[name] = QTensor(name, "F32", folded.weights["attn_v.bias"].shape, folded.weights["attn_v.bias"])
    return LayerResult(tensors, errors, notes)


def awq_quantize(config: ModelConfig, float_weight: Callable[[str], np.ndarray], calib: Calibration, group: int,
                 keep: set[str], on_layer: Callable[[int, int, LayerResult], None] | None = None,
                 biased: bool = False) -> None:
    """Run the calibration through the model layer by layer and quantize each layer with AWQ;
    `on_layer(i, n_layers, result)` receives each layer's tensors as soon as they are ready.
    biased: the layers have Q, K and V biases ("blk.N.attn_q.bias", ...), run and folded with them."""
    c = config
    windows = calib.windows
    B, T = windows.shape
    cos, sin = rope_tables(c, T)
    x = float_weight("token_embd.weight")[windows].astype(np.float32)       # [B, T, dim]
    per_chunk = max(1, CHUNK_TOKENS // T)
    for i in range(c.n_layers):
        w = {n: float_weight(f"blk.{i}.{n}.weight") for n in ("attn_norm", "ffn_norm", *LINEARS)}
        if biased:
            w.update({f"{n}.bias": float_weight(f"blk.{i}.{n}.bias") for n in LINEARS[:3]})
        stats = {"qkv": InputStats(c.dim), "o": InputStats(c.q_dim), "gate_up": InputStats(c.dim),
                 "down": InputStats(c.ffn_dim)}
        for b in range(0, B, per_chunk):
            x[b:b + per_chunk] = layer_forward(x[b:b + per_chunk], w, c, cos, sin, stats)
        layer_keep = {n for n in LINEARS if f"blk.{i}.{n}.weight" in keep}
        result = quantize_layer(i, w, stats, c, group, layer_keep)
        if on_layer is not None:
            on_layer(i, c.n_layers, result)
