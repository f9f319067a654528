"""A bundle is a trust boundary: hostile or malformed bundles are refused with a BundleError naming the field or
file, never read outside the folder, accepted with altered weights, or answered with a traceback."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.runtimes import load
from edgekit.runtimes.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    Manifest,
    sha256_file,
)
from edgekit.runtimes.errors import BundleError, ConfigError, EdgekitError
from edgekit.runtimes.staging import remove_stale_staging, staging_dir


@pytest.fixture
def bundle(llama_bundle, tmp_path) -> Path:
    """A private copy of the tiny Llama bundle to tamper with."""
    dst = tmp_path / "b"
    shutil.copytree(llama_bundle, dst)
    return dst


def manifest(b: Path) -> dict:
    return json.loads((b / MANIFEST_FILE).read_text())


def write(b: Path, m) -> None:
    (b / MANIFEST_FILE).write_text(json.dumps(m))


def refused(b: Path, match: str) -> None:
    """Both load and `edgekit info` refuse the bundle with a one-line error (no traceback)."""
    with pytest.raises(BundleError, match=match):
        load(b)
    r = CliRunner().invoke(main, ["info", str(b)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output, r.output


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "secret.txt"
    p.write_text("a file outside the bundle\n")
    return p


def test_file_list_entries_outside_the_bundle_are_refused(bundle, secret):
    for name in (f"../{secret.name}", str(secret), "./model.onnx", "sub/../model.onnx", "a\\b"):
        m = manifest(bundle)
        m["files"][name] = sha256_file(secret)
        write(bundle, m)
        refused(bundle, "not a plain relative path")
        m["files"].pop(name)
        write(bundle, m)


def test_graph_and_tokenizer_files_outside_the_bundle_are_refused(bundle, secret):
    m = manifest(bundle)
    m["tokenizer"]["file"] = f"../{secret.name}"
    write(bundle, m)
    refused(bundle, "not a plain relative path|does not list")
    m["files"][f"../{secret.name}"] = sha256_file(secret)  # listed and hashed too: still outside
    write(bundle, m)
    refused(bundle, "not a plain relative path")
    m = manifest(bundle)
    m["graphs"]["decoder"]["file"] = str(secret)
    write(bundle, m)
    refused(bundle, "not a plain relative path|does not list")


def test_a_linked_folder_is_refused_without_being_walked(bundle, secret):
    os.symlink("/", bundle / "everything")  # walking it would read the whole filesystem
    refused(bundle, "does not list .*everything")


def test_symlinks_are_refused(bundle, secret):
    (bundle / "tokenizer.json").unlink()
    os.symlink(secret, bundle / "tokenizer.json")
    refused(bundle, "symbolic link")
    real = bundle.parent / "real.json"
    (bundle / MANIFEST_FILE).rename(real)
    os.symlink(real, bundle / MANIFEST_FILE)
    refused(bundle, "no edgekit.json \\(or it is a link\\)")


@pytest.mark.parametrize("change", ["delete", "empty", "drop_weights"])
def test_the_integrity_check_cannot_be_switched_off(bundle, change):
    m = manifest(bundle)
    if change == "delete":
        del m["files"]
    elif change == "empty":
        m["files"] = {}
    else:
        m["files"].pop("model.onnx.data")
    write(bundle, m)
    with open(bundle / "model.onnx.data", "r+b") as f:  # then corrupt the weights
        f.seek(100)
        f.write(b"\x00" * 64)
    refused(bundle, "lists no files|does not list")


def test_altered_weights_are_refused(bundle):
    with open(bundle / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01" * 64)
    refused(bundle, "integrity check: SHA-256 of model.onnx.data")


def test_unlisted_files_are_refused(bundle):
    (bundle / "extra.onnx").write_bytes(b"x")
    refused(bundle, "does not list .*extra.onnx")


@pytest.mark.parametrize("data, match", [
    ([], "not an edgekit manifest"), (None, "not an edgekit manifest"), ("x", "not an edgekit manifest"),
])
def test_manifests_of_the_wrong_json_type(bundle, data, match):
    write(bundle, data)
    refused(bundle, match)


def test_deep_nesting_and_oversize_manifests(bundle):
    (bundle / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    refused(bundle, "not valid JSON|nests deeper")
    m = manifest_of_copy = json.loads(json.dumps({"format": "edgekit-bundle", "format_version": FORMAT_VERSION}))
    m["extra"] = {"pad": "x" * (17 << 20)}
    write(bundle, manifest_of_copy)
    refused(bundle, "above the limit")


@pytest.mark.parametrize("path, value, match", [
    (("files",), ["model.onnx"], "'files' must be an object of SHA-256"),
    (("files", "model.onnx"), 12, "'files' must be an object of SHA-256"),
    (("extra",), "x", "'extra' must be an object"),
    (("max_context",), "big", "'max_context' must be an integer"),
    (("max_context",), 0, "'max_context' must be an integer in \\[1"),
    (("max_context",), -5, "'max_context' must be an integer in \\[1"),
    (("format_version",), True, "format_version True"),
    (("tokenizer", "chat_template"), ["x"], "'chat_template' must be a string"),
    (("kv_cache", "dtype"), "float8", "'dtype' must be one of float32, float16"),
    (("kv_cache", "past_key"), "past.{layer}.{0}", "'past_key' must hold"),
    (("kv_cache", "past_key"), "past.{lay}", "'past_key' must hold"),
    (("tokens", "eos_id"), 10**6, "'eos_id' must be an integer in \\[0"),
    (("tokens", "stop_ids"), [-1], "'stop_ids' must be a list of integers"),
    (("kind",), "gan", "'kind' must be one of ar, diffusion"),
    (("graphs",), {}, "'graphs' must be a non-empty object"),
    # a template's context is the messages and the special tokens by their transformers names, nothing else
    (("tokenizer", "special_token_strings", "messages"), "x", "'special_token_strings' sets 'messages'"),
    (("tokenizer", "special_token_strings", "add_generation_prompt"), "x", "sets 'add_generation_prompt'"),
    (("block_attention",), [8], "'block_attention' must be a JSON object|block_attention must be a JSON object"),
    (("block_attention",), {"block_length": 8, "block_lengths": [4]}, "'block_length' 8 is not one of"),
    (("block_attention",), {"block_length": "8"}, "'block_length' must be an integer"),
    (("diffusion",), ["prefix"], "diffusion must be a JSON object"),
    (("diffusion",), {"cache_modes": ["fast"]}, "'cache_modes' must be a list of distinct values"),
    (("diffusion",), {"attention": "causal"}, "'attention' must be one of bidirectional, prompt_isolated"),
    (("diffusion",), {"position_offset": -1}, "'position_offset' must be an integer"),
])
def test_fields_of_the_wrong_type_or_range(bundle, path, value, match):
    m = manifest(bundle)
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    write(bundle, m)
    refused(bundle, match)


@pytest.mark.parametrize("key, value", [("num_layers", 3), ("num_kv_heads", 4), ("head_dim", 8)])
def test_a_kv_layout_that_disagrees_with_the_graph(bundle, key, value):
    m = manifest(bundle)
    m["kv_cache"][key] = value
    if key == "num_layers":  # a consistent lie: the manifest's own I/O lists say 3 layers too
        m["graphs"]["decoder"]["inputs"] += ["past_key_values.2.key", "past_key_values.2.value"]
        m["graphs"]["decoder"]["outputs"] += ["present.2.key", "present.2.value"]
    write(bundle, m)
    refused(bundle, "does not match|disagrees with graph")


def test_a_max_context_beyond_the_graphs_rotary_cache(bundle):
    m = manifest(bundle)
    m["max_context"] += 1
    write(bundle, m)
    refused(bundle, "beyond the decoder graph's rotary cache of 256 positions")


def test_a_graph_of_another_vocabulary(bundle):
    m = manifest(bundle)
    m["vocab_size"] += 7
    write(bundle, m)
    refused(bundle, "'logits' has size .* the manifest says")


def test_template_refusals_and_runaway_templates_are_config_errors(bundle):
    m = manifest(bundle)
    m["tokenizer"]["chat_template"] = "{{ ''.__class__.__mro__ }}"
    write(bundle, m)
    with pytest.raises(ConfigError, match="could not render"):
        load(bundle).generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
    m["tokenizer"]["chat_template"] = "{{ 1 // 0 }}"  # an ordinary Python error inside the template
    write(bundle, m)
    with pytest.raises(ConfigError, match=r"tokenizer.chat_template\) could not render.*ZeroDivisionError"):
        load(bundle).generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
    r = CliRunner().invoke(main, ["run", str(bundle), "hi", "--chat", "--max-new-tokens", "2"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "chat_template" in r.output, r.output
    m["tokenizer"]["chat_template"] = "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}"
    write(bundle, m)
    with pytest.raises(ConfigError, match="steps of work"):
        load(bundle).generate([{"role": "user", "content": "hi"}], max_new_tokens=2)


def test_stale_staging_folders_of_killed_exports_are_removed(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / ".out.partial-999999999-abc"  # a process id that does not exist
    legacy = tmp_path / ".out.partial-xyz"  # written before staging folders carried the process id
    live = tmp_path / f".out.partial-{os.getpid()}-def"  # an export running now
    for p in (dead, legacy, live):
        p.mkdir()
        (p / "model.onnx").write_bytes(b"x")
    assert sorted(remove_stale_staging(target)) == sorted([dead, legacy])
    assert live.exists() and not dead.exists()
    with staging_dir(target) as stage:
        (stage / "f").write_text("x")
    assert (target / "f").exists() and not dead.exists() and live.exists()


def test_a_truncated_safetensors_source_is_a_clear_error(tiny_model, tmp_path):
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent

    src = tmp_path / "src"
    shutil.copytree(tiny_model(), src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EdgekitError, match="truncated or corrupt|Cannot load the weights"):
        export_bundle(ExportConfig(source=str(src), output=tmp_path / "out"), progress=Silent())
    assert not (tmp_path / "out").exists()


def _mutations(rng: random.Random, m: dict) -> dict:
    """A copy of ``m`` with a few random fields deleted, retyped or replaced by hostile values."""
    hostile = [None, True, -1, 0, 2**63, 1e308, "", "../x", "/etc/passwd", "{layer}{x}", [], {}, [1, "a"],
               {"a": {"b": []}}, "\ud800", "x" * 300]
    out = copy.deepcopy(m)
    for _ in range(rng.randint(1, 4)):
        node = out
        while True:  # walk down to a random field, then change it
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            child = node[key]
            if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
                node = child
                continue
            if isinstance(node, dict) and rng.random() < 0.25:
                del node[key]
            else:
                node[key] = rng.choice(hostile)
            break
    return out


def test_fuzz_the_manifest_parser(llama_bundle):
    """Random hostile edits of a real manifest: each one parses or is a BundleError; nothing else escapes."""
    base = manifest(llama_bundle)
    rng = random.Random(1234)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(1500):
        try:
            Manifest.from_dict(_mutations(rng, base))
            outcomes["parsed"] += 1
        except BundleError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 1000 and outcomes["parsed"] > 0


def test_external_data_pointing_outside_the_bundle_is_refused(bundle, tmp_path):
    """An ONNX file may name its weights' file itself; onnxruntime refuses a path that leaves the model's folder
    (checked here because the bundle's safety depends on it)."""
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    shutil.copy(bundle / "model.onnx.data", tmp_path / "outside.data")
    for t in graph.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(graph, str(bundle / "model.onnx"))
    m = manifest(bundle)
    m["files"]["model.onnx"] = sha256_file(bundle / "model.onnx")  # a stranger's bundle hashes what it ships
    write(bundle, m)
    refused(bundle, "onnxruntime cannot load.*External data path")
