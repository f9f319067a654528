"""Block-diffusion dLLMs: an AR-family checkpoint flagged with ``block_diffusion_length`` exports to a bundle whose
attention is bidirectional inside blocks and causal across them; the runtime decodes it a block at a time on the AR
decoder's KV cache, and the cache is exact (cached and recomputed decoding give the same tokens)."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.runtimes import load
from edgekit.runtimes.blocks import BlockBatch, BlockDiffusionModel
from edgekit.runtimes.errors import ConfigError
from tiny_models import make_model

BLOCK = 4
PROMPTS = ["Hello there, how are you?", "def reverse(s):", "请用一句话介绍"]
RULES = [dict(remasking="low_confidence"), dict(threshold=0.2), dict(entropy_bound=2.0),
         dict(temperature=0.8, top_p=0.9, seed=3)]


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = make_model("LlamaForCausalLM", tmp_path_factory.mktemp("bd") / "llama", block_diffusion_length=BLOCK)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.mask_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def block_bundle(block_model, tmp_path_factory):
    from edgekit.parity import verifier

    out = tmp_path_factory.mktemp("bdb") / "b"
    export_bundle(ExportConfig(source=str(block_model), output=out), progress=Silent(), verify=verifier(16))
    return out


def test_fp32_parity_passes_the_runtime_sampler_on_pytorch_and_onnx_logits(block_bundle):
    """Parity runs the runtime's own block loop over PyTorch's logits (block-causal mask, recomputed each step) and
    over the bundle's cached graph: per-step logits within fp32's tolerance and identical tokens, for each rule."""
    from edgekit.verify import verify

    report = load(block_bundle).manifest.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["tokens_identical"] == 1.0 and report["summary"]["max_abs_diff"] <= 1e-3
    assert {r["setting"] for r in report["rows"]} == {"low_confidence", "threshold_0.9", "entropy_bound_0.5"}
    assert verify(block_bundle).passed  # and torch-free, against the stored reference


def test_a_flagged_checkpoint_exports_as_a_block_diffusion_bundle(block_bundle):
    model = load(block_bundle)
    assert isinstance(model, BlockDiffusionModel) and model.manifest.kind == "block_diffusion"
    assert model.block == BLOCK and model.manifest.tokens.mask_id == model.mask_id
    assert not model.graph.layout.shared_buffer  # (block attention copies the KV: past ++ new)
    text = model.generate("Hello", max_new_tokens=8)
    assert isinstance(text, str)


@pytest.mark.parametrize("rule", RULES)
def test_cached_block_decoding_is_token_identical_to_recomputing(block_bundle, rule):
    model = load(block_bundle)
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        options = dict(gen_length=12, diffusion_steps=12, **rule)
        cached = model.trace(ids, options, cached=True)
        fresh = model.trace(ids, options, cached=False)
        assert cached.tokens == fresh.tokens
        assert len(cached.steps) == len(fresh.steps)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(cached.steps, fresh.steps))
        assert worst < 1e-4, worst


def test_block_logits_match_pytorch_with_the_block_causal_mask(block_model, block_bundle):
    """The graph's attention is the model's: PyTorch with an explicit block-causal 4-D mask gives the same logits
    for a prompt whose last block is partly masked."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(block_model, torch_dtype=torch.float32).eval()
    model = load(block_bundle)
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        ids = ids + [model.mask_id] * (-len(ids) % BLOCK + BLOCK)  # fill the last block, then one more of masks
        n = len(ids)
        pos = np.arange(n)
        allowed = (pos[None, :] // BLOCK) <= (pos[:, None] // BLOCK)
        mask = torch.where(torch.from_numpy(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            want = hf(torch.tensor([ids]), attention_mask=mask).logits[0].numpy()
        got = model.graph.forward(ids, model.graph.new_cache(), logits_to_keep=n)
        assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()


def test_block_length_must_be_the_trained_one(block_bundle):
    model = load(block_bundle)
    with pytest.raises(ConfigError, match=r"does not match this block-diffusion bundle's trained block length\(s\) 4"):
        model.generate("Hello", block_length=8)
    with pytest.raises(Exception, match="cache"):
        model.generate("Hello", cache="prefix")  # the cache is exact: no approximation setting applies


def test_the_cache_saves_the_recomputation(block_bundle):
    model = load(block_bundle)
    ids = model.tokenizer.encode(PROMPTS[0])
    work = {}
    for cached in (True, False):
        seq = model.new_sequence(ids, model.params(len(ids), gen_length=16, diffusion_steps=16))
        batch = BlockBatch(model, 1, cached=cached)
        batch.admit(seq)
        while batch.active:
            batch.step()
        assert seq.stats.generated_tokens == 16 or seq.stats.finish_reason == "stop"
        work[cached] = seq.stats.positions_computed
    # cached: each step runs one block (plus the fused commit); recomputing runs the whole prefix every step
    assert work[True] < 0.5 * work[False], work


def test_the_server_streams_block_diffusion_per_block_and_paces_it(block_bundle):
    import httpx
    from test_serve import Server

    server = Server(block_bundle)
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "stream": True,
                "max_tokens": 12, "diffusion_steps": 6, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "block_length": 8}, timeout=60)
        assert r.status_code == 400 and "trained block length(s) 4" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "cache": "dual"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache"
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "repetition_penalty": 1.2}, timeout=60)
        assert r.status_code == 400  # an AR-only field on a diffusion bundle
    finally:
        server.stop()


def test_the_quality_report_compares_like_with_like(block_bundle):
    """The report's reference runs PyTorch with the same block-causal mask: the fp32 bundle agrees everywhere."""
    q = load(block_bundle).manifest.extra["quality"]
    assert q["top1"] == 1.0 and q["kl"] < 1e-6, q


@pytest.mark.parametrize("precision", ["int8", "int4", "fp16"])
def test_quantized_block_diffusion_bundles_run_exactly_cached(block_model, tmp_path, precision):
    res = export_bundle(ExportConfig(source=str(block_model), output=tmp_path / "q", precision=precision,
                                     algo=None if precision == "fp16" else "rtn"), progress=Silent())
    assert res.manifest.kind == "block_diffusion"
    if precision == "fp16":
        assert res.manifest.kv_cache.dtype == "float16" and res.manifest.extra["quality"]["top1"] > 0.95
    else:
        assert res.manifest.quantization.bits == int(precision[3:])
        assert res.manifest.extra["quality"]["top1"] > 0.3  # (random tiny weights; chance is 1/400)
    model = load(res.path)
    ids = model.tokenizer.encode(PROMPTS[0])
    options = dict(gen_length=8, diffusion_steps=8)
    assert model.trace(ids, options, cached=True).tokens == model.trace(ids, options, cached=False).tokens


@pytest.mark.parametrize("rule", RULES[:2] + RULES[3:])
def test_a_batch_of_block_sequences_decodes_as_each_alone(block_bundle, rule):
    """Rows of different lengths, joining one by one, some committing while others denoise: the same tokens."""
    model = load(block_bundle)
    options = dict(gen_length=12, diffusion_steps=12, **rule)
    alone = [model.trace(model.tokenizer.encode(t), options).tokens for t in PROMPTS]
    batch = model.new_batch(len(PROMPTS))
    seqs = []
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        seqs.append(model.new_sequence(ids, model.params(len(ids), **options)))
        batch.admit(seqs[-1])
        batch.step()
    while batch.active:
        batch.step()
    assert [list(s.stats.token_ids) for s in seqs] == alone
    assert all(s.stats.blocks >= 3 for s in seqs)


def test_one_bundle_serves_each_trained_block_length(tmp_path):
    """Trained with blocks of 4 and 8, the bundle takes either per request (the block length is a graph input);
    a batch mixing them gives each sequence's tokens as alone, and 8 matches PyTorch's block-8 mask."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.export.reference import block_causal_mask

    folder = make_model("LlamaForCausalLM", tmp_path / "m", block_diffusion_length=4, block_diffusion_lengths=[4, 8])
    tok = AutoTokenizer.from_pretrained(folder)
    tok.mask_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    model = load(export_bundle(ExportConfig(source=str(folder), output=tmp_path / "b"), progress=Silent()).path)
    assert model.trained_blocks == (4, 8)
    ids = [model.tokenizer.encode(t) for t in PROMPTS[:2]]
    options = [dict(gen_length=16, diffusion_steps=16, block_length=b) for b in (4, 8)]
    alone = [model.trace(i, o).tokens for i, o in zip(ids, options)]
    assert model.trace(ids[1], options[1], cached=False).tokens == alone[1]
    batch = model.new_batch(2)
    seqs = [model.new_sequence(i, model.params(len(i), **o)) for i, o in zip(ids, options)]
    for s in seqs:
        batch.admit(s)
    while batch.active:
        batch.step()
    assert [list(s.stats.token_ids) for s in seqs] == alone
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    x = ids[0] + [model.mask_id] * (-len(ids[0]) % 8 + 8)
    with torch.no_grad():
        want = hf(torch.tensor([x]), attention_mask=block_causal_mask(len(x), 8)).logits[0].numpy()
    got = model.graph.forward(x, model.graph.new_cache(), logits_to_keep=len(x),
                        feeds={"block_length": np.asarray([8], np.int64)})
    assert np.abs(got - want).max() < 1e-3
    with pytest.raises(ConfigError, match="trained block length"):
        model.params(5, block_length=16)


def test_the_tensorrt_flavour_of_a_block_model_is_plain_and_exact(block_model, tmp_path):
    import onnx

    from edgekit.export import tensorrt

    res = export_bundle(ExportConfig(source=str(block_model), output=tmp_path / "t", target="tensorrt"),
                        progress=Silent())
    assert tensorrt.problems(onnx.load(str(res.path / "model.onnx"), load_external_data=False)) == []
    assert res.manifest.extra["quality"]["top1"] == 1.0  # the same attention as PyTorch's block-causal mask
    model = load(res.path)
    ids = model.tokenizer.encode(PROMPTS[1])
    options = dict(gen_length=8, diffusion_steps=8)
    assert model.trace(ids, options, cached=True).tokens == model.trace(ids, options, cached=False).tokens


def test_a_token_shift_model_predicts_each_token_one_position_earlier(tmp_path):
    """AR-adapted block models (Fast-dLLM v2, config block_diffusion_token_shift) predict token i at position i - 1:
    a block's first token from the previous block's last position, kept from the commit forward. Per step the block
    logits equal PyTorch's under the block-causal mask one position earlier; cached decoding (prompts ending inside a
    block and on its boundary, alone and batched) gives the recomputed tokens; parity passes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.export.reference import block_causal_mask
    from edgekit.parity import verifier

    folder = make_model("LlamaForCausalLM", tmp_path / "m", block_diffusion_length=BLOCK,
                        block_diffusion_token_shift=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.mask_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    res = export_bundle(ExportConfig(source=str(folder), output=tmp_path / "b"), progress=Silent(),
                        verify=verifier(12))
    assert res.manifest.parity["passed"], res.manifest.parity["misses"]
    model = load(res.path)
    assert model.token_shift
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = model.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[1])
    whole = (len(ids) // BLOCK - 1) * BLOCK
    prompts = [ids[:whole + 2], ids[:whole], ids[:3]]  # ending inside a block, on a boundary, in the first block
    assert whole >= BLOCK
    options = dict(gen_length=12, diffusion_steps=12)
    for ids in prompts:
        trace = model.trace(ids, options)
        assert trace.tokens == model.trace(ids, options, cached=False).tokens
        lo = len(ids) // BLOCK * BLOCK + BLOCK  # the second block: its first row comes from the commit forward
        x = (ids + trace.tokens)[:lo] + [model.mask_id] * BLOCK
        with torch.no_grad():
            want = hf(torch.tensor([x]), attention_mask=block_causal_mask(len(x), BLOCK)).logits[0].numpy()
        got = trace.steps[lo - len(ids)]  # one token per step: the first block took lo - len(ids) steps
        assert np.abs(got - want[lo - 1:lo + BLOCK - 1]).max() < 1e-3
    batch = model.new_batch(len(prompts))
    seqs = [model.new_sequence(i, model.params(len(i), **options)) for i in prompts]
    for s in seqs:
        batch.admit(s)
        batch.step()
    while batch.active:
        batch.step()
    assert [list(s.stats.token_ids) for s in seqs] == [model.trace(i, options).tokens for i in prompts]


def test_the_quality_command_runs_on_a_block_diffusion_bundle(block_model, block_bundle):
    """`edgekit quality` compares under the bundle's own attention (block-causal), as the export's report does."""
    from click.testing import CliRunner

    from edgekit.cli import main

    r = CliRunner().invoke(main, ["quality", str(block_bundle), "--reference", str(block_model)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "top-1 agreement" in r.output and "100.00%" in r.output, r.output
