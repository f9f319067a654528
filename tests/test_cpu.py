"""The CPU's instruction sets, recorded in a bundle's provenance and in every parity/verify report, and what a
report says when an int8-activation bundle runs on another family of int8 kernels than the one it was made on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.report import kernel_note
from edgekit.runtimes import cpu
from edgekit.runtimes.bundle import MANIFEST_FILE


def test_this_cpu_is_described_from_what_the_process_can_execute():
    d = cpu.describe()
    assert d["arch"] and isinstance(d["features"], list) and d["int8_kernels"] != ""
    if d["arch"] in ("x86_64", "AMD64"):
        assert "AVX2" in d["features"] or d["int8_kernels"] in ("sse4.1", "generic")


def test_the_int8_kernel_family_follows_the_features_in_mlas_order(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    assert cpu.int8_kernels(["AVX2", "FMA3"]) == "avx2"
    assert cpu.int8_kernels(["AVX2", "AVX_VNNI"]) == "avxvnni"
    assert cpu.int8_kernels(["AVX2", "AVX512F", "AVX512BW", "AVX512VNNI"]) == "avx512vnni"
    assert cpu.int8_kernels(["AVX2", "AVX512F", "AVX512BW"]) == "avx512"
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert cpu.int8_kernels(["ASIMD", "ASIMDDP"]) == "dotprod" and cpu.int8_kernels(["ASIMD"]) == "neon"


def test_host_flags_are_trusted_only_where_they_agree_with_the_process(monkeypatch):
    """Under an emulator (qemu -cpu EPYC-Rome on an AVX-512 host) /proc/cpuinfo is the host's: its AVX-VNNI and
    AMX flags must not be added to an AVX2-only process."""
    avx2_only = {"AVX": True, "AVX2": True, "FMA3": True, "AVX512F": False}
    monkeypatch.setattr(cpu, "_numpy_features", lambda: avx2_only)
    monkeypatch.setattr(cpu, "_proc_flags", lambda: {"avx2", "avx512f", "avx_vnni", "amx_int8"})
    assert cpu.features() == ["AVX2", "FMA3"]
    monkeypatch.setattr(cpu, "_proc_flags", lambda: {"avx2", "avx_vnni"})  # a real Alder Lake: AVX-VNNI, no AVX-512
    assert cpu.features() == ["AVX2", "FMA3", "AVX_VNNI"] and cpu.int8_kernels(cpu.features()) == "avxvnni"


def _manifest(activations: str | None, made: str | None):
    quant = None if activations is None else SimpleNamespace(activations=activations, accuracy_level=4)
    return SimpleNamespace(quantization=quant, provenance={"cpu": {"int8_kernels": made}} if made else {})


def test_an_int8_activation_bundle_on_other_int8_kernels_is_said_in_the_report():
    here = {"cpu": {"int8_kernels": "avx2"}, "providers": ["CPUExecutionProvider"]}
    note = kernel_note(_manifest("int8", "avx512vnni"), here)
    assert "measured with avx512vnni int8 kernels, this CPU runs avx2" in note
    assert kernel_note(_manifest("int8", "avx2"), here) is None  # same family
    assert kernel_note(_manifest("float", "avx512vnni"), here) is None  # float activations: no int8 kernels
    assert kernel_note(_manifest(None, "avx512vnni"), here) is None
    assert kernel_note(_manifest("int8", "avx512vnni"), {**here, "providers": ["CUDAExecutionProvider"]}) is None


def test_bundles_and_reports_record_the_cpu(llama_bundle, tmp_path):
    m = json.loads((llama_bundle / MANIFEST_FILE).read_text())
    assert m["provenance"]["cpu"] == cpu.describe() == m["parity"]["machine"]["cpu"]
    out = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["verify", str(llama_bundle), "--json", str(out)])
    assert r.exit_code == 0 and "ran on: " in r.output and cpu.describe()["int8_kernels"] in r.output, r.output
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] == cpu.describe() and report["machine"]["providers"] == ["CPUExecutionProvider"]


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None or os.uname().machine != "x86_64", reason="needs qemu-user (apt install qemu-user)")
def test_the_fast_mode_verifies_on_an_emulated_avx2_only_cpu(smollm2_fast, tmp_path):
    """SmolLM2 at --accuracy-level 4, exported here, verified by a process on an AVX2-only CPU (qemu's EPYC-Rome
    model: AVX2, no AVX-512, no VNNI; onnxruntime picks its kernels by cpuid, which qemu emulates). About 9 minutes."""
    out = tmp_path / "avx2.json"
    run = subprocess.run([QEMU, "-cpu", "EPYC-Rome", sys.executable, "-m", "edgekit", "verify", str(smollm2_fast),
                          "--json", str(out)], capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"]["int8_kernels"] == "avx2", report["machine"]
    assert run.returncode == 0 and report["passed"], (run.stdout[-3000:], report["misses"])
    assert any("this CPU runs avx2 ones" in n for n in report["notes"])


@pytest.fixture(scope="module")
def smollm2_fast(tmp_path_factory) -> Path:
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent
    from edgekit.parity import verifier

    out = tmp_path_factory.mktemp("fast") / "smollm2-fast"
    res = export_bundle(ExportConfig(source="smollm2-135m-instruct", output=out, precision="int4", accuracy_level=4),
                        verify=verifier(64), progress=Silent())
    assert res.manifest.parity["passed"], res.manifest.parity["misses"]
    return res.path
