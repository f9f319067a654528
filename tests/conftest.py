"""Shared fixtures: tiny models saved to disk and bundles exported from them (built once per test session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for tiny_models

from edgekit.export.pipeline import ExportConfig, export_bundle  # noqa: E402
from edgekit.export.progress import Silent  # noqa: E402
from edgekit.parity import verifier  # noqa: E402
from tiny_models import make_model  # noqa: E402

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM",
         "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "SmolLM3ForCausalLM", "GraniteForCausalLM",
         "Olmo2ForCausalLM", "Olmo3ForCausalLM", "Phi3ForCausalLM:longrope"]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    """Factory: path of a saved tiny model of ``arch`` (cached per session)."""
    cache: dict[str, Path] = {}

    def get(arch: str = "LlamaForCausalLM") -> Path:
        if arch not in cache:
            cache[arch] = make_model(arch, models_dir / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tmp_path_factory):
    """Factory: path of a bundle exported (with fp32 parity) from the tiny ``arch`` model (cached per session)."""
    cache: dict[str, Path] = {}
    out = tmp_path_factory.mktemp("bundles")

    def get(arch: str = "LlamaForCausalLM") -> Path:
        if arch not in cache:
            cfg = ExportConfig(source=str(tiny_model(arch)), output=out / arch)
            export_bundle(cfg, verify=verifier(new_tokens=32), progress=Silent())
            cache[arch] = out / arch
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def llama_bundle(tiny_bundle) -> Path:
    return tiny_bundle("LlamaForCausalLM")
