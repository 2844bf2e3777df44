"""Sampler: the distribution each setting defines, and draws that follow it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perfx.engine.errors import PerfxError
from perfx.engine.sampler import OPTIONS, Sampler, Sampling, SamplingError

ROOT = Path(__file__).resolve().parents[1]
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS)
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)


def draw(sampling: Sampling, logits=LOGITS, n=20000) -> np.ndarray:
    sampler = Sampler(sampling)
    counts = np.bincount([sampler(logits) for _ in range(n)], minlength=len(logits))
    return counts / n


def test_greedy_takes_the_argmax():
    logits = np.array([0.1, 3.0, -2.0, 2.9])
    assert Sampler(Sampling(temperature=0))(logits) == 1


def test_plain_sampling_follows_softmax():
    freq = draw(Sampling(temperature=1.0, seed=0, **OFF))
    assert np.abs(freq - PROBS).max() < 0.015


def test_temperature_sharpens():
    p = Sampler(Sampling(temperature=0.5, **OFF)).probabilities(LOGITS)
    expected = PROBS ** 2 / (PROBS ** 2).sum()
    np.testing.assert_allclose(p, expected, rtol=1e-9)


def test_top_k_keeps_k_tokens_renormalised():
    freq = draw(Sampling(temperature=1.0, seed=1, top_k=2, top_p=1.0, min_p=0.0))
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.5 / 0.8) < 0.015


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = Sampler(Sampling(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0)).probabilities(LOGITS)
    np.testing.assert_allclose(p, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-12)
    p = Sampler(Sampling(temperature=1.0, top_k=0, top_p=0.81, min_p=0.0)).probabilities(LOGITS)
    np.testing.assert_allclose(p, np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-12)


def test_min_p_drops_tokens_below_fraction_of_top():
    p = Sampler(Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)).probabilities(LOGITS)
    np.testing.assert_allclose(p, np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-12)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -1.0, 1.0, 0.5])
    s = Sampling(temperature=1.0, repeat_penalty=2.0, **OFF)
    p = Sampler(s).probabilities(logits, history=[0, 1])
    z = np.array([1.0, -2.0, 1.0, 0.5])
    np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(), rtol=1e-9)
    # greedy with a penalty can change its choice
    assert Sampler(Sampling(temperature=0, repeat_penalty=4.0)).__call__(np.array([2.0, 1.0]), [0]) == 1


def test_seed_reproduces_draws():
    s1, s2 = Sampler(Sampling(seed=7, **OFF)), Sampler(Sampling(seed=7, **OFF))
    assert [s1(LOGITS) for _ in range(50)] == [s2(LOGITS) for _ in range(50)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-3), dict(repeat_penalty=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(PerfxError, match="bad sampling setting"):
        Sampling(**bad)


# ---------------------------------------------------------------------- numeric edges: never NaN

def random_logits(n=49152, seed=0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 8, n).astype(np.float32)
    logits[123] = 40.0
    return logits


@pytest.mark.parametrize("temperature", [5e-324, 1e-307, 1e-300, 1e-30, 1e-6, 2.0])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    logits = random_logits()
    sampler = Sampler(Sampling(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    p = sampler.probabilities(logits)
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-9
    if temperature < 1e-6:
        assert p[123] == 1.0 and sampler(logits) == 123


@pytest.mark.parametrize("settings", [dict(top_p=1e-300), dict(top_p=1.0, min_p=0.999999), dict(top_k=10**30),
                                      dict(top_k=1, top_p=1e-9, min_p=0.5), dict(repeat_penalty=1e-300),
                                      dict(repeat_penalty=1e300), dict(temperature=1e-307, repeat_penalty=1e-300)])
def test_extreme_settings_keep_a_distribution(settings):
    logits = random_logits()
    logits[[5, 6, 7]] = [np.inf, -np.inf, np.finfo(np.float32).max]
    sampler = Sampler(Sampling(**{"temperature": 1.0, "seed": 1, **settings}))
    p = sampler.probabilities(logits, history=[5, 6, 7, 123, 9])
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-9 and (p >= 0).all()
    assert 0 <= sampler(logits, [5, 6, 7, 123, 9]) < logits.size


def test_nan_logits_are_an_error_not_a_draw():
    logits = random_logits()
    logits[3] = np.nan
    with pytest.raises(PerfxError, match="NaN"):
        Sampler(Sampling(temperature=0.7, seed=0))(logits)


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_every_seed_in_range_works(seed):
    assert 0 <= Sampler(Sampling(seed=seed))(LOGITS) < 4


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**64), dict(seed=1.5), dict(temperature=2.5),
                                 dict(temperature=float("nan")), dict(top_p=float("inf")), dict(top_k=True),
                                 dict(min_p=-0.0001), dict(repeat_last_n=-1), dict(max_tokens=-1)])
def test_values_outside_the_declared_range_are_refused(bad):
    with pytest.raises(SamplingError) as e:
        Sampling(**bad)
    assert e.value.option.name == next(iter(bad)) and "\n" not in str(e.value)


def test_options_table_declares_every_setting_once():
    from dataclasses import fields

    assert [o.name for o in OPTIONS] == [f.name for f in fields(Sampling)]
    assert {f.name: f.default for f in fields(Sampling)} == {o.name: o.default for o in OPTIONS}
    for o in OPTIONS:
        assert o.help and o.problem(o.default) is None
        assert o.api is None or o.problem(o.api_default) is None


# ---------------------------------------------------------------------- the command line

def perfx(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perfx.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("args, line", [(["--seed", "-1"], "error: --seed must be in 0..18446744073709551615 (got -1)"),
                                        (["--temp", "2.5"], "error: --temp must be in [0, 2] (got 2.5)"),
                                        (["--top-p", "0"], "error: --top-p must be in (0, 1] (got 0.0)")])
def test_perfx_run_refuses_a_setting_out_of_range_in_one_line(args, line):
    result = perfx("run", "hi", "--device", "numpy", *args)
    assert result.returncode == 1 and result.stderr.splitlines() == [line]


@pytest.mark.model
def test_a_tiny_temperature_is_greedy_in_run_and_chat(default_model_path):
    model = ["-m", str(default_model_path), "--device", "numpy", "-n", "4"]
    greedy = perfx("run", "Hi", *model, "--temp", "0")
    tiny = perfx("run", "Hi", *model, "--temp", "1e-307")
    assert tiny.returncode == 0 and tiny.stdout == greedy.stdout and greedy.stdout.strip()
    chat = perfx("chat", *model, stdin="/set temp=1e-307\nHi\n/set seed=-1\n/reset\n/set temp=0\nHi\n")
    assert chat.returncode == 0, chat.stderr
    replies = [line for line in chat.stdout.splitlines() if not line.startswith("temp=")]   # /set shows settings
    assert replies == [greedy.stdout.strip()] * 2
    assert [line for line in chat.stderr.splitlines() if line.startswith("error:")] == \
        ["error: bad sampling setting: seed must be in 0..18446744073709551615"]
