"""Attention over a paged KV cache (engine.paged): the NumPy operators against the contiguous cache,
the OpenCL kernels against NumPy (outputs and pool contents), whole models, and bad steps.

OpenCL tests run on a PoCL / CPU device (PERFX_TEST_CL_PLATFORM: a substring of the platform or
device to use instead) and skip when there is none; output buffers and the pool are filled with NaN
before use, so a value a kernel should have written but did not, or read before it was written,
shows up.
"""
from __future__ import annotations

import numpy as np
import pytest

from perfx.engine import load_model
from perfx.engine.errors import PerfxError
from perfx.engine.paged import PagedBatch
from tests.conftest import TinySpec, write_tiny_gguf

BLOCK = 16
SPEC = TinySpec(n_layers=2, dim=576, n_heads=9, n_kv_heads=3, ffn_dim=96, ctx_len=256, qtype="Q8_0", seed=7)


# --- a serving schedule ---------------------------------------------------------------------------


class Pool:
    """Hands out the pool's blocks in a shuffled order as sequences grow; block_table rows are the
    sequences' slots, some rows unused."""

    def __init__(self, n_blocks: int, rows: int, max_blocks: int, block_size: int, seed: int = 0):
        self.free = list(np.random.default_rng(seed).permutation(n_blocks))
        self.table = np.full((rows, max_blocks), -1, np.int32)
        self.block_size = block_size

    def batch(self, runs: list[tuple[int, int, int]]) -> PagedBatch:
        """A step of (row, first position, token count) runs, in that order, blocks allocated as needed."""
        pos = np.concatenate([np.arange(p, p + n) for _, p, n in runs])
        seq = np.concatenate([np.full(n, row) for row, _, n in runs])
        for row, p, n in runs:
            for b in range((p + n - 1) // self.block_size + 1):
                if self.table[row, b] < 0:
                    self.table[row, b] = self.free.pop()
        return PagedBatch(pos, seq, self.table.copy(), self.block_size)


# Three sequences in rows 2, 0 and 1 (row 3 unused): prompts of 5, 17 (prefilled in two chunks) and
# 1 tokens, then decoding all three, in a different order each step.
PROMPTS = {2: 5, 0: 17, 1: 1}
DECODE_STEPS = 12


def schedule() -> list[list[tuple[int, int, int]]]:
    steps = [[(0, 0, 10), (1, 0, 1), (2, 0, 5)],
             [(2, 5, 1), (0, 10, 7), (1, 1, 1)]]
    length = {2: 6, 0: 17, 1: 2}
    for i in range(DECODE_STEPS):
        order = [0, 1, 2][i % 3:] + [0, 1, 2][:i % 3]
        steps.append([(row, length[row], 1) for row in order])
        for row in order:
            length[row] += 1
    return steps


def token_ids(vocab: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(5)
    return {row: rng.integers(0, vocab, n + DECODE_STEPS + 1) for row, n in PROMPTS.items()}


def run_paged(model, ids: dict[int, np.ndarray], n_blocks: int = 12) -> list[tuple[PagedBatch, np.ndarray]]:
    """Runs the schedule through forward_paged; each step's batch and its logits [T, vocab]."""
    tr = model.transformer
    tr.backend.kv_pool(n_blocks, BLOCK)
    pool = Pool(n_blocks, rows=4, max_blocks=4, block_size=BLOCK, seed=3)
    out = []
    for runs in schedule():
        batch = pool.batch(runs)
        step_ids = np.concatenate([ids[row][p:p + n] for row, p, n in runs])
        h = tr.forward_paged(step_ids, batch)
        out.append((batch, tr.backend.logits_rows(h, tr.w.output, np.arange(batch.n_tokens))))
    return out


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("paged") / "gqa.gguf"
    write_tiny_gguf(path, SPEC)
    return path


# --- 1. NumPy: paged = contiguous -----------------------------------------------------------------


def test_numpy_paged_matches_each_sequence_alone(tiny_path):
    model = load_model(tiny_path, device="numpy", ctx=256)
    ids = token_ids(model.config.vocab_size)
    steps = run_paged(model, ids)
    for row in PROMPTS:
        alone = load_model(tiny_path, device="numpy", ctx=256)
        n = max(int(b.pos[b.seq == row].max()) for b, _ in steps) + 1
        want = alone.forward(ids[row][:n])                       # [n, vocab], one sequence, contiguous
        seen = 0
        for batch, logits in steps:
            mine = batch.seq == row
            # the pool makes products row by row, which BLAS rounds unlike the reference's matrix product
            np.testing.assert_allclose(logits[mine], want[batch.pos[mine]], rtol=0,
                                       atol=1e-3 * np.abs(want).max(), err_msg=f"row {row}")
            seen += int(mine.sum())
        assert seen == n


def test_numpy_pool_layout_and_bytes(tiny_path):
    model = load_model(tiny_path, device="numpy", ctx=256)
    backend = model.transformer.backend
    backend.kv_pool(7, 32)
    c = model.config
    assert backend.k_pool.shape == (c.n_layers, 7, c.n_kv_heads, 32, c.head_dim)
    assert (backend.n_blocks, backend.block_size) == (7, 32)
    assert backend.kv_pool_bytes == 2 * 4 * c.n_layers * 7 * c.n_kv_heads * 32 * c.head_dim


# --- 2. OpenCL operators against NumPy ------------------------------------------------------------


@pytest.fixture(scope="module")
def cl_rt():
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.runtime import Runtime
    from tests.test_cl_fused import _pick_device

    device = _pick_device()
    if device is None:
        pytest.skip("no usable OpenCL CPU device")
    return Runtime(device)


CPU_PARAMS = {"att_vec": 16, "att_wg": 64}       # kernels/tuning.toml's CPU entry
GPU_LIKE = {"att_vec": 4, "att_wg": 128}         # the non-CPU defaults, run on the CPU too

# (layers, runs): the first step on both layers, the rest on layer 1 only; T = 17, 3, 1, 300, 3,
# a 280-token prefill chunk and a 19-token one beside a decode token in the fourth.
OP_STEPS = [((0, 1), [(0, 0, 17)]),
            ((1,), [(0, 17, 1), (1, 0, 2)]),
            ((1,), [(1, 2, 1)]),
            ((1,), [(0, 18, 1), (2, 0, 280), (1, 3, 19)]),
            ((1,), [(2, 280, 1), (1, 22, 1), (0, 19, 1)])]


@pytest.mark.parametrize("kv_half", [False, True])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("params", [CPU_PARAMS, GPU_LIKE], ids=["cpu", "gpu-like"])
def test_cl_paged_ops_match_numpy(cl_rt, params, block_size, kv_half):
    from perfx.engine.backends.opencl.paged import PagedAttention
    from tests.test_cl_fused import fused_ops, make_config, poison, poisoned, reference

    config, ctx, n_blocks = make_config(), 512, 40
    ops = fused_ops(cl_rt, config, ctx, {**params, "kv_half": kv_half})
    paged = PagedAttention(cl_rt, config, ops, 512, n_blocks, block_size)
    for buf in (paged.k_pool, paged.v_pool, paged.meta):
        poison(cl_rt, buf)
    ref = reference(config, ctx)
    ref.kv_pool(n_blocks, block_size)
    pool = Pool(n_blocks, rows=4, max_blocks=20, block_size=block_size, seed=block_size)
    rng = np.random.default_rng(block_size + kv_half)
    width = config.q_dim + 2 * config.kv_dim
    touched = np.zeros((config.n_layers, n_blocks, block_size), bool)
    atol = 5e-3 if kv_half else 2e-5

    for layers, runs in OP_STEPS:
        batch = pool.batch(runs)
        T = batch.n_tokens
        paged.begin(batch)
        ref.begin_paged(batch)
        for layer in layers:
            qkv = rng.standard_normal((T, width)).astype(np.float32)
            out = poisoned(cl_rt, 4 * T * config.q_dim)
            paged.attention(cl_rt.to_device(qkv), T, layer, out)
            want = ref.paged_attention(qkv, layer)
            np.testing.assert_allclose(cl_rt.read(out, (T, config.q_dim)), want, rtol=1e-4, atol=atol,
                                       err_msg=f"layer {layer} step {runs}")
            blocks = batch.block_table[batch.seq, batch.pos // block_size]
            touched[layer, blocks, batch.pos % block_size] = True

    k, v = paged.read_pool()
    want_k, want_v = ref.k_pool, ref.v_pool
    if kv_half:
        want_k, want_v = (a.astype(np.float16) for a in (want_k, want_v))
    slots = touched[:, :, None, :]                                # [layers, blocks, 1, slots]
    slots = np.broadcast_to(slots, k.shape[:4])
    np.testing.assert_allclose(k[slots].astype(np.float32), want_k[slots].astype(np.float32),
                               rtol=2e-3 if kv_half else 1e-6, atol=1e-6)
    np.testing.assert_array_equal(v[slots], want_v[slots])
    bits = np.uint16 if kv_half else np.uint32
    for pool_array in (k, v):
        untouched = pool_array.view(bits)[~slots]
        assert (untouched == np.iinfo(bits).max).all(), "a slot outside the step's tokens was written"


def test_tiles_cut_runs_of_one_sequence():
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.paged import PagedAttention

    paged = PagedAttention.__new__(PagedAttention)
    paged.qt_max = 4
    pos = np.array([7, 0, 1, 2, 3, 4, 5, 9, 3, 4], np.int32)
    seq = np.array([0, 1, 1, 1, 1, 1, 1, 1, 2, 2], np.int32)
    first, count = paged.tiles(pos, seq)
    assert first.tolist() == [0, 1, 5, 7, 8]
    assert count.tolist() == [1, 4, 2, 1, 2]


# --- 3. whole model: OpenCL against NumPy ---------------------------------------------------------


@pytest.fixture(scope="module")
def cl_device() -> str:
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select

    try:
        selection = select("opencl")
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    return selection.info.id


def test_cl_forward_paged_matches_numpy(tiny_path, cl_device, exact_kv):
    ref = load_model(tiny_path, device="numpy", ctx=256)
    dev = load_model(tiny_path, device=cl_device, ctx=256)
    ids = token_ids(ref.config.vocab_size)
    want_steps = run_paged(ref, ids)
    got_steps = []
    backend = dev.transformer.backend
    for i, step in enumerate(run_paged(dev, ids)):
        got_steps.append(step)
        if i == 1:
            allocated = backend.device_bytes
    assert backend.device_bytes == allocated, "the decode steps allocated device memory"
    assert backend.kv_pool_bytes > 0 and backend.n_blocks == 12 and backend.block_size == BLOCK

    for (_, want), (_, got) in zip(want_steps, got_steps):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=2e-3 * scale, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))

    # rows in any order, repeated, more than one chunk of LOGIT_ROWS
    tr = dev.transformer
    batch = PagedBatch(np.arange(20), np.zeros(20), np.array([[0, 1]]), BLOCK)
    step_ids = ids[0][:20]
    all_rows = tr.backend.logits_rows(tr.forward_paged(step_ids, batch), tr.w.output, np.arange(20))
    rows = np.random.default_rng(0).integers(0, 20, 150)
    got = tr.backend.logits_rows(tr.forward_paged(step_ids, batch), tr.w.output, rows)
    tol = 1e-5 * np.abs(all_rows).max()              # chunks of other sizes: other matmul kernels
    np.testing.assert_allclose(got, all_rows[rows], rtol=0, atol=tol)
    last = tr.backend.logits_rows(tr.forward_paged(step_ids, batch), tr.w.output, np.array([19]))   # the step's last token
    np.testing.assert_allclose(last, all_rows[-1:], rtol=0, atol=tol)


# --- 4. bad steps ---------------------------------------------------------------------------------


def bad_steps() -> list[tuple[str, PagedBatch]]:
    table = np.array([[2, -1, 3], [0, 1, -1]], np.int32)
    return [
        ("-1", PagedBatch([16], [0], table, BLOCK)),                       # block 1 of row 0 is -1
        ("-1", PagedBatch([0, 1, 40], [1, 1, 1], table, BLOCK)),           # position 40: block 2 of row 1
        ("block ids", PagedBatch([3], [0], np.array([[12, 0]]), BLOCK)),   # id past the pool's 12 blocks
        ("block table", PagedBatch([48], [0], table, BLOCK)),               # past 3 blocks of 16
        ("rows", PagedBatch([0], [2], table, BLOCK)),                       # no row 2
        ("block_size", PagedBatch([0], [0], table, 32)),
        ("context", PagedBatch([300], [0], np.arange(20)[None] % 12, BLOCK)),  # ctx 256
    ]


def check_one_line(fn, match: str) -> None:
    with pytest.raises(PerfxError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_numpy_rejects_bad_steps(tiny_path):
    backend = load_model(tiny_path, device="numpy", ctx=256).transformer.backend
    check_one_line(lambda: backend.begin_paged(PagedBatch([0], [0], [[0]], BLOCK)), "no KV pool")
    backend.kv_pool(12, BLOCK)
    for match, batch in bad_steps():
        check_one_line(lambda b=batch: backend.begin_paged(b), match)


def test_cl_rejects_bad_steps(tiny_path, cl_device):
    model = load_model(tiny_path, device=cl_device, ctx=256)
    tr = model.transformer
    check_one_line(lambda: tr.backend.begin_paged(PagedBatch([0], [0], [[0]], BLOCK)), "no KV pool")
    tr.backend.kv_pool(12, BLOCK)
    for match, batch in bad_steps():
        check_one_line(lambda b=batch: tr.backend.begin_paged(b), match)
    T = tr.backend.max_tokens + 1
    too_many = PagedBatch(np.arange(T) % 16, np.arange(T) // 16, np.arange(T // 16 + 1)[:, None] % 12, BLOCK)
    check_one_line(lambda: tr.forward_paged(np.zeros(T, np.int64), too_many), "at most")
    one = PagedBatch([0], [0], [[0]], BLOCK)
    check_one_line(lambda: tr.forward_paged(np.zeros(2, np.int64), one), "2 tokens in the pass")


@pytest.mark.parametrize("device", ["numpy", "opencl"])
def test_rows_do_not_depend_on_the_batch(tiny_path, device):
    """Once a backend has a pool, a sequence's logits are bit for bit the same whichever other
    sequences share its steps and however its prompt is cut into chunks (serving's exactness)."""
    if device == "opencl":
        pytest.importorskip("pyopencl")
        from perfx.engine.backends.opencl.devices import select

        try:
            device = select("opencl").info.id
        except Exception:
            pytest.skip("no OpenCL device")
    ids = token_ids(263)[0][:20]
    other = token_ids(263)[1][:20]

    def logits_of(steps):
        model = load_model(tiny_path, device=device, ctx=256)
        tr = model.transformer
        tr.backend.kv_pool(8, BLOCK)
        rows = []
        for tokens, batch in steps:
            h = tr.forward_paged(np.asarray(tokens), batch)
            rows.append(tr.backend.logits_rows(h, tr.w.output, np.flatnonzero(batch.seq == 0)))
        return np.concatenate(rows)

    table = np.array([[0, 1], [2, 3]])
    decode = [4, 9, 16]                           # tokens fed after the prompt, one per step
    alone = logits_of(
        [(ids, PagedBatch(np.arange(20), np.zeros(20), table[:1], BLOCK))]
        + [([d], PagedBatch([20 + i], [0], table[:1], BLOCK)) for i, d in enumerate(decode)])
    shared = logits_of([
        (np.concatenate([other[:7], ids[:5]]), PagedBatch(np.r_[np.arange(7), np.arange(5)],
                                                          np.r_[np.ones(7), np.zeros(5)], table, BLOCK)),
        (np.concatenate([ids[5:], other[7:9]]), PagedBatch(np.r_[np.arange(5, 20), np.arange(7, 9)],
                                                           np.r_[np.zeros(15), np.ones(2)], table, BLOCK)),
    ] + [([d, 7], PagedBatch([20 + i, 9 + i], [0, 1], table, BLOCK)) for i, d in enumerate(decode)])
    np.testing.assert_array_equal(shared, alone)
