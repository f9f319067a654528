"""Export of each supported architecture: the bundle loads, and fp32 parity holds (identical greedy tokens)."""

from __future__ import annotations

import json

import onnx
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
    assert manifest["architecture"] == arch.split(":")[0]
    assert manifest["tokens"]["turn_end_id"] is not None
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json", "reference.json"}
    assert load(bundle).generate("Hello", max_new_tokens=4) is not None


TORCH_FREE = """
import sys
for name in ("torch", "transformers", "optimum", "onnx"):
    sys.modules[name] = None
import edgekit.runtimes as rt
model = rt.load(sys.argv[1])
ids = list(model.stream("Hello there", max_new_tokens=12, temperature=0.0))
assert model.manifest.quantization.bits == 4, model.manifest.quantization
assert not [m for m in ("torch", "transformers") if sys.modules.get(m) is not None]
print("OK", model.manifest.architecture, len(ids))
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_bundle_of_each_architecture_runs_torch_free(tiny_model, tmp_path, arch):
    """int4 (rtn) of every family: the quantizer finds its matmuls, the quality report is written, and the
    bundle generates in a process where torch and transformers cannot be imported."""
    import subprocess
    import sys

    res = export_bundle(ExportConfig(source=str(tiny_model(arch)), output=tmp_path / "b", precision="int4",
                                     algo="rtn"), progress=Silent())
    quality = res.manifest.extra["quality"]
    assert quality["top1"] > 0.2, quality  # chance is 1/400; random tiny weights lose more to int4 than real ones
    out = subprocess.run([sys.executable, "-c", TORCH_FREE, str(res.path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("OK " + arch.split(":")[0])


def test_manifest_describes_the_bundle(llama_bundle):
    m = load(llama_bundle).manifest
    assert m.kind == "ar" and m.precision == "fp32" and m.format_version == 2
    assert m.kv_cache.num_layers == 2 and m.kv_cache.num_kv_heads == 2 and m.kv_cache.head_dim == 16
    assert m.tokenizer.chat_template and "<|im_start|>" in m.tokenizer.chat_template
    assert m.max_context == 256
    assert m.provenance["versions"]["torch"] and m.provenance["created"]
    assert m.graphs["decoder"].inputs[:3] == ("input_ids", "attention_mask", "logits_to_keep")


def test_sliding_window_model_exports_with_parity(tiny_model, tmp_path):
    from tiny_models import make_model

    src = make_model("MistralForCausalLM", tmp_path / "mistral_sw", sliding_window=8)
    res = export_bundle(ExportConfig(source=str(src), output=tmp_path / "b"), verify=_verify(), progress=Silent())
    graph = onnx.load(str(res.path / "model.onnx"), load_external_data=False)
    assert {a.i for n in graph.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
            if a.name == "local_window_size"} == {8}
    assert res.manifest.parity["passed"], res.manifest.parity["misses"]


def test_max_context_option(tiny_model, tmp_path):
    res = export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b", max_context=64),
                        progress=Silent())
    assert res.manifest.max_context == 64
    assert load(res.path).max_context == 64


def _verify():
    from edgekit.parity import verifier

    return verifier(new_tokens=16)


@pytest.mark.parametrize("config_cls, arch, named", [
    ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts="),
    ("MixtralConfig", "MixtralForCausalLM", "experts=8"),
])
def test_mixture_of_experts_is_refused_by_name(tmp_path, config_cls, arch, named):
    import transformers

    from edgekit.runtimes.errors import UnsupportedModelError

    cfg = getattr(transformers, config_cls)(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path / "moe")
    with pytest.raises(UnsupportedModelError, match=f"mixture-of-experts.*{named}.*not supported"):
        export_bundle(ExportConfig(source=str(tmp_path / "moe"), output=tmp_path / "b"), progress=Silent())
    assert not (tmp_path / "b").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    import transformers

    from edgekit.runtimes.errors import UnsupportedModelError

    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="Unsupported architecture 'GPT2LMHeadModel'.*Gemma3ForCausalLM"):
        export_bundle(ExportConfig(source=str(tmp_path / "gpt2"), output=tmp_path / "b"), progress=Silent())
    assert not (tmp_path / "b").exists()
