"""Speculative decoding (prompt lookup): greedy output token-identical to plain decoding, single stream and batched;
the sampling rule keeps the target's distribution exactly (a chi-square test that a wrong rule fails)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgekit.export.prompts import PROMPTS
from edgekit.runtimes import load, sampling
from edgekit.runtimes.engine import Engine, Request
from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.model import run_one
from edgekit.runtimes.sampling import log_softmax
from edgekit.runtimes.speculative import DraftLength, LookupDrafter


@pytest.fixture(scope="module")
def model(llama_bundle):
    return load(llama_bundle)


def _ids(model, prompt, **options):
    s = model.stream(prompt, **options)
    "".join(s)
    return s.stats


@pytest.mark.parametrize("name, prompt", PROMPTS, ids=[n for n, _ in PROMPTS])
def test_greedy_output_is_token_identical_on_every_parity_prompt(model, name, prompt):
    plain = _ids(model, prompt, max_new_tokens=48)
    spec = _ids(model, prompt, max_new_tokens=48, speculate="lookup")
    assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason
    assert spec.forward_passes <= plain.forward_passes + spec.drafted_tokens  # (drafts never cost a token)


class Oracle:
    """A drafter that proposes the plain greedy answer's next tokens, every ``wrong``-th one corrupted: drafts are
    kept and rejected at known places (a random tiny model rarely repeats itself, so lookup alone seldom hits)."""

    def __init__(self, prompt_len: int, answer: list[int], wrong: int = 0) -> None:
        self.prompt_len, self.answer, self.wrong = prompt_len, answer, wrong

    def propose(self, history, k):
        at = len(history) - self.prompt_len
        out = list(self.answer[at:at + k])
        if self.wrong and out and at % self.wrong == 0:
            out[-1] = (out[-1] + 1) % 300
        return out


def _run(model, prompt, drafter, **options):
    ids = model.tokenizer.encode_prompt(prompt)
    seq = model.new_sequence(ids, model.params(len(ids), speculate="lookup", **options))
    seq.drafter = drafter
    text = "".join(run_one(model.new_batch(1), seq))
    return text, seq.stats


@pytest.mark.parametrize("wrong", [0, 3, 2])
def test_verification_keeps_the_right_prefix_and_rewinds_the_rest(model, wrong):
    prompt = "Once upon a time"
    plain = _ids(model, prompt, max_new_tokens=40)
    n = len(model.tokenizer.encode_prompt(prompt))
    _, st = _run(model, prompt, Oracle(n, plain.token_ids, wrong), max_new_tokens=40)
    assert st.token_ids == plain.token_ids and st.drafted_tokens > 0
    if not wrong:
        assert st.accepted_tokens == st.drafted_tokens and st.tokens_per_forward > 2
    else:
        assert 0 < st.accepted_tokens < st.drafted_tokens


def test_speculation_composes_with_stop_strings_max_tokens_and_logprobs(model):
    prompt = "Once upon a time"
    n = len(model.tokenizer.encode_prompt(prompt))
    plain = _ids(model, prompt, max_new_tokens=40)
    text = model.generate(prompt, max_new_tokens=40)
    stop = text[10:14]
    got, _ = _run(model, prompt, Oracle(n, plain.token_ids), max_new_tokens=40, stop=[stop])
    assert got == text[:text.index(stop)]
    _, st = _run(model, prompt, Oracle(n, plain.token_ids), max_new_tokens=7)
    assert st.token_ids == plain.token_ids[:7] and st.finish_reason == "length"
    ids = model.tokenizer.encode_prompt(prompt)
    seq = model.new_sequence(ids, model.params(len(ids), speculate="lookup", max_new_tokens=12, logprobs=2))
    seq.drafter = Oracle(n, plain.token_ids)
    "".join(run_one(model.new_batch(1), seq))
    plain_lp = model.stream(prompt, max_new_tokens=12, logprobs=2)
    "".join(plain_lp)
    assert [e.token for e in seq.logprobs] == [e.token for e in plain_lp.logprobs]
    assert np.allclose([e.logprob for e in seq.logprobs], [e.logprob for e in plain_lp.logprobs], atol=1e-4)


def test_batched_rows_with_and_without_speculation_match_single_streams(model):
    prompts = [p for _, p in PROMPTS[:4]]
    alone = [_ids(model, p, max_new_tokens=32).token_ids for p in prompts]
    engine = Engine(model, max_batch=4)
    reqs = []
    for i, p in enumerate(prompts):
        ids = model.tokenizer.encode_prompt(p)
        opts = {"speculate": "lookup"} if i % 2 == 0 else {}
        reqs.append(Request(ids, model.params(len(ids), max_new_tokens=32, **opts), lambda ev: None))
        engine.submit(reqs[-1])
    while engine.running or engine.waiting:
        engine.step()
    assert [r.seq.stats.token_ids for r in reqs] == alone


def test_the_drafter_and_the_adaptive_length():
    d = LookupDrafter()
    assert d.propose([1, 2, 3, 4, 5, 1, 2, 3], 4) == [4, 5, 1, 2]  # the longest n-gram's most recent match
    assert d.propose([5, 6, 7], 2) == [] and d.propose([1, 2, 1], 5) == []  # (one token is too weak a match)
    assert LookupDrafter(min_ngram=1).propose([1, 2, 1], 5) == [2, 1]
    k = DraftLength(k=4)
    k.update(4, 4)
    assert k.k == 5 and k.next(cost=2.0) == 5
    k.update(5, 1)
    k.update(2, 0)
    k.update(1, 0)
    assert k.k == 1 and k.alpha < 0.3
    assert [k.next(cost=2.0) for _ in range(16)].count(0) == 15  # below break-even: off, with a probe
    assert k.next(cost=1.0) == 1  # (a verification as cheap as a step: always worth a draft)
    with pytest.raises(ConfigError, match="not implemented yet"):
        sampling.SamplingParams(speculate="draft=bundles/x")
    with pytest.raises(ConfigError, match="speculate must be one of"):
        sampling.SamplingParams(speculate="fast")


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.999 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _two_token_histogram(model, runs: int) -> tuple[float, int]:
    """Chi-square of the first two sampled tokens (top-k 4, temperature 1) against their exact distribution, with
    a drafter that always proposes the second most likely next token (so drafts are kept and rejected often)."""
    prompt = model.tokenizer.encode_prompt("Once upon a time")
    params = model.params(len(prompt), max_new_tokens=3, temperature=1.0, top_k=4, speculate="lookup")

    class SecondBest:
        def propose(self, history, k):
            lp = model.logits(list(history))[-1]
            return [int(np.argsort(-lp)[1])][:k]

    def top4(ids):
        lp = log_softmax(model.logits(ids)[-1])
        top = np.argsort(-lp)[:4]
        p = np.exp(lp[top])
        return dict(zip(top.tolist(), (p / p.sum()).tolist()))

    expected = {(a, b): pa * pb for a, pa in top4(prompt).items() for b, pb in top4(prompt + [a]).items()}
    counts: dict[tuple[int, int], int] = {}
    drafted = 0
    for seed in range(runs):
        seq = model.new_sequence(prompt, params.with_overrides(seed=seed))
        seq.drafter = SecondBest()
        "".join(run_one(model.new_batch(1), seq))
        drafted += seq.stats.drafted_tokens
        key = tuple(seq.stats.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
    assert drafted > runs // 2 and set(counts) <= set(expected)
    chi2 = sum((counts.get(k, 0) - runs * p) ** 2 / (runs * p) for k, p in expected.items())
    return chi2, len(expected) - 1


def test_speculative_sampling_keeps_the_targets_distribution(model, monkeypatch):
    chi2, df = _two_token_histogram(model, 1500)
    assert chi2 < _chi2_critical(df), (chi2, df)
    # a wrong rule (always keep the draft) is caught by the same test
    monkeypatch.setattr(sampling, "accept_draft", lambda probs, cand, draft, rng: (True, draft))
    chi2, df = _two_token_histogram(model, 1500)
    assert chi2 > _chi2_critical(df), (chi2, df)


def test_the_server_field_flag_usage_and_metrics(llama_bundle, model):
    import httpx
    from test_serve import KEY, Server, post

    prompt = "a b c a b c a b c a b"  # (the last bigram is in the prompt: lookup drafts at once)
    plain = model.generate(prompt, max_new_tokens=24)
    s = Server(llama_bundle, "--api-key", KEY, "--speculate", "lookup")
    try:
        r = post(s, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert r.json()["choices"][0]["text"] == plain
        assert r.json()["usage"]["speculation"]["drafted_tokens"] > 0  # (the server's default applied)
        r = post(s, "/v1/completions", {"prompt": "a b a b a b a b", "max_tokens": 16, "speculate": "off"})
        assert r.status_code == 200 and "speculation" not in r.json()["usage"]
        r = post(s, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "speculate": "fast"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
        metrics = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert "edgekit_spec_drafted_tokens_total" in metrics
    finally:
        s.stop()


def test_the_cli_flag(llama_bundle, model):
    from click.testing import CliRunner

    from edgekit.cli import main

    r = CliRunner().invoke(main, ["run", str(llama_bundle), "Once upon a time", "--no-chat", "--max-new-tokens", "20",
                                  "--speculate", "lookup", "--stats"])
    assert r.exit_code == 0 and r.stdout.rstrip("\n") == model.generate("Once upon a time", max_new_tokens=20)
