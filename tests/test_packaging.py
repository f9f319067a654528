"""The wheel ships the mapped packages (edgekit.export, edgekit.runtimes, edgekit.devices); the tree is ruff clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_mapped_packages(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build without isolation here: {out.stderr[-200:]}")
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("edgekit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    required_files = ("edgekit/cli.py", "edgekit/parity.py", "edgekit/export/pipeline.py",
                      *(f"edgekit/export/onnx_graph/{m}.py" for m in ("__init__", "ops", "rows", "gqa", "mha", "plain",
                                                                       "decoder")),
                      "edgekit/export/targets.py", "edgekit/export/weights.py", "edgekit/runtimes/decoder.py",
                      "edgekit/runtimes/bundle.py", "edgekit/devices/__init__.py")
    for required in required_files:
        assert required in names, required
    assert not any(n.startswith(("export/", "runtimes/", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgekit = edgekit.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed (pip install -e '.[dev]')")
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
