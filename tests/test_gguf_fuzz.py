"""A seeded fuzzer of GGUF files: byte and field mutations of a tiny model's header (and a few of its data).

Every mutant must either load and give finite logits, or be refused with a PerfxError of one line: never
another exception, a hang (each mutant runs under a SIGALRM watchdog) or a crash (which would end the run).
"""
from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from perfx.engine.errors import PerfxError
from perfx.engine.llm import load_model
from tests.conftest import TinySpec, write_tiny_gguf
from tests.gguf_craft import ARRAY, BOOL, F32, F64, I8, I64, STRING, U8, U32, U64, Crafted, Raw, value_bytes

SEED = 15
MUTANTS = 300
WATCHDOG_S = 10.0         # a mutant taking longer counts as a hang

ODD_VALUES = [          # (value, GGUF type)
    (0, U32), (1, U32), (3, U32), (2**32 - 1, U32), (2**64 - 1, U64), (-1, I64), (-(2**63), I64), (255, U8),
    (-128, I8), (float("nan"), F32), (float("inf"), F32), (-1e-3, F32), (1e-45, F32), (3e38, F32),
    (1e308, F64), (True, BOOL), (False, BOOL), ("", STRING), ("abc", STRING), ("\u00e9" * 300, STRING),
    ("llama", STRING), ("qwen2", STRING), ("gpt2", STRING), ([], ARRAY), ([0, 1, 2], ARRAY),
]


class Hang(Exception):
    pass


def pick(rng: np.random.Generator, choices: list):
    """One of `choices`, as it is (rng.choice would turn large ints into floats)."""
    return choices[int(rng.integers(len(choices)))]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Crafted:
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=32, ctx_len=64, seed=1))
    return Crafted.read(path)


def mutate(base: Crafted, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutant: (what was done, the file's bytes)."""
    f = base.copy()
    kind = rng.choice(["bytes", "bytes", "value", "type", "drop", "tensor", "cut", "data"])
    if kind in ("value", "type", "drop"):
        i = int(rng.integers(len(f.metadata)))
        key = f.metadata[i][0]
        if kind == "drop":
            del f.metadata[i]
            return f"drop {key}", f.to_bytes()
        if kind == "type":                   # the type id changes, the value's bytes stay
            vtype = int(rng.integers(0, 16))
            _, old_type, value, sub = f.metadata[i]
            f.metadata[i][1:] = [vtype, Raw(value_bytes(old_type, value, sub)), None]
            return f"type of {key} -> {vtype}", f.to_bytes()
        value, vtype = pick(rng, ODD_VALUES)
        sub = U32 if vtype == ARRAY else None
        f.metadata[i][1:] = [vtype, value, sub]
        return f"{key} = {value!r:.30} (type {vtype})", f.to_bytes()
    if kind == "tensor":
        t = f.tensors[int(rng.integers(len(f.tensors)))]
        field = rng.choice(["dims", "type", "offset", "name"])
        if field == "dims":
            t["dims"] = [pick(rng, [0, 1, 3, 32, 263, 2**31, 2**32, 2**63]) for _ in range(int(rng.integers(0, 6)))]
        elif field == "type":
            t["type"] = int(rng.integers(0, 42))
        elif field == "offset":
            o = t["offset"]
            t["offset"] = pick(rng, [o + 1, o + 32, (o - 32) % 2**64, 0, 2**63, 2**64 - 32])
        else:
            t["name"] = pick(rng, ["", "blk.0.attn_q.weight", "rope_freqs.weight", "x" * 300, "blk.99.ffn_up.weight"])
        return f"tensor {field} -> {t[field]!r:.40}", f.to_bytes()
    blob = bytearray(f.to_bytes())
    header_end = len(f.header())
    if kind == "cut":
        n = int(rng.integers(0, len(blob)))
        return f"cut at {n}", bytes(blob[:n])
    if kind == "data":                       # a few bytes of the tensor data (norms and embedding)
        for _ in range(int(rng.integers(1, 4))):
            blob[int(rng.integers(header_end, len(blob)))] = int(rng.integers(256))
        return "data bytes", bytes(blob)
    what = []
    for _ in range(int(rng.integers(1, 5))):   # header bytes: random, 0x00, 0xff, or a bit flip
        pos = int(rng.integers(4, header_end))
        op = rng.choice(["rand", "zero", "ff", "flip", "insert", "delete"])
        if op == "insert":
            blob[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        elif op == "delete":
            del blob[pos:pos + int(rng.integers(1, 9))]
        else:
            flip = blob[pos] ^ (1 << int(rng.integers(8)))
            blob[pos] = {"rand": int(rng.integers(256)), "zero": 0, "ff": 255, "flip": flip}[op]
        what.append(f"{op}@{pos}")
    return "header " + " ".join(what), bytes(blob)


def run_mutant(path: Path) -> str:
    """'ok' or 'refused'; any other outcome raises."""
    try:
        llm = load_model(path, device="numpy", ctx=32)
    except PerfxError as e:
        message = str(e)
        assert message and "\n" not in message, f"not one line: {message!r}"
        return "refused"
    ids = [i % llm.config.vocab_size for i in (0, 7, 100, 262)]
    with np.errstate(all="ignore"):        # random weights may overflow on the way and still end finite
        logits = llm.forward(ids)
    assert logits.shape == (len(ids), llm.config.vocab_size) and np.isfinite(logits).all(), "logits not finite"
    return "ok"


def _alarm(signum, frame):
    raise Hang()


def test_gguf_mutants_load_or_are_refused_in_one_line(base, tmp_path):
    rng = np.random.default_rng(SEED)
    outcomes, failures = Counter(), []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for n in range(MUTANTS):
            what, blob = mutate(base, rng)
            path = tmp_path / f"m{n}.gguf"
            path.write_bytes(blob)
            signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
            try:
                outcomes[run_mutant(path)] += 1
            except Hang:
                failures.append(f"#{n} {what}: hang (over {WATCHDOG_S} s)")
            except Exception as e:    # noqa: BLE001 - the point of the test
                failures.append(f"#{n} {what}: {type(e).__name__}: {str(e)[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                path.unlink()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not failures, f"{len(failures)} of {MUTANTS} mutants failed badly:\n" + "\n".join(failures[:30])
    assert outcomes["refused"] > MUTANTS // 4 and outcomes["ok"] > 10, outcomes   # the fuzzer reaches both


def test_the_base_model_loads(base, tmp_path):
    assert run_mutant(base.write(tmp_path / "m.gguf")) == "ok"
