"""The NumPy reference transformer against an independent float64 computation, and the LLM API."""
from __future__ import annotations

import numpy as np
import pytest

from perfx.engine import Sampling, load_model
from perfx.engine.errors import PerfxError
from tests.conftest import TinySpec, write_tiny_gguf


def reference_logits(w: dict[str, np.ndarray], spec: TinySpec, ids: list[int]) -> np.ndarray:
    """LLaMA forward in float64, one position and one head at a time, RoPE as complex rotation
    of adjacent pairs (the GGUF convention)."""
    hd = spec.dim // spec.n_heads
    group = spec.n_heads // spec.n_kv_heads
    W = {k: v.astype(np.float64) for k, v in w.items()}

    def norm(v, g):
        return v / np.sqrt(np.mean(v * v) + spec.norm_eps) * g

    def rope(v, pos):  # v [hd]
        pairs = v[0::2] + 1j * v[1::2]
        theta = pos * spec.rope_base ** (-np.arange(0, hd, 2) / hd)
        r = pairs * np.exp(1j * theta)
        out = np.empty(hd)
        out[0::2], out[1::2] = r.real, r.imag
        return out

    keys = [[] for _ in range(spec.n_layers)]
    values = [[] for _ in range(spec.n_layers)]
    logits = []
    for pos, tok in enumerate(ids):
        x = W["token_embd.weight"][tok].copy()
        for l in range(spec.n_layers):
            p = f"blk.{l}."
            h = norm(x, W[p + "attn_norm.weight"])
            q = W[p + "attn_q.weight"] @ h
            k = W[p + "attn_k.weight"] @ h
            v = W[p + "attn_v.weight"] @ h
            keys[l].append([rope(k[j * hd:(j + 1) * hd], pos) for j in range(spec.n_kv_heads)])
            values[l].append([v[j * hd:(j + 1) * hd] for j in range(spec.n_kv_heads)])
            att = np.zeros(spec.n_heads * hd)
            for head in range(spec.n_heads):
                kv = head // group
                qh = rope(q[head * hd:(head + 1) * hd], pos)
                scores = np.array([qh @ keys[l][s][kv] for s in range(pos + 1)]) / np.sqrt(hd)
                p_ = np.exp(scores - scores.max())
                p_ /= p_.sum()
                att[head * hd:(head + 1) * hd] = sum(p_[s] * values[l][s][kv] for s in range(pos + 1))
            x = x + W[p + "attn_output.weight"] @ att
            h = norm(x, W[p + "ffn_norm.weight"])
            g = W[p + "ffn_gate.weight"] @ h
            u = W[p + "ffn_up.weight"] @ h
            x = x + W[p + "ffn_down.weight"] @ (g / (1 + np.exp(-g)) * u)
        out = W.get("output.weight", W["token_embd.weight"])
        logits.append(out @ norm(x, W["output_norm.weight"]))
    return np.array(logits)


@pytest.mark.parametrize("qtype,tied", [("F32", True), ("Q4_0", False), ("Q4_1", True), ("Q8_0", True), ("F16", False)])
def test_forward_matches_float64_reference(tmp_path, qtype, tied):
    spec = TinySpec(qtype=qtype, tied=tied, seed=hash(qtype) % 1000)
    weights = write_tiny_gguf(tmp_path / "m.gguf", spec)
    model = load_model(tmp_path / "m.gguf", device="numpy", ctx=64)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.vocab_size, size=13).tolist()
    expected = reference_logits(weights, spec, ids)

    logits = model.forward(ids)                                  # prefill as one batch
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    model.reset()                                                # then a split: 5 tokens, then one at a time
    parts = [model.forward(ids[:5], 0)] + [model.forward([t], 5 + i) for i, t in enumerate(ids[5:])]
    np.testing.assert_allclose(np.concatenate(parts), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_generate_greedy_is_argmax_chain(tiny_gguf):
    path, spec, weights = tiny_gguf
    model = load_model(path, device="numpy", ctx=64)
    prompt = [5, 9, 200, 17]
    out, stats = model.generate(prompt, Sampling(temperature=0, max_tokens=6))
    ids = list(prompt)
    for _ in range(len(out)):
        ids.append(int(np.argmax(reference_logits(weights, spec, ids)[-1])))
    assert out == ids[len(prompt):]
    assert stats.gen_tokens == len(out) and stats.finish in ("length", "stop")


def test_generate_reuses_cached_prefix(tiny_gguf):
    path, *_ = tiny_gguf
    model = load_model(path, device="numpy", ctx=64)
    first, _ = model.generate([3, 4, 5, 6, 7, 8], Sampling(temperature=0, max_tokens=3))
    conversation = [3, 4, 5, 6, 7, 8] + first + [10, 11]
    second, stats = model.generate(conversation, Sampling(temperature=0, max_tokens=3))
    # the prompt and all generated tokens but the last (never fed back) were in the cache
    assert stats.prompt_tokens == len(conversation) - (6 + len(first) - 1)
    fresh = load_model(path, device="numpy", ctx=64)
    assert fresh.generate(conversation, Sampling(temperature=0, max_tokens=3))[0] == second


def test_same_seed_same_tokens(tiny_gguf):
    path, *_ = tiny_gguf
    model = load_model(path, device="numpy", ctx=64)
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42, max_tokens=20)
    a = model.generate([1, 2, 3], s)[0]
    b = model.generate([1, 2, 3], s)[0]
    c = model.generate([1, 2, 3], s.with_(seed=43))[0]
    assert a == b and a != c


def test_prompt_longer_than_context_is_refused(tiny_gguf):
    path, *_ = tiny_gguf
    model = load_model(path, device="numpy", ctx=16)
    with pytest.raises(PerfxError, match="longer than the context of 16"):
        model.generate(list(range(20)), Sampling(temperature=0))


def test_generation_stops_at_full_context(tiny_gguf):
    path, *_ = tiny_gguf
    model = load_model(path, device="numpy", ctx=12)
    out, stats = model.generate(list(range(1, 9)), Sampling(temperature=1.0, seed=0, max_tokens=100))
    assert stats.finish in ("length", "stop")
    assert len(out) <= 12 - 8 + 1
