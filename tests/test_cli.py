"""The CLI: user errors print one line and exit non-zero without a traceback; commands call the library."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from edgekit.cli import main
from edgekit.runtimes.bundle import MANIFEST_FILE


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_unknown_source_is_a_clean_error(tmp_path):
    r = invoke("export", "no-such-model", "-o", tmp_path / "b")
    assert r.exit_code == 2
    assert r.output.startswith("error: Source 'no-such-model' not found")
    assert "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_export_run_info_parity(tiny_model, tmp_path):
    out = tmp_path / "b"
    r = invoke("export", tiny_model(), "-o", out, "--parity-tokens", "8")
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output
    assert "Bundle written to" in r.output

    r = invoke("run", out, "Hello", "--max-new-tokens", "5", "--temperature", "0", "--stats")
    assert r.exit_code == 0, r.output
    assert "prompt tokens" in r.output

    r = invoke("info", out)
    assert r.exit_code == 0 and "LlamaForCausalLM" in r.output and "parity       PASSED" in r.output
    assert "quality      perplexity" in r.output and "top-1 100.00%" in r.output  # (extra: shown, never read)
    assert json.loads(invoke("info", out, "--json").output)["kind"] == "ar"

    r = invoke("parity", out, "--reference", tiny_model(), "--tokens", "8", "--json", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["passed"] is True

    r = invoke("export", tiny_model(), "-o", out)
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output


def test_parity_against_the_wrong_model_fails_listing_misses(llama_bundle, tmp_path):
    from tiny_models import make_model

    other = make_model("LlamaForCausalLM", tmp_path / "other", seed=1)
    r = invoke("parity", llama_bundle, "--reference", other, "--tokens", "8")
    assert r.exit_code == 1
    assert "FAILED" in r.output and "logits max|Δ|" in r.output
    assert r.output.count("✗ ") >= 9  # every prompt is listed
    assert "Traceback" not in r.output


def test_run_bad_values(llama_bundle):
    for args, msg in [
        (["--temperature", "-1"], "temperature must be between 0 and 2"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["--max-new-tokens", "100000"], "exceeds the bundle's max context"),
    ]:
        r = invoke("run", llama_bundle, "Hi", *args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output


def test_info_on_a_tampered_bundle(llama_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama_bundle, b)
    m = json.loads((b / MANIFEST_FILE).read_text())
    m["files"]["tokenizer.json"] = "0" * 64
    (b / MANIFEST_FILE).write_text(json.dumps(m))
    r = invoke("info", b)
    assert r.exit_code == 2 and "integrity check" in r.output
