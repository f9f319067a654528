"""The device-resident KV cache: rows of one max-length buffer bound as both past and present (IO binding), against
the copying loop older bundles run (the graph's past fed as arrays, the presents taken back every token)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import ARCHS
from edgekit.runtimes import load

PROMPTS = ["Hello there, how are you?", "Why is the sky blue? Rayleigh", "def reverse(s):", "请用一句话介绍"]
SETTINGS = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=3)]


def _copying(model):
    """The same bundle run through the copying path (what every bundle did before shared buffers)."""
    twin = load(model.path)
    twin.graph.layout = replace(twin.graph.layout, shared_buffer=False)
    return twin


def _batched(model, prompts, settings, prefix_entries=0, batch=None):
    """Run ``prompts`` together on one batch (joining one by one, leaving as they finish); return their tokens."""
    batch = batch or model.new_batch(len(prompts), prefix_cache_entries=prefix_entries)
    seqs = []
    for text, opts in zip(prompts, settings):
        ids = model.tokenizer.encode(text)
        seq = model.new_sequence(ids, model.params(len(ids), max_new_tokens=24, **opts))
        batch.admit(seq)
        batch.step()  # the others advance while this one joins
        seqs.append(seq)
    while batch.active:
        batch.step()
    return [list(s.stats.token_ids) for s in seqs], batch


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_buffers_give_the_copying_loops_tokens(tiny_bundle, arch):
    model = load(tiny_bundle(arch))
    assert model.graph.layout.shared_buffer
    old = _copying(model)
    for opts in SETTINGS:  # single stream
        for text in PROMPTS[:2]:
            a = model.generate(text, max_new_tokens=24, **opts)
            assert a == old.generate(text, max_new_tokens=24, **opts)
    settings = [SETTINGS[i % 2] for i in range(len(PROMPTS))]
    assert _batched(model, PROMPTS, settings)[0] == _batched(old, PROMPTS, settings)[0]


def test_prefix_reuse_takes_the_row_over_without_copying(llama_bundle):
    model = load(llama_bundle)
    old = _copying(model)
    first = PROMPTS[1]
    toks, batch = _batched(model, [first], [SETTINGS[0]], prefix_entries=2)
    assert len(batch.prefix) == 1
    kept_slot = next(iter(batch.prefix.held()))
    second = first + " and why are sunsets red?"
    toks2, _ = _batched(model, [second], [SETTINGS[0]], batch=batch)
    assert batch.slots.capacity == 3 and kept_slot in batch.prefix.held()  # the same row, now holding turn two
    want, _ = _batched(old, [second], [SETTINGS[0]])
    assert toks2 == want


def test_buffers_grow_past_their_first_allocation(llama_bundle, monkeypatch):
    """A sequence longer than the first allocation: the buffer doubles (valid rows copied once), logits unchanged."""
    from edgekit.runtimes import kv_cache

    monkeypatch.setattr(kv_cache, "INITIAL_LENGTH", 32)
    model = load(llama_bundle)
    ids = (model.tokenizer.encode("Once upon a time, in a small village by the sea") * 40)[:40]
    cache = model.graph.new_cache()
    assert cache.slots.length == 32
    model.graph.forward(ids, cache)
    got = [model.graph.forward([t], cache)[-1] for t in ids[:30]]
    assert cache.slots.length == 128
    ref = _copying(model)
    rc = ref.graph.new_cache()
    ref.graph.forward(ids, rc)
    want = [ref.graph.forward([t], rc)[-1] for t in ids[:30]]
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) == 0.0


def test_growing_the_buffer_keeps_every_rows_contents(llama_bundle, monkeypatch):
    """A long prompt joining a batch doubles the shared buffer: the rows of the sequences already decoding (and of
    finished ones kept for prefix reuse) keep their contents, so their tokens are those of a run alone."""
    from edgekit.runtimes import kv_cache

    monkeypatch.setattr(kv_cache, "INITIAL_LENGTH", 16)
    model = load(llama_bundle)
    long = " ".join(PROMPTS) * 2
    chat = lambda t: [{"role": "user", "content": t}]  # noqa: E731

    def run(texts):
        batch = model.new_batch(len(texts))
        seqs = []
        for text in texts:  # (together: the second one's prefill grows the buffer under the first)
            ids = model.tokenizer.encode_prompt(chat(text))
            seqs.append(model.new_sequence(ids, model.params(len(ids), max_new_tokens=12, temperature=0.0)))
            batch.admit(seqs[-1])
            batch.step()
        while batch.active:
            batch.step()
        return [list(s.stats.token_ids) for s in seqs], batch

    alone = [run([t])[0][0] for t in (PROMPTS[0], long)]
    together, batch = run([PROMPTS[0], long])
    assert batch.slots.length > 16
    assert together == alone
