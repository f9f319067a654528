"""The cached streaming decoder: one prefill then one step per token, stops, cancellation, context limits."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError, ContextLengthError

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def model(llama_bundle):
    return load(llama_bundle)


class CountingModel:
    """Wraps the model's graph runs to record how many new tokens each one gets."""

    def __init__(self, model):
        self.model, self.calls = model.graph, []
        self._orig = model.graph._run

    def __enter__(self):
        def run(slots, lo, hi, input_ids, *rest):
            self.calls.append(input_ids.shape[1])
            return self._orig(slots, lo, hi, input_ids, *rest)

        self.model._run = run
        return self

    def __exit__(self, *exc):
        del self.model._run


def test_prefill_once_then_one_token_per_step(model):
    prompt_len = len(model.tokenizer.encode_prompt(CHAT))
    with CountingModel(model) as c:
        stream = model.stream(CHAT, max_new_tokens=12, temperature=0)
        "".join(stream)
    n = stream.stats.generated_tokens
    assert c.calls[0] == prompt_len
    assert c.calls[1:] == [1] * (len(c.calls) - 1)
    assert len(c.calls) == n  # one prefill, then one run per token but the last chosen one (never fed)
    assert stream.stats.forward_passes == n and stream.stats.positions_computed == prompt_len + n - 1


def test_cached_decode_equals_full_recompute(model):
    ids = model.tokenizer.encode_prompt(CHAT)
    greedy = model.trace(ids, {"temperature": 0.0}, new_tokens=10).tokens
    seq = list(ids)
    for _ in range(10):  # no cache: re-run the whole sequence every step
        logits = model.graph.forward(seq, model.graph.new_cache(), logits_to_keep=1)[-1]
        seq.append(int(np.argmax(logits)))
    assert seq[len(ids):] == greedy


def test_stream_and_generate_agree_and_are_reproducible(model):
    kw = dict(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=50, seed=3)
    a = "".join(model.stream(CHAT, **kw))
    assert a == model.generate(CHAT, **kw)
    assert a == model.generate(CHAT, **kw)


def test_stops_on_a_stop_token_and_hides_it(model, monkeypatch):
    greedy = model.trace(model.tokenizer.encode_prompt(CHAT), {"temperature": 0.0}, new_tokens=6).tokens
    monkeypatch.setattr(model, "stop_ids", frozenset({greedy[3]}))
    stream = model.stream(CHAT, max_new_tokens=50, temperature=0)
    text = "".join(stream)
    assert stream.stats.finish_reason == "stop"
    assert stream.stats.token_ids == greedy[: greedy.index(greedy[3])]
    assert text == model.tokenizer.decode(stream.stats.token_ids).rstrip("\ufffd")  # random weights: stray bytes


def test_turn_end_token_is_a_stop_token(model):
    t = model.manifest.tokens
    assert t.turn_end_id == model.tokenizer.token_to_id("<|im_end|>")
    assert t.turn_end_id in model.stop_ids


def test_max_new_tokens_gives_length(model, monkeypatch):
    monkeypatch.setattr(model, "stop_ids", frozenset())
    stream = model.stream("Once upon a time", max_new_tokens=5, temperature=0)
    "".join(stream)
    assert stream.stats.generated_tokens == 5
    assert stream.stats.finish_reason == "length"


def test_stop_string_cuts_the_text(model):
    full = model.generate("Once upon a time", max_new_tokens=30, temperature=0)
    assert len(full) > 6
    stop = full[3:6]
    stream = model.stream("Once upon a time", max_new_tokens=30, temperature=0, stop=[stop])
    text = "".join(stream)
    assert text == full[: full.index(stop)]
    assert stream.stats.finish_reason == "stop"


def test_closing_the_stream_cancels(model):
    stream = model.stream("Once upon a time", max_new_tokens=100, temperature=0)
    with CountingModel(model) as c:
        next(stream)
        steps_before = len(c.calls)
        stream.close()
        with pytest.raises(StopIteration):
            next(stream)
        assert len(c.calls) == steps_before
    assert stream.stats.finish_reason == "cancelled"


def test_prompt_too_long_for_context(model):
    with pytest.raises(ContextLengthError, match=r"exceeds the bundle's max context of 256 tokens.*max_new_tokens <="):
        model.stream(CHAT, max_new_tokens=250)
    with pytest.raises(ContextLengthError, match="Prompt of .* tokens does not fit .* shorten the prompt by"):
        model.stream("word " * 400, max_new_tokens=1)


def test_default_length_fits_the_context(model):
    stream = model.stream("word " * 30, temperature=0)
    "".join(stream)
    assert stream.stats.prompt_tokens + stream.stats.generated_tokens <= model.max_context


def test_unknown_and_bad_options(model):
    with pytest.raises(ConfigError, match="Unknown option.*ar bundle: diffusion_steps"):
        model.stream(CHAT, diffusion_steps=8)
    with pytest.raises(ConfigError, match="temperature"):
        model.stream(CHAT, temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        model.stream(CHAT, top_p=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.stream(CHAT, max_new_tokens=0)


def test_cache_prefix_is_reused_across_turns(model):
    batch = model.new_batch(1, prefix_cache_entries=2)
    turn1 = [{"role": "user", "content": "Hello there"}]
    s1 = model.stream(turn1, max_new_tokens=8, temperature=0, batch=batch)
    answer = "".join(s1)
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    s2 = model.stream(turn2, max_new_tokens=8, temperature=0, batch=batch)
    text2 = "".join(s2)
    assert s2.stats.reused_prompt_tokens > 0
    assert text2 == model.generate(turn2, max_new_tokens=8, temperature=0)  # same answer as from scratch


def test_execution_provider_override(llama_bundle):
    from edgekit.runtimes.errors import ConfigError as CE

    cpu = ["CPUExecutionProvider"]
    assert load(llama_bundle, providers=cpu).graph.session.get_providers() == cpu
    with pytest.raises(CE, match="not available.*Available: .*CPUExecutionProvider"):
        load(llama_bundle, providers=["CUDAExecutionProviderX"])
