"""Source resolution and architecture support: clear errors for what cannot be exported."""

from __future__ import annotations

import json

import pytest

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.export.registry import lookup
from edgekit.export.source import resolve
from edgekit.runtimes.errors import ConfigError, SourceError, UnsupportedModelError
from tiny_models import make_model


def test_unknown_source_suggests_the_builtin_name():
    with pytest.raises(SourceError, match="Did you mean 'smollm2-135m-instruct'"):
        resolve("smollm2-135m")


def test_folder_without_config(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(SourceError, match="no config.json.*GGUF files"):
        resolve(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(SourceError, match="not a .gguf file"):
        resolve(str(f))


def test_unsupported_architecture_lists_supported(tmp_path):
    src = make_model("GPT2LMHeadModel", tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="Unsupported architecture 'GPT2LMHeadModel'. Supported: .*Llama"):
        export_bundle(ExportConfig(source=str(src), output=tmp_path / "out"), progress=Silent())
    assert not (tmp_path / "out").exists()


def test_did_you_mean_for_architecture():
    with pytest.raises(UnsupportedModelError, match="Did you mean 'Qwen2ForCausalLM'"):
        lookup("Qwen2ForCausalLMX")


def test_remote_code_needs_the_flag(tiny_model, tmp_path):
    import shutil

    src = tmp_path / "remote"
    shutil.copytree(tiny_model(), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="--trust-remote-code"):
        export_bundle(ExportConfig(source=str(src), output=tmp_path / "out"), progress=Silent())


def test_bad_max_context(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="max_context must be between 16 and the model's limit 256, got 100000"):
        export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "o", max_context=100000),
                      progress=Silent())
    assert not (tmp_path / "o").exists()
