"""Sampling: validation of absurd values, greedy, top-k/top-p semantics, repetition penalty, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.sampling import SamplingParams, _nucleus, apply_repetition_penalty, sample_next


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": -0.1}, "temperature must be between 0 and 2"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": -5}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens must be <= "),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_values_are_rejected_with_the_value(kw, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kw)


def test_greedy_and_top_k_1_pick_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32)
    assert sample_next(logits, SamplingParams(temperature=0), rng) == int(np.argmax(logits))
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), rng) == int(np.argmax(logits))


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(1).normal(size=5000).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7)

    def draw():
        rng = np.random.default_rng(p.seed)
        return [sample_next(logits, p, rng) for _ in range(50)]

    assert draw() == draw()
    assert len(set(draw())) > 1


def test_nucleus_matches_brute_force():
    rng = np.random.default_rng(2)
    for size in (50, 3000):
        probs = rng.dirichlet(np.ones(size) * 0.1)
        cand, kept = _nucleus(np.arange(size), probs, 0.8)
        order = np.argsort(-probs)
        k = int(np.searchsorted(np.cumsum(probs[order]), 0.8)) + 1
        assert set(cand.tolist()) == set(order[:k].tolist())
        assert kept.sum() >= 0.8 - 1e-9


def test_top_p_only_draws_from_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    rng = np.random.default_rng(0)
    draws = {sample_next(logits, p, rng) for _ in range(300)}
    assert draws == {0, 1}


def test_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    p = SamplingParams(temperature=1.0, seed=0)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_next(np.log(probs).astype(np.float32), p, rng) for _ in range(4000)], minlength=3)
    assert np.allclose(counts / 4000, probs, atol=0.03)


def test_repetition_penalty_like_hf():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert apply_repetition_penalty(logits, [0], 1.0) is logits


def test_overrides_ignore_none_and_validate():
    p = SamplingParams().with_overrides(temperature=None, top_p=0.5, stop="END")
    assert p.temperature == 0.0 and p.top_p == 0.5 and p.stop == ("END",)
    with pytest.raises(ConfigError):
        p.with_overrides(top_p=2)
