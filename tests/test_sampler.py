"""Sampler: the distribution each setting defines, and draws that follow it."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import PerfxError
from engine.sampler import Sampler, Sampling

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
