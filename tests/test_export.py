"""Export of each supported architecture: the bundle loads, and fp32 parity holds (identical greedy tokens)."""

from __future__ import annotations

import json

import pytest

from conftest import ARCHS
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.runtimes import load
from edgekit.runtimes.bundle import MANIFEST_FILE


@pytest.mark.parametrize("arch", ARCHS)
def test_export_each_architecture_passes_fp32_parity(tiny_bundle, arch):
    bundle = tiny_bundle(arch)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    report = manifest["parity"]
    assert report["passed"], report["misses"]
    assert report["summary"]["max_abs_diff"] <= 1e-3
    assert report["summary"]["tokens_identical"] == 1.0
    assert all(p["tokenizer_match"] for p in report["rows"])
    assert len(report["rows"]) >= 8
    assert manifest["architecture"] == arch
    assert manifest["tokens"]["turn_end_id"] is not None
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json", "reference.json"}
    assert load(bundle).generate("Hello", max_new_tokens=4) is not None


def test_manifest_describes_the_bundle(llama_bundle):
    m = load(llama_bundle).manifest
    assert m.kind == "ar" and m.precision == "fp32" and m.format_version == 1
    assert m.kv_cache.num_layers == 2 and m.kv_cache.num_kv_heads == 2 and m.kv_cache.head_dim == 16
    assert m.tokenizer.chat_template and "<|im_start|>" in m.tokenizer.chat_template
    assert m.max_context == 256
    assert m.provenance["versions"]["torch"] and m.provenance["created"]
    assert m.graphs["decoder"].inputs[:3] == ("input_ids", "attention_mask", "logits_to_keep")


def test_sliding_window_model_exports_with_parity(tiny_model, tmp_path):
    from tiny_models import make_model

    src = make_model("MistralForCausalLM", tmp_path / "mistral_sw", sliding_window=8)
    res = export_bundle(ExportConfig(source=str(src), output=tmp_path / "b"), verify=_verify(), progress=Silent())
    assert res.manifest.extra["attention"]["local_window"] == 8
    assert res.manifest.parity["passed"], res.manifest.parity["misses"]


def test_max_context_option(tiny_model, tmp_path):
    res = export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b", max_context=64),
                        progress=Silent())
    assert res.manifest.max_context == 64
    assert load(res.path).max_context == 64


def _verify():
    from edgekit.parity import verifier

    return verifier(new_tokens=16)
