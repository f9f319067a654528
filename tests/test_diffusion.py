"""Diffusion bundles (BERT-family masked LMs run as dLLMs): export, torch-free denoiser, parity, bad input."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier
from edgekit.runtimes import load
from edgekit.runtimes.diffusion_params import DiffusionParams
from edgekit.runtimes.errors import ConfigError, ContextLengthError, UnsupportedModelError
from edgekit.runtimes.unmasking import select, transfer_schedule
from tiny_models import make_mlm

MLMS = ["ModernBertForMaskedLM", "BertForMaskedLM", "RobertaForMaskedLM", "DistilBertForMaskedLM"]


@pytest.fixture(scope="module")
def mlm_bundle(tmp_path_factory):
    cache = {}

    def get(arch: str = "BertForMaskedLM"):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            src = make_mlm(arch, root / "src")
            res = export_bundle(ExportConfig(source=str(src), output=root / "b"), verify=verifier(),
                                progress=Silent())
            cache[arch] = (src, res)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", MLMS)
def test_mlm_exports_and_matches_the_reference_sampler(mlm_bundle, arch):
    _, res = mlm_bundle(arch)
    m = res.manifest
    assert m.kind == "diffusion" and m.tokens.mask_id is not None and m.kv_cache is None
    report = m.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["tokens_identical"] == 1.0 and report["summary"]["max_abs_diff"] <= 1e-3
    assert {r["setting"] for r in report["rows"]} >= {"low_confidence", "threshold_0.9", "random_seed3",
                                                     "sampled_T0.7", "margin", "entropy"}


def test_block_streaming_stats_and_parallel_unmasking(mlm_bundle):
    model = load(mlm_bundle()[1].path)
    stream = model.stream("Once upon a time", gen_length=32, block_length=8, diffusion_steps=32)
    pieces = list(stream)
    st = stream.stats
    assert st.blocks == 4 and st.forward_passes == 32 and st.generated_tokens == 32
    assert len(pieces) <= 4 and st.first_block_s > 0 and st.latency_s >= st.first_block_s
    fewer = model.stream("Once upon a time", gen_length=32, block_length=8, diffusion_steps=8)
    "".join(fewer)
    assert fewer.stats.forward_passes == 8 and fewer.stats.tokens_per_forward == 4.0
    parallel = model.stream("Once upon a time", gen_length=32, block_length=8, diffusion_steps=32, threshold=1e-6)
    "".join(parallel)
    assert parallel.stats.forward_passes == 4  # everything clears the threshold: one pass per block


def test_seeded_sampling_is_reproducible(mlm_bundle):
    model = load(mlm_bundle()[1].path)
    kw = dict(gen_length=16, block_length=8, diffusion_steps=16, temperature=0.8, remasking="random", seed=11)
    a = model.stream("Hello", **kw)
    "".join(a)
    b = model.stream("Hello", **kw)
    "".join(b)
    assert a.stats.token_ids == b.stats.token_ids
    c = model.stream("Hello", **{**kw, "seed": 12})
    "".join(c)
    assert c.stats.token_ids != a.stats.token_ids


def test_stop_token_ends_after_its_block_and_close_cancels(mlm_bundle, monkeypatch):
    model = load(mlm_bundle()[1].path)
    first = model.stream("Hello", gen_length=32, block_length=8, diffusion_steps=32)
    "".join(first)
    stop = first.stats.token_ids[2]
    monkeypatch.setattr(model, "stop_ids", frozenset({stop}))
    s = model.stream("Hello", gen_length=32, block_length=8, diffusion_steps=32)
    "".join(s)
    assert s.stats.finish_reason == "stop" and s.stats.blocks == 1
    assert s.stats.token_ids == first.stats.token_ids[: first.stats.token_ids.index(stop)]
    monkeypatch.setattr(model, "stop_ids", frozenset())
    c = model.stream("Hello", gen_length=32, block_length=8, diffusion_steps=32)
    next(c)
    passes = c.stats.forward_passes
    c.close()
    assert c.stats.finish_reason == "cancelled" and passes == 8


@pytest.mark.parametrize("kw, message", [
    (dict(diffusion_steps=0), "diffusion_steps must be an integer >= 1"),
    (dict(diffusion_steps=100, gen_length=64), "diffusion_steps must be between 1 and gen_length"),
    (dict(gen_length=64, block_length=24), "block_length must divide gen_length"),
    (dict(gen_length=64, block_length=16, diffusion_steps=6), "must be a multiple of the number of blocks"),
    (dict(threshold=0), "threshold must be in \\(0, 1\\]"),
    (dict(threshold=1.5), "threshold must be in"),
    (dict(remasking="lowest"), "remasking must be one of"),
    (dict(cache="kv"), "cache must be one of none, prefix, dual"),
    (dict(entropy_bound=-1), "entropy_bound must be a number"),
    (dict(entropy_bound=0.5, threshold=0.9), "set only one"),
    (dict(position_decay=-0.1), "position_decay must be a number in \\[0, 10\\]"),
    (dict(position_decay=True), "position_decay must be a number"),
])
def test_bad_diffusion_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionParams(**kw)


def test_bad_options_on_a_bundle(mlm_bundle):
    model = load(mlm_bundle()[1].path)
    with pytest.raises(ConfigError, match="Unknown option.*repetition_penalty"):
        model.stream("Hi", repetition_penalty=1.2)
    short = model.stream("Hi", max_new_tokens=8)  # one interface: max_new_tokens is gen_length here
    "".join(short)
    assert short.stats.generated_tokens <= 8 and short.stats.forward_passes == 8
    with pytest.raises(ContextLengthError, match="gen_length"):
        model.stream("Hi", gen_length=512, block_length=512, diffusion_steps=512)


def test_entropy_bound_commits_the_longest_prefix_within_the_bound():
    sure, coin, die = [20.0, 0, 0, 0], [5.0, 5.0, -30, -30], [1.0, 1.0, 1.0, 1.0]  # entropies ~0, ln 2, ln 4
    logits = np.array([coin, sure, die, sure, coin])
    rng = np.random.default_rng(0)
    pick = lambda bound: select(logits, 1, DiffusionParams(entropy_bound=bound), rng)[1].tolist()  # noqa: E731
    # ranked: the two certain positions, the coins, the die; the bound is on the entropy sum minus its largest term
    assert pick(1e-3) == [0, 1, 3]  # certain, certain, one coin: ~0 + ~0 + ln 2 - ln 2
    assert pick(0.5) == [0, 1, 3]  # the second coin would make it ln 2 > 0.5
    assert pick(0.75) == [0, 1, 3, 4]
    assert pick(1.2) == [0, 1, 3, 4]  # the die: 2 ln 2 + ln 4 - ln 4 = 1.39 > 1.2
    assert pick(1.5) == [0, 1, 2, 3, 4]
    one = np.array([die])  # nothing fits a zero bound beyond the first: at least one is committed
    assert select(one, 1, DiffusionParams(entropy_bound=0.0), rng)[1].tolist() == [0]


def test_position_decay_ranks_earlier_positions_first():
    """Two near-coin positions, the later slightly more confident, and a certain one further on: without the decay
    the later coin goes first; with it the earlier does (PC-Sampler's positional prior), for any rule's score sign."""
    coin, bolder, sure = [0.1, 0.0, -30, -30], [0.3, 0.0, -30, -30], [20.0, 0, 0, 0]
    logits, offsets = np.array([coin, bolder, sure]), np.array([2, 3, 7])
    rng = np.random.default_rng(0)
    pick = lambda **kw: select(logits, 1, DiffusionParams(**kw), rng, offsets)[1].tolist()  # noqa: E731
    assert pick(entropy_bound=0.5) == [1, 2]  # sure, bolder coin; the second coin would exceed the bound
    assert pick(entropy_bound=0.5, position_decay=1.0) == [0]  # the earlier coin first; the rest wait a step
    assert pick(threshold=0.9) == [2] and pick(threshold=0.99, position_decay=1.0) == [2]
    assert select(logits[:2], 1, DiffusionParams(), rng, offsets[:2])[1].tolist() == [1]
    assert select(logits[:2], 1, DiffusionParams(position_decay=0.5), rng, offsets[:2])[1].tolist() == [0]
    for rule in ("margin", "entropy"):  # (the entropy score is negative: the decay still ranks the later one lower)
        assert select(logits[:2], 1, DiffusionParams(remasking=rule, position_decay=2.0), rng,
                      offsets[:2])[1].tolist() == [0]
        assert select(logits[:2], 1, DiffusionParams(remasking=rule), rng, offsets[:2])[1].tolist() == [1]


def test_schedule_spreads_tokens_evenly():
    assert transfer_schedule(8, 3) == [3, 3, 2] and sum(transfer_schedule(32, 7)) == 32


def test_mlm_without_mask_token_is_refused(tmp_path):
    from transformers import AutoTokenizer

    src = make_mlm("BertForMaskedLM", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(src)
    tok.mask_token = None
    tok.save_pretrained(src)
    with pytest.raises(UnsupportedModelError, match="no mask token"):
        export_bundle(ExportConfig(source=str(src), output=tmp_path / "b"), progress=Silent())
    assert not (tmp_path / "b").exists()


def test_cli_run_and_parity_on_a_diffusion_bundle(mlm_bundle):
    src, res = mlm_bundle()
    r = CliRunner().invoke(main, ["run", str(res.path), "Hi", "--gen-length", "16", "--block-length", "8",
                                  "--diffusion-steps", "8", "--threshold", "0.9", "--stats"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "blocks" in r.output and "tokens/forward" in r.output
    r = CliRunner().invoke(main, ["run", str(res.path), "Hi", "--gen-length", "16", "--block-length", "8",
                                  "--diffusion-steps", "16", "--entropy-bound", "0.5", "--cache", "dual", "--stats"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "positions computed" in r.output
    r = CliRunner().invoke(main, ["parity", str(res.path), "--reference", str(src)], catch_exceptions=False)
    assert r.exit_code == 0 and "PASSED" in r.output
    r = CliRunner().invoke(main, ["info", str(res.path)], catch_exceptions=False)  # the same report shape as AR's
    assert r.exit_code == 0 and "PASSED (fp32 tolerance)" in r.output and "tokens identical 100%" in r.output
    assert "3 prompts x 7 settings" in r.output and "None" not in r.output.split("parity")[-1]
    r = CliRunner().invoke(main, ["verify", str(res.path)], catch_exceptions=False)  # the stored reference, no torch
    assert r.exit_code == 0 and "PASSED" in r.output and r.output.count("✓") == 21, r.output
    r = CliRunner().invoke(main, ["run", str(res.path), "Hi", "--diffusion-steps", "0"])
    assert r.exit_code == 2 and "diffusion_steps must be" in r.output


def test_denoiser_runs_without_torch(mlm_bundle):
    script = (
        "import sys\n"
        "for n in ('torch', 'transformers', 'optimum', 'onnx'): sys.modules[n] = None\n"
        "import edgekit.runtimes as rt\n"
        "m = rt.load(sys.argv[1])\n"
        "s = m.stream('Hi', gen_length=16, block_length=8, diffusion_steps=8, threshold=0.9)\n"
        "print('OK', len(list(s)), s.stats.forward_passes)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(mlm_bundle()[1].path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")


LLADA_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tiny_models import make_llada
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier
from edgekit.runtimes import load
from edgekit.runtimes.errors import UnsupportedModelError
root = Path(sys.argv[2])
src = make_llada(root / "llada")
try:
    export_bundle(ExportConfig(source=str(src), output=root / "x"), progress=Silent())
    refused = ""
except UnsupportedModelError as e:
    refused = str(e)
res = export_bundle(ExportConfig(source=str(src), output=root / "b", trust_remote_code=True), verify=verifier(),
                    progress=Silent())
model = load(res.path)
stream = model.stream("Hello", gen_length=16, block_length=8, diffusion_steps=16, threshold=0.5)
"".join(stream)
import numpy as np
x = (np.arange(30) % 50 + 7).astype(np.int64)
full, kv = model.encode(x)
keep = np.r_[0:12, 20:30]
got = model.forward_cached(x[12:20], np.arange(12, 20), keep, [t[:, :, keep] for t in kv])
print(json.dumps({"cache_diff": float(np.abs(got - full[12:20]).max()), "modes": list(model.cache_modes),
                  "refused": refused, "x_exists": (root / "x").exists(), "arch": res.manifest.architecture,
                  "kind": res.manifest.kind, "parity": res.manifest.parity, "blocks": stream.stats.blocks}))
"""


def test_llada_style_remote_code_model(tmp_path):
    """Run in a fresh process: remote code is imported dynamically, and torch.onnx's dynamo export of it was seen
    to depend on what earlier tests had exported in the same process."""
    import json
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", LLADA_SCRIPT, str(Path(__file__).parent), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "--trust-remote-code" in r["refused"] and not r["x_exists"]
    assert r["arch"] == "LLaDAModelLM" and r["kind"] == "diffusion"
    assert r["parity"]["passed"], r["parity"]["misses"]
    assert r["parity"]["summary"]["tokens_identical"] == 1.0
    assert r["blocks"] == 2
    assert r["modes"] == ["none", "prefix", "dual"] and r["cache_diff"] < 1e-4


@pytest.mark.parametrize("arch", ["ModernBertForMaskedLM", "RobertaForMaskedLM"])
def test_cached_graphs_reproduce_the_full_forward_with_a_fresh_cache(mlm_bundle, arch):
    """With keys/values from the same sequence, the block graph must give the full graph's logits (prefix and dual
    layouts). ModernBERT's tiny config has a 16-token local window, so the sliding mask is exercised; RoBERTa's
    positions start at padding_idx + 1."""
    model = load(mlm_bundle(arch)[1].path)
    assert model.cache_modes == ("none", "prefix", "dual")
    x = (np.arange(40) % 50 + 7).astype(np.int64)
    full, kv = model.encode(x)
    assert np.abs(full - model.full(x)).max() < 1e-4
    lo, hi = 17, 25
    for keep, end in ((np.arange(lo), 40), (np.r_[0:lo, hi:40], hi)):
        got = model.forward_cached(x[lo:end], np.arange(lo, end), keep, [t[:, :, keep] for t in kv])
        assert got.shape == (end - lo, full.shape[1])
        assert np.abs(got - full[lo:end]).max() < 1e-4


def test_cache_modes_do_less_work_and_are_reported(mlm_bundle):
    src, res = mlm_bundle("ModernBertForMaskedLM")
    model = load(res.path)
    runs = {}
    for mode in ("none", "prefix", "dual"):
        s = model.stream("Hello there, how are you doing today?", gen_length=32, block_length=8,
                         diffusion_steps=32, cache=mode)
        text = "".join(s)
        runs[mode] = (text, s.stats)
    none, prefix, dual = (runs[m][1] for m in ("none", "prefix", "dual"))
    assert none.forward_passes == prefix.forward_passes == dual.forward_passes == 32
    assert dual.positions_computed < prefix.positions_computed < none.positions_computed
    agreement = res.manifest.parity["agreement"]  # variants of a setting: here the approximate caches
    assert set(agreement) == {f"{m}/{s}" for m in ("prefix", "dual") for s in ("low_confidence", "threshold_0.9")}
    assert all(0.0 <= v <= 1.0 for v in agreement.values())
    with pytest.raises(ConfigError, match="cache must be one of"):
        model.stream("Hi", cache="kv")


def test_cache_mode_refused_by_a_bundle_without_cached_graphs(mlm_bundle, tmp_path):
    import shutil

    from edgekit.runtimes import bundle as bdl

    res = mlm_bundle("BertForMaskedLM")[1]
    dst = tmp_path / "nocache"
    shutil.copytree(res.path, dst)
    m = bdl.load_manifest(dst)
    graphs = {"denoiser": m.graphs["denoiser"]}
    (dst / "encode.onnx").unlink()
    (dst / "block.onnx").unlink()
    m = replace(m, graphs=graphs, diffusion=replace(m.diffusion, cache_modes=("none",)))
    m = replace(m, files=bdl.hash_payload(dst))
    bdl.write_manifest(dst, m)
    with pytest.raises(ConfigError, match="cache mode 'dual' is not in this bundle"):
        load(dst).stream("Hi", cache="dual")


def test_prompt_isolated_model_exports_with_an_exact_prompt_cache(tmp_path):
    """A masked LM declaring attention_prompt_isolated runs through edgekit's attention function everywhere (export,
    runtime, the PyTorch reference): prompt positions never see the answer, so their keys/values are fixed."""
    src = make_mlm("ModernBertForMaskedLM", tmp_path / "src", attention_prompt_isolated=True)
    res = export_bundle(ExportConfig(source=str(src), output=tmp_path / "b"), verify=verifier(), progress=Silent())
    m = res.manifest
    assert m.diffusion.attention == "prompt_isolated" and m.graphs["denoiser"].file == "encode.onnx"
    assert not (res.path / "model.onnx").exists()
    assert m.parity["passed"], m.parity["misses"]
    model = load(res.path)
    x = (np.arange(30) % 50 + 7).astype(np.int64)
    y = x.copy()
    y[12:] = (y[12:] * 3) % 50 + 7  # another answer after a 12-token prompt
    (lx, kx), (ly, ky) = model.encode(x, 12), model.encode(y, 12)
    assert np.abs(lx[:12] - ly[:12]).max() < 1e-5 and np.abs(lx[12:] - ly[12:]).max() > 1e-2
    assert all(np.abs(a[:, :, :12] - b[:, :, :12]).max() < 1e-5 for a, b in zip(kx, ky))
    with pytest.raises(ConfigError, match="pass prompt_len"):
        model.full(x)
    assert "".join(model.stream("Hello", gen_length=16, block_length=8, diffusion_steps=16, cache="prefix"))


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "ModernBertForMaskedLM"])
def test_the_quality_command_runs_on_a_diffusion_bundle(mlm_bundle, arch):
    """(It called AR-only methods on diffusion bundles: an AttributeError traceback.) A masked LM is scored on its
    own objective: every 4th position masked, the text's tokens there."""
    from click.testing import CliRunner

    from edgekit.cli import main

    src, res = mlm_bundle(arch)
    r = CliRunner().invoke(main, ["quality", str(res.path), "--reference", str(src)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "top-1 agreement" in r.output and "100.00%" in r.output, r.output
