"""Diffusion bundles (BERT-family masked LMs run as dLLMs): export, torch-free denoiser, parity, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier
from edgekit.runtimes import load
from edgekit.runtimes.denoiser import DiffusionParams, transfer_schedule
from edgekit.runtimes.errors import ConfigError, ContextLengthError, UnsupportedModelError
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
    (dict(cache="prefix"), "cache mode 'prefix' is not available yet"),
])
def test_bad_diffusion_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionParams(**kw)


def test_bad_options_on_a_bundle(mlm_bundle):
    model = load(mlm_bundle()[1].path)
    with pytest.raises(ConfigError, match="Unknown option.*max_new_tokens"):
        model.stream("Hi", max_new_tokens=5)
    with pytest.raises(ContextLengthError, match="gen_length"):
        model.stream("Hi", gen_length=512, block_length=512, diffusion_steps=512)


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
    r = CliRunner().invoke(main, ["parity", str(res.path), "--reference", str(src)], catch_exceptions=False)
    assert r.exit_code == 0 and "PASSED" in r.output
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
stream = load(res.path).stream("Hello", gen_length=16, block_length=8, diffusion_steps=16, threshold=0.5)
"".join(stream)
print(json.dumps({"refused": refused, "x_exists": (root / "x").exists(), "arch": res.manifest.architecture,
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
    assert r["arch"] == "TinyLLaDAModelLM" and r["kind"] == "diffusion"
    assert r["parity"]["passed"], r["parity"]["misses"]
    assert r["parity"]["summary"]["tokens_identical"] == 1.0
    assert r["blocks"] == 2
