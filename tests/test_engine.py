"""Continuous batching: concurrent requests give exactly the single-stream results; cancel, queue, prefix, timeout."""

from __future__ import annotations

import threading

import pytest

from edgekit.runtimes import load
from edgekit.runtimes.engine import Engine, Request
from edgekit.runtimes.errors import QueueFullError

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog and then", "你好", "def reverse(s):",
           "Why is the sky blue? Because", "Summer 🌞", "1 2 3 4 5 6", "café"]


@pytest.fixture(scope="module")
def model(llama_bundle):
    return load(llama_bundle)


def run_all(engine, model, prompts, **opts):
    done, results = threading.Event(), {}

    def make(i):
        parts = []

        def on_event(ev):
            if ev.type == "token":
                parts.append(ev.text)
            else:
                results[i] = ("".join(parts), ev)
                if len(results) == len(prompts):
                    done.set()

        return on_event

    reqs = []
    for i, p in enumerate(prompts):
        ids = model.tokenizer.encode_prompt(p)
        reqs.append(Request(ids, model.params(len(ids), **opts), make(i)))
    for r in reqs:
        engine.submit(r)
    assert done.wait(60)
    return results, reqs


@pytest.mark.parametrize("opts", [dict(max_new_tokens=24, temperature=0),
                                  dict(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=5)])
def test_batched_results_equal_single_stream(model, opts):
    engine = Engine(model, max_batch=4).start()
    try:
        results, _ = run_all(engine, model, PROMPTS, **opts)
    finally:
        engine.stop()
    for i, p in enumerate(PROMPTS):
        text, ev = results[i]
        assert ev.type == "done" and ev.finish_reason in ("stop", "length")
        assert text == model.generate(p, **opts), p


def test_queue_full_is_refused(model):
    engine = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    ids = model.tokenizer.encode_prompt("hi")
    for _ in range(2):
        engine.submit(Request(ids, model.params(len(ids)), lambda ev: None))
    with pytest.raises(QueueFullError, match="queue is full \\(2 requests\\).*--max-queue"):
        engine.submit(Request(ids, model.params(len(ids)), lambda ev: None))


def test_cancel_frees_the_slot(model, monkeypatch):
    monkeypatch.setattr(model, "stop_ids", frozenset())
    engine = Engine(model, max_batch=2)
    events = []
    ids = model.tokenizer.encode_prompt("Once upon a time")
    req = Request(ids, model.params(len(ids), max_new_tokens=100), events.append)
    engine.submit(req)
    engine.step()
    engine.step()
    assert engine.running == 1
    tokens_before = sum(e.type == "token" for e in events)
    assert tokens_before == 3  # step 1: prefill + first decode; step 2: one more
    engine.cancel(req)
    engine.step()
    assert engine.running == 0
    assert events[-1].type == "done" and events[-1].finish_reason == "cancelled"
    assert sum(e.type == "token" for e in events) == tokens_before


def test_timeout_ends_a_request(model, monkeypatch):
    monkeypatch.setattr(model, "stop_ids", frozenset())
    engine = Engine(model, max_batch=2)
    events = []
    ids = model.tokenizer.encode_prompt("Once upon a time")
    engine.submit(Request(ids, model.params(len(ids), max_new_tokens=100), events.append, timeout_s=0.0))
    engine.step()  # expired while waiting
    assert events[-1].type == "done" and events[-1].finish_reason == "timeout"
    assert engine.running == 0 and engine.waiting == 0


def test_prefix_of_a_previous_turn_is_reused(model):
    engine = Engine(model, max_batch=2).start()
    try:
        turn1 = [{"role": "user", "content": "Hello there"}]
        first, _ = run_all(engine, model, [turn1], max_new_tokens=8, temperature=0)
        turn2 = turn1 + [{"role": "assistant", "content": first[0][0]}, {"role": "user", "content": "More?"}]
        results, _ = run_all(engine, model, [turn2], max_new_tokens=8, temperature=0)
    finally:
        engine.stop()
    text, ev = results[0]
    # at least the whole first prompt (random weights may emit non-canonical BPE that re-tokenizes differently)
    assert ev.stats.reused_prompt_tokens >= len(model.tokenizer.encode_prompt(turn1))
    assert text == model.generate(turn2, max_new_tokens=8, temperature=0)
