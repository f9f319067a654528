"""Pruning: depth, FFN width and 2:4 sparsity give smaller (or sparse) models that export with fp32 parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.parity import verifier
from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError
from tiny_models import make_model


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return make_model("LlamaForCausalLM", tmp_path_factory.mktemp("m") / "four", num_hidden_layers=4,
                      intermediate_size=256)


def _export(src, out, **kw):
    return export_bundle(ExportConfig(source=str(src), output=out, **kw), verify=verifier(new_tokens=8),
                         progress=Silent())


def _data_mb(bundle):
    return (bundle / "model.onnx.data").stat().st_size / 1e6


def test_depth_drops_the_least_influential_layers(four_layers, tmp_path):
    full = _export(four_layers, tmp_path / "full")
    res = _export(four_layers, tmp_path / "d", prune="depth=2")
    info = res.manifest.extra["pruning"]
    assert res.manifest.kv_cache.num_layers == 2 and len(info["removed_layers"]) == 2
    influence = info["block_influence"]
    kept = [i for i in range(3) if i not in info["removed_layers"]]
    assert all(influence[r] <= influence[k] for r in info["removed_layers"] for k in kept)  # lowest influence went
    assert 3 not in info["removed_layers"]  # the last layer is never dropped
    assert res.manifest.parity["passed"], res.manifest.parity["misses"]  # export of the pruned model is exact
    assert _data_mb(res.path) < 0.85 * _data_mb(full.path)
    assert isinstance(load(res.path).generate("Hello", max_new_tokens=4), str)


def test_width_removes_ffn_channels(four_layers, tmp_path):
    res = _export(four_layers, tmp_path / "w", prune="width=0.25")
    assert res.manifest.extra["pruning"]["ffn_channels_kept"] == [192] * 4
    assert res.manifest.parity["passed"], res.manifest.parity["misses"]
    graph = onnx.load(str(res.path / "model.onnx"))
    down = next(t for t in graph.graph.initializer if t.name == "model.layers.0/down.weight")
    assert tuple(down.dims) == (192, 64)


def test_sparsity_2_4_pattern_is_exact_and_recorded(four_layers, tmp_path):
    res = _export(four_layers, tmp_path / "s", prune="sparsity=2:4")
    assert res.manifest.extra["pruning"]["pattern"] == "2:4"
    assert res.manifest.parity["passed"], res.manifest.parity["misses"]
    graph = onnx.load(str(res.path / "model.onnx"))
    w = numpy_helper.to_array(next(t for t in graph.graph.initializer if t.name == "model.layers.0/gate_up.weight"))
    groups = (w.T != 0).reshape(w.shape[1], -1, 4).sum(-1)  # weight stored [in, out]: groups of 4 inputs per output
    assert (groups <= 2).all()


@pytest.mark.parametrize("prune, message", [
    ("depth=4", "would leave 0 of 4 layers; choose 1..3"),
    ("depth=0", "would leave 4 of 4"),
    ("width=1.5", "width: bad amount"),
    ("sparsity=1:4", "sparsity: bad amount"),
    ("layers=2", "--prune must look like depth=N"),
])
def test_bad_prune_amounts(four_layers, tmp_path, prune, message):
    with pytest.raises(ConfigError, match=message):
        export_bundle(ExportConfig(source=str(four_layers), output=tmp_path / "b", prune=prune), progress=Silent())
    assert not (tmp_path / "b").exists()


def test_unreadable_calibration_file(four_layers, tmp_path):
    with pytest.raises(ConfigError, match="Cannot read the calibration file"):
        export_bundle(ExportConfig(source=str(four_layers), output=tmp_path / "b", prune="depth=1",
                                   calibration=str(tmp_path / "missing.txt")), progress=Silent())
    binary = tmp_path / "bin.txt"
    binary.write_bytes(np.random.default_rng(0).integers(128, 256, 200, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match="calibration file"):
        export_bundle(ExportConfig(source=str(four_layers), output=tmp_path / "b", prune="depth=1",
                                   calibration=str(binary)), progress=Silent())
    assert not (tmp_path / "b").exists()


def test_custom_calibration_text_is_used(four_layers, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a small village by the sea. " * 20)
    res = _export(four_layers, tmp_path / "b", prune="depth=1", calibration=str(text))
    assert res.manifest.extra["pruning"]["calibration_tokens"] > 50
