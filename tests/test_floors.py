"""The onnxruntime floor: derived at export from the ops a bundle's graphs hold, recorded, checked at load; exports
for an older onnxruntime take the exact alternatives; and bundles verified under the oldest onnxruntime promised
(a second environment with the onnxruntime 1.20.1 CPU wheel, runtime only: no torch, no onnx)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier
from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError, OnnxruntimeVersionError

OLD = "1.20.1"  # the oldest onnxruntime pyproject promises (JetPack 6 wheels start there)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    from transformers import AutoTokenizer

    from tiny_models import make_model

    folder = make_model("LlamaForCausalLM", tmp_path_factory.mktemp("bd") / "llama", block_diffusion_length=4)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.mask_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundles(tiny_model, block_model, tmp_path_factory):
    """name -> (path, the floor its manifest must record)."""
    root = tmp_path_factory.mktemp("floors")
    made = {}
    for name, src, opts, floor in [
        ("fp32", tiny_model(), {}, "1.20"),
        ("int4", tiny_model(), {"precision": "int4"}, "1.23"),  # its 8-bit lm_head
        ("int4-for-1.20", tiny_model(), {"precision": "int4", "onnxruntime": "1.20"}, "1.20"),
        ("tensorrt", tiny_model(), {"target": "tensorrt"}, "1.20"),
        ("tensorrt-int4", tiny_model(), {"precision": "int4", "target": "tensorrt"}, "1.20"),
        ("cuda-fp16", tiny_model(), {"precision": "fp16", "target": "cuda", "onnxruntime": "1.20"}, "1.20"),
        ("cuda-int4", tiny_model(), {"precision": "int4", "target": "cuda", "onnxruntime": "1.20"}, "1.20"),
        ("block", block_model, {}, "1.21.1"),  # MultiHeadAttention's batched bias
        ("block-for-1.20", block_model, {"onnxruntime": "1.20"}, "1.20"),
    ]:
        res = export_bundle(ExportConfig(source=str(src), output=root / name, **opts), verify=verifier(8),
                            progress=Silent())
        # (random tiny weights lose much to int4: those reports have misses, and verify must reproduce them)
        assert res.manifest.parity["passed"] or "int4" in name, (name, res.manifest.parity["misses"])
        made[name] = (res.path, floor)
    return made


def test_the_floor_is_derived_from_the_graphs_ops_and_recorded(bundles):
    for name, (path, floor) in bundles.items():
        rt = load(path).manifest.runtime
        assert rt.min_onnxruntime == floor, (name, rt.min_onnxruntime, rt.min_onnxruntime_for)
    assert "MatMulNBits bits=8" in load(bundles["int4"][0]).manifest.runtime.min_onnxruntime_for
    assert "MultiHeadAttention" in load(bundles["block"][0]).manifest.runtime.min_onnxruntime_for


def test_exports_for_an_older_onnxruntime_take_the_exact_alternatives(bundles):
    """For 1.20: the lm_head stays float (no 8-bit MatMulNBits); block-causal layers in plain ops (no
    MultiHeadAttention bias) and the same tokens as the MultiHeadAttention form."""
    head = onnx.load(str(bundles["int4-for-1.20"][0] / "model.onnx"), load_external_data=False)
    assert {a.i for n in head.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"} == {4}
    plain = onnx.load(str(bundles["block-for-1.20"][0] / "model.onnx"), load_external_data=False)
    assert "MultiHeadAttention" not in {n.op_type for n in plain.graph.node}
    a, b = load(bundles["block"][0]), load(bundles["block-for-1.20"][0])
    assert a.generate("Hello", gen_length=8) == b.generate("Hello", gen_length=8)


def test_a_bundle_above_the_running_onnxruntime_is_refused_at_load(bundles, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", OLD)
    with pytest.raises(OnnxruntimeVersionError, match=r"needs onnxruntime >= 1\.23 \(for MatMulNBits bits=8\); "
                                                      r"this is onnxruntime 1\.20\.1\. .*--onnxruntime 1\.20"):
        load(bundles["int4"][0])
    load(bundles["int4-for-1.20"][0])  # its floor is 1.20


@pytest.mark.parametrize("opts, message", [
    ({"onnxruntime": "1.18"}, "edgekit's runtime needs onnxruntime >= 1.20"),
    ({"onnxruntime": "one"}, "--onnxruntime must look like 1.20"),
    ({"onnxruntime": "1.20", "precision": "int8"}, "writes 8-bit MatMulNBits, which onnxruntime 1.20 cannot run"),
])
def test_bad_onnxruntime_options(tiny_model, tmp_path, opts, message):
    with pytest.raises(ConfigError, match=message):
        export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b", **opts), progress=Silent())
    assert not (tmp_path / "b").exists()


def runtime_env(version: str) -> Path:
    """A runtime-only environment (no torch, no onnx) on the onnxruntime ``version`` CPU wheel, from the registry;
    kept in the cache folder between runs. Returns its python."""
    env = Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit")) / f"venv-onnxruntime-{version}"
    python = env / "bin" / "python"
    if not (env / "ok").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, f"onnxruntime=={version}", "numpy>=1.24", "tokenizers>=0.20", "jinja2>=3.1",
                        "click>=8.1"], check=True)
        (env / "ok").write_text(version)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-e",
                    str(ROOT)], check=True)
    return python


@pytest.fixture(scope="module")
def old_runtime() -> Path:
    return runtime_env(OLD)


def _same_report(python: Path, bundle: Path, tmp: Path) -> None:
    """``edgekit verify`` of ``bundle`` under ``python``'s onnxruntime gives this environment's report."""
    import json

    old, new = _verify(python, bundle, tmp / "old.json"), _verify(sys.executable, bundle, tmp / "new.json")
    assert old.returncode == new.returncode and "Traceback" not in old.stderr, (bundle, old.stderr[-2000:])
    rows = [json.loads((tmp / f"{v}.json").read_text())["rows"] for v in ("old", "new")]
    assert len(rows[0]) == len(rows[1])
    for a, b in zip(*rows):
        assert a["tokens_agree"] == b["tokens_agree"] and abs(a["top1"] - b["top1"]) < 0.02, (bundle, a, b)


def _verify(python: Path | str, bundle: Path, out: Path | None = None) -> subprocess.CompletedProcess:
    report = ["--json", str(out)] if out is not None else []
    return subprocess.run([str(python), "-m", "edgekit", "verify", str(bundle), *report], capture_output=True,
                          text=True, cwd=bundle.parent, timeout=600)


def test_bundles_verify_under_the_oldest_onnxruntime_promised(bundles, old_runtime, tmp_path):
    """Every target's bundles verify against their stored reference under onnxruntime 1.20.1, without torch or onnx
    installed: the fp32/fp16 ones (cpu, tensorrt flavour, block diffusion and the cuda flavour made for 1.20, the latter
    on the CPU provider) pass; the int4 ones (made for 1.20, tensorrt and cuda flavours; random tiny weights, so
    their reports have misses) give the same report there as here. A bundle
    whose floor is above 1.20.1 is refused with both versions named."""
    check = subprocess.run([str(old_runtime), "-c", "import onnxruntime, importlib.util as u; print(onnxruntime."
                            "__version__, u.find_spec('torch') is None and u.find_spec('onnx') is None)"],
                           capture_output=True, text=True, check=True)
    assert check.stdout.split() == [OLD, "True"], check.stdout
    for name in ("fp32", "tensorrt", "block-for-1.20", "cuda-fp16"):  # (cuda flavour: on the CPU provider there)
        r = _verify(old_runtime, bundles[name][0])
        assert r.returncode == 0 and "PASSED" in r.stdout, (name, r.stdout[-2000:], r.stderr[-2000:])
    for name in ("int4-for-1.20", "tensorrt-int4", "cuda-int4"):
        _same_report(old_runtime, bundles[name][0], tmp_path)
    r = _verify(old_runtime, bundles["int4"][0])
    assert r.returncode == 2 and "needs onnxruntime >= 1.23" in r.stderr and "1.20.1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_bundle_at_the_1_23_floor_verifies_under_onnxruntime_1_23(bundles, tmp_path):
    """The oldest onnxruntime a 1.23-floor bundle (8-bit MatMulNBits head) promises: 1.23.2 gives this one's report;
    the block-diffusion bundle (floor 1.21.1) too."""
    python = runtime_env("1.23.2")
    for name in ("int4", "block"):
        _same_report(python, bundles[name][0], tmp_path)


@pytest.mark.slow
def test_smollm2_int4_on_onnxruntime_1_20(old_runtime, tmp_path):
    """The default int4 SmolLM2 bundle (GatherBlockQuantized bits=8 embedding, 8-bit head: floor 1.23) is refused
    under 1.20.1 naming both versions; exported for 1.20 (float embedding and head, exact) it verifies there."""
    default = export_bundle(ExportConfig(source="smollm2-135m-instruct", output=tmp_path / "default",
                                         precision="int4"), verify=verifier(16), progress=Silent())
    assert default.manifest.runtime.min_onnxruntime == "1.23" and default.manifest.parity["passed"]
    r = _verify(old_runtime, default.path)
    assert r.returncode == 2 and "needs onnxruntime >= 1.23" in r.stderr and OLD in r.stderr, r.stderr
    old = export_bundle(ExportConfig(source="smollm2-135m-instruct", output=tmp_path / "for-1.20", precision="int4",
                                     onnxruntime="1.20"), verify=verifier(16), progress=Silent())
    assert old.manifest.runtime.min_onnxruntime == "1.20" and old.manifest.parity["passed"]
    r = _verify(old_runtime, old.path)
    assert r.returncode == 0 and "PASSED" in r.stdout, (r.stdout[-3000:], r.stderr[-2000:])
