"""`edgekit verify`: parity on the device without PyTorch, against the reference the export stored in the bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.runtimes.bundle import MANIFEST_FILE, sha256_file
from edgekit.runtimes.errors import BundleError
from edgekit.verify import verify


def test_the_reference_is_stored_listed_and_hashed(llama_bundle):
    m = json.loads((llama_bundle / MANIFEST_FILE).read_text())
    assert m["parity"]["reference_file"] == "reference.json"
    assert m["files"]["reference.json"] == sha256_file(llama_bundle / "reference.json")
    ref = json.loads((llama_bundle / "reference.json").read_text())
    assert len(ref["rows"]) == len(m["parity"]["rows"]) and ref["k"] == 8


def test_verify_reproduces_the_exports_parity_verdict_without_torch(llama_bundle):
    script = (
        "import sys, json\n"
        "for n in ('torch', 'transformers', 'optimum', 'onnx'): sys.modules[n] = None\n"
        "from edgekit.verify import verify\n"
        "r = verify(sys.argv[1])\n"
        "print(json.dumps({'passed': r.passed, 'summary': r.summary(), 'rows': len(r.rows)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(llama_bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    export = json.loads((llama_bundle / MANIFEST_FILE).read_text())["parity"]
    assert got["passed"] == export["passed"] is True and got["rows"] == len(export["rows"])
    assert got["summary"]["tokens_identical"] == export["summary"]["tokens_identical"] == 1.0
    assert got["summary"]["max_abs_diff"] <= 1e-3 and np.isnan(got["summary"]["mean_kl"])
    r = CliRunner().invoke(main, ["verify", str(llama_bundle)])
    assert r.exit_code == 0 and "PASSED" in r.output, r.output


def test_verify_catches_a_perturbed_graph(llama_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama_bundle, b)
    data = b / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    w = np.frombuffer(raw, dtype=np.float32).copy()
    w[: len(w) // 2] *= 1.05  # a 5% drift of half the weights (e.g. another kernel's numerics gone wrong)
    data.write_bytes(w.tobytes())
    m = json.loads((b / MANIFEST_FILE).read_text())
    m["files"]["model.onnx.data"] = sha256_file(data)  # a bundle re-hashed after the change: integrity holds
    (b / MANIFEST_FILE).write_text(json.dumps(m))
    report = verify(b)
    assert not report.passed and any("max|Δ|" in miss for miss in report.misses)
    r = CliRunner().invoke(main, ["verify", str(b)])
    assert r.exit_code == 1 and "FAILED" in r.output


def test_a_bundle_without_a_reference_is_a_clear_error(llama_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llama_bundle, b)
    m = json.loads((b / MANIFEST_FILE).read_text())
    m["parity"]["reference_file"] = None
    (b / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="stores no parity reference"):
        verify(b)
