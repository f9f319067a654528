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


def test_the_base_install_carries_no_onnxruntime_wheel_and_the_extras_pick_one():
    """onnxruntime's wheels share one module: the base install names none, ``cpu`` / ``gpu`` pick one, and the
    export extra (parity on the CPU provider) brings the CPU one, so the README's commands still install it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("onnxruntime", "torch", "transformers"))]
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cpu"]] == ["onnxruntime"]
    assert [d.split(">")[0] for d in extras["gpu"]] == ["onnxruntime-gpu"]
    assert "edgekit[cpu]" in extras["export"] and not any("onnxruntime-gpu" in d for d in extras["export"])


def test_two_onnxruntime_wheels_together_are_named_with_the_repair(monkeypatch, llama_bundle, capsys):
    from edgekit.runtimes import backend, flavour

    assert [n for n, _ in flavour.installed()] == ["onnxruntime"] and flavour.clash() is None
    both = [("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.22.0")]
    text = flavour.clash(both)
    assert "onnxruntime 1.32.0 and onnxruntime-gpu 1.22.0 are installed together" in text
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in text
    monkeypatch.setattr(flavour, "installed", lambda: both)
    assert backend.choose_providers(None, ("CUDAExecutionProvider", "CPUExecutionProvider")) == [
        "CPUExecutionProvider"]
    assert "installed together" in capsys.readouterr().err  # the fallback warning says why the GPU is gone


def test_without_any_onnxruntime_the_runtime_says_how_to_install_one(llama_bundle, tmp_path):
    """The base install has no onnxruntime: loading a bundle is an EdgekitError naming the extras and the Jetson
    route (the CLI prints it, no traceback); doctor still reports the machine."""
    block = "import sys; sys.modules['onnxruntime'] = None\nfrom edgekit.cli import main\nmain()\n"
    for args, code in ((["run", str(llama_bundle), "hi", "--max-new-tokens", "2"], 2), (["doctor"], 0)):
        out = subprocess.run([sys.executable, "-c", block, *args], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120)
        assert out.returncode == code and "Traceback" not in out.stderr, out.stderr[-1500:]
        text = out.stdout + out.stderr
        assert "onnxruntime" in text and "edgekit[cpu]" in text and "Jetson" in text, text
