"""Bundle integrity: tampered, partial, newer or corrupt bundles are refused; export never half-writes."""

from __future__ import annotations

import json
import shutil

import pytest

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.runtimes import load
from edgekit.runtimes.bundle import MANIFEST_FILE, sha256_file
from edgekit.runtimes.errors import BundleError, ExportError


@pytest.fixture
def bundle_copy(llama_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(llama_bundle, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / MANIFEST_FILE).read_text())
    fn(m)
    (path / MANIFEST_FILE).write_text(json.dumps(m))


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="incomplete: missing tokenizer.json"):
        load(bundle_copy)


def test_tampered_file_is_refused(bundle_copy):
    with open(bundle_copy / "model.onnx.data", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="integrity check.*model.onnx.data"):
        load(bundle_copy)


def test_newer_format_version_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="format_version 99.*upgrade edgekit"):
        load(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no edgekit.json"):
        load(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        load(tmp_path / "nope")


def test_malformed_manifest(bundle_copy):
    (bundle_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load(bundle_copy)
    _edit_manifest_raw = {"format": "edgekit-bundle", "format_version": 1, "kind": "ar"}
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(_edit_manifest_raw))
    with pytest.raises(BundleError, match="malformed"):
        load(bundle_copy)


def test_corrupt_onnx_with_matching_hash_gets_a_clear_error(bundle_copy):
    (bundle_copy / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    digest = sha256_file(bundle_copy / "model.onnx")
    _edit_manifest(bundle_copy, lambda m: m["files"].update({"model.onnx": digest}))
    with pytest.raises(BundleError, match="onnxruntime cannot load.*re-export"):
        load(bundle_copy)


def test_output_exists_needs_force(tiny_model, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_bundle(ExportConfig(source=str(tiny_model()), output=out), progress=Silent())
    assert (out / "keep.txt").read_text() == "mine"
    export_bundle(ExportConfig(source=str(tiny_model()), output=out, force=True), progress=Silent())
    assert not (out / "keep.txt").exists() and (out / MANIFEST_FILE).exists()


def test_failed_export_leaves_nothing_behind(tiny_model, tmp_path):
    def boom(*_):
        raise RuntimeError("simulated crash during parity")

    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(ExportConfig(source=str(tiny_model()), output=out), verify=boom, progress=Silent())
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


def test_failed_forced_export_keeps_the_old_bundle(llama_bundle, tiny_model, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(llama_bundle, out)
    before = (out / MANIFEST_FILE).read_text()

    def boom(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_bundle(ExportConfig(source=str(tiny_model()), output=out, force=True), verify=boom, progress=Silent())
    assert (out / MANIFEST_FILE).read_text() == before
    load(out)
