"""Quality report: stored in the manifest at export (against the unpruned model) and from `edgekit quality`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.runtimes.errors import ConfigError


def test_export_stores_a_quality_report(llama_bundle):
    from edgekit.runtimes import load

    q = load(llama_bundle).manifest.extra["quality"]
    assert q["precision"] == "fp32" and q["top1"] == 1.0 and q["kl"] < 1e-6
    assert q["perplexity"] == pytest.approx(q["reference_perplexity"], rel=1e-3)
    assert q["size_mb"] > 0 and q["decode_tok_s"] > 0 and q["positions"] > 50


def test_pruned_quality_is_measured_against_the_unpruned_model(tiny_model, tmp_path):
    from tiny_models import make_model

    src = make_model("LlamaForCausalLM", tmp_path / "m", num_hidden_layers=4)
    res = export_bundle(ExportConfig(source=str(src), output=tmp_path / "b", prune="depth=2"), progress=Silent())
    q = res.manifest.extra["quality"]
    assert q["top1"] < 1.0 and q["kl"] > 1e-3  # the cost of dropping half the layers shows
    assert q["perplexity"] != pytest.approx(q["reference_perplexity"], rel=1e-3)


def test_quality_command_with_plot(llama_bundle, tiny_model, tmp_path):
    png = tmp_path / "q.png"
    r = CliRunner().invoke(main, ["quality", str(llama_bundle), "--reference", str(tiny_model()), "--plot", str(png)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "top-1 agreement" in r.output and "100.00%" in r.output
    assert png.stat().st_size > 1000


def test_bad_eval_text(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="too short"):
        export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b", eval_text=str(short)),
                      progress=Silent())
    r = CliRunner().invoke(main, ["quality", "nowhere", "--reference", "x", "--text", str(tmp_path / "nope.txt")])
    assert r.exit_code == 2 and "Cannot read the evaluation text" in r.output


def test_an_export_runs_each_prompt_through_pytorch_once(tiny_model, tmp_path, monkeypatch):
    """The quality report and parity share the PyTorch reference: every built-in prompt is prefilled once."""
    from edgekit.export.prompts import PROMPTS
    from edgekit.export.reference import TorchReference
    from edgekit.parity import verifier

    prefills: list[tuple[int, ...]] = []
    run = TorchReference.run

    def counted(self, ids, past):
        if past is None:
            prefills.append(tuple(ids))
        return run(self, ids, past)

    monkeypatch.setattr(TorchReference, "run", counted)
    res = export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b"), verify=verifier(4),
                        progress=Silent())
    assert res.manifest.parity["passed"] and res.manifest.extra["quality"]["top1"] == 1.0
    assert len(prefills) == len(set(prefills)) == len(PROMPTS) + 1  # each prompt once, and the evaluation text
