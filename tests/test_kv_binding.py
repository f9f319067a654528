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


FLAVOURS = {  # bundle kind / flavour -> export options (tiny Llama)
    "ar-cpu": {}, "ar-cpu-int4": {"precision": "int4"}, "ar-cuda-int4": {"precision": "int4", "target": "cuda"},
    "ar-tensorrt": {"target": "tensorrt"}, "ar-tensorrt-int4": {"precision": "int4", "target": "tensorrt"},
    "block-diffusion": {"block": True}, "block-diffusion-tensorrt": {"block": True, "target": "tensorrt"},
}


@pytest.fixture(scope="module")
def flavour_bundle(tiny_model, tmp_path_factory):
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent
    from tiny_models import make_model

    made = {}

    def get(name):
        if name not in made:
            opts = dict(FLAVOURS[name])
            root = tmp_path_factory.mktemp(name)
            src = tiny_model()
            if opts.pop("block", False):
                from transformers import AutoTokenizer

                src = make_model("LlamaForCausalLM", root / "src", block_diffusion_length=4)
                tok = AutoTokenizer.from_pretrained(src)
                tok.mask_token = "<|endoftext|>"
                tok.save_pretrained(src)
            made[name] = export_bundle(ExportConfig(source=str(src), output=root / "b", **opts), progress=Silent()).path
        return made[name]

    return get


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_device_buffers_as_ortvalues_give_the_numpy_paths_tokens(flavour_bundle, name):
    """The GPU's KV code path (OrtValues bound by pointer, allocated at max length, zero-filled) run on the CPU
    device: every bundle kind and flavour gives the numpy path's tokens, single stream and batched. (Copying-layout
    graphs, the tensorrt flavour and block attention, got no past inputs at all on that path: their buffers were
    OrtValues that the copying path cannot read; they keep host buffers now.) Full-bidirectional dLLMs hold no KV
    slots."""
    path = flavour_bundle(name)
    host, device = load(path), load(path, device_buffers=True)
    slots = device.graph.new_slots(2)
    assert slots.ortvalues == device.graph.layout.shared_buffer  # copying layouts keep host buffers
    if slots.ortvalues:
        assert slots.length == device.max_context and not slots.arrays
        assert all(not v.numpy().any() for v in slots._device_values)  # zero-filled, not uninitialised
    block = {"gen_length": 8} if "block" in name else {}
    opts = [dict(SETTINGS[0], **block), dict(SETTINGS[1], **block) if not block else dict(block, temperature=0.7,
                                                                                          seed=3)]
    for o in opts:
        assert host.generate(PROMPTS[0], **{"max_new_tokens": 12, **o}) == device.generate(
            PROMPTS[0], **{"max_new_tokens": 12, **o})
    if not block:
        settings = [SETTINGS[i % 2] for i in range(len(PROMPTS))]
        assert _batched(device, PROMPTS, settings)[0] == _batched(host, PROMPTS, settings)[0]
