"""Precisions, quantization algorithms, GGUF block carry-over, device profiles and the memory-fit check."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from edgekit.export import gguf, weights
from edgekit.export.device import list_profiles, load_profile
from edgekit.export.fit import FitError, estimate
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError


def _export(src, out, **kw):
    return export_bundle(ExportConfig(source=str(src), output=out, **kw), progress=Silent())


@pytest.mark.parametrize("precision, algo, bits", [("int4", "rtn", 4), ("int8", "rtn", 8), ("int4", "hqq", 4),
                                                   ("int4", "gptq", 4)])
def test_weight_only_quantization_runs_torch_free(tiny_model, tmp_path, precision, algo, bits):
    from edgekit.parity import verifier

    res = export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b", precision=precision, algo=algo),
                        verify=verifier(new_tokens=8), progress=Silent())
    q = res.manifest.quantization
    assert (q.method, q.bits, q.accuracy_level, q.tolerance) == (algo, bits, 4, precision)
    assert q.activations == "int8"  # (accuracy level 4: MatMulNBits quantizes activations to 8 bits)
    graph = onnx.load(str(res.path / "model.onnx"), load_external_data=False)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1  # 4 matmuls per layer + lm_head
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == ({4, 8} if bits == 4 else {8})
    assert not [n for n in graph.graph.node if n.op_type == "MatMul"]
    report = res.manifest.parity
    assert report["precision"] == precision and len(report["rows"]) >= 8
    assert 0 <= report["summary"]["top1"] <= 1
    assert isinstance(load(res.path).generate("Hello", max_new_tokens=4), str)


def test_qdq_format_on_the_cpu_target(tiny_model, tmp_path):
    """--quant-format qdq without --target tensorrt: the same symmetric int4 blocks behind DequantizeLinear, inside
    the fused graph (what a TensorRT user can check on a CPU first)."""
    from edgekit.parity import verifier

    res = export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b", precision="int4",
                                     algo="rtn", quant_format="qdq"), verify=verifier(new_tokens=8), progress=Silent())
    graph = onnx.load(str(res.path / "model.onnx"))
    inits = {i.name: i for i in graph.graph.initializer}
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]  # weights
    assert len(dq) == 2 * 4  # the transformer matmuls; lm_head stays float
    assert not [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert {inits[n.input[0]].data_type for n in dq} == {onnx.TensorProto.INT4}
    assert all(len(n.input) == 2 for n in dq)  # symmetric: no zero point
    q = res.manifest.quantization
    assert q.format == "qdq" and q.tolerance == "int4" and q.lm_head == "float32"
    # on a tiny random model int4 does not meet its tolerance reliably; what is checked is that it runs and stays
    # far from chance (1/400)
    assert res.manifest.parity["summary"]["top1"] > 0.3


def test_int4_with_fp16_kv_cache_runs_torch_free(tiny_model, tmp_path):
    """fp16 activations and KV cache around the same int4 weights: the cache halves and the logits barely move."""
    half = _export(tiny_model(), tmp_path / "h", precision="int4", kv_cache="fp16")
    full = load(_export(tiny_model(), tmp_path / "f", precision="int4").path)
    m = half.manifest
    assert m.kv_cache.dtype == "float16" and m.quantization.kv_cache == "fp16"
    model = load(half.path)
    ids = model.tokenizer.encode("Hello there, how are you today?")
    cache = model.graph.new_cache()
    got = model.graph.forward(ids, cache, logits_to_keep=len(ids))
    assert cache.slots.arrays[0].dtype == np.float16
    want = full.graph.forward(ids, full.graph.new_cache(), logits_to_keep=len(ids))
    assert np.abs(got - want).mean() < 0.05 * np.abs(want).mean()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8  # a random tiny model: near-tied logits flip
    assert isinstance(model.generate("Hi", max_new_tokens=4), str)


def test_gptq_beats_rtn_on_the_calibrated_model(tiny_model, tmp_path):
    """GPTQ compensates the rounding error with calibration statistics: its outputs stay closer to fp32's."""
    from tiny_models import make_model

    src = make_model("LlamaForCausalLM", tmp_path / "wide", intermediate_size=512, hidden_size=128,
                     num_attention_heads=4, num_key_value_heads=2)
    ids = list(range(5, 60))
    ref = load(_export(src, tmp_path / "fp32").path)
    want = ref.graph.forward(ids, ref.graph.new_cache(), logits_to_keep=len(ids))
    err = {}
    for algo in ("rtn", "gptq"):
        m = load(_export(src, tmp_path / algo, precision="int4", algo=algo, block_size=32).path)
        err[algo] = float(np.abs(m.graph.forward(ids, m.graph.new_cache(), logits_to_keep=len(ids)) - want).mean())
    assert err["gptq"] < err["rtn"], err


def test_int4_is_smaller_than_fp32(tiny_model, llama_bundle, tmp_path):
    from tiny_models import make_model

    src = make_model("LlamaForCausalLM", tmp_path / "wide", intermediate_size=1024, hidden_size=256,
                     num_attention_heads=8, num_key_value_heads=4)
    fp32 = _export(src, tmp_path / "fp32").path
    int4 = _export(src, tmp_path / "int4", precision="int4").path
    size = lambda p: (p / "model.onnx.data").stat().st_size  # noqa: E731
    assert size(int4) < 0.5 * size(fp32)


@pytest.mark.parametrize("kw, message", [
    (dict(precision="in4"), "Unknown precision 'in4'.*Did you mean 'int4'"),
    (dict(precision="int4", algo="hqqq"), "Unknown quantization algorithm 'hqqq'.*Did you mean 'hqq'"),
    (dict(algo="rtn"), "--algo rtn applies to int8/int4 exports"),
    (dict(precision="int4", algo="gguf"), "--algo gguf carries GGUF blocks over unchanged.*--algo rtn"),
    (dict(precision="int4", block_size=48), "Unknown block size 48"),
    (dict(precision="int4", accuracy_level=7), "Unknown accuracy level 7"),
    (dict(device="jetson-orin-nano"), "Unknown device 'jetson-orin-nano'.*Did you mean 'jetson-orin-nano-8gb'"),
    (dict(batch=0), "batch must be >= 1"),
    (dict(precision="int8", algo="gptq"), "GPTQ writes 4-bit weights only"),
    (dict(precision="int4", kv_cache="fp8"), "Unknown KV cache dtype 'fp8'"),
    (dict(precision="fp32", kv_cache="fp16"), "--kv-cache fp16 applies to int8/int4 exports"),
    (dict(precision="int8", quant_format="qdd"), "Unknown quantization format 'qdd'.*Did you mean 'qdq'"),
    (dict(precision="int4", algo="hqq", quant_format="qdq"), "--quant-format qdq .* is written by --algo rtn"),
    (dict(precision="int4", lm_head="fp33"), "Unknown lm_head precision 'fp33'.*Did you mean 'fp32'"),
    (dict(precision="int4", algo="rtn", lm_head="int8"), "--lm-head int8 chooses how a GGUF's output layer"),
    (dict(precision="int4", target="tensorrt", algo="hqq"), "--quant-format qdq .* is written by --algo rtn"),
    (dict(device="generic-x86-cpu", target="cuda"), "--target cuda runs on CUDAExecutionProvider, which device "
                                                    "generic-x86-cpu does not have"),
])
def test_bad_options_fail_before_any_work(tiny_model, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        _export(tiny_model(), tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()


def test_device_picks_defaults_and_records_the_fit(tiny_model, tmp_path):
    res = _export(tiny_model(), tmp_path / "b", device="generic-arm-cpu")
    m = res.manifest
    assert m.precision == "int4"  # the device's default precision
    assert m.max_context == 256  # min(model limit 256, device default 2048)
    assert m.extra["device"] == "generic-arm-cpu" and m.extra["fit"]["fits"] is True
    assert m.runtime.providers == ("CPUExecutionProvider",)
    res = _export(tiny_model(), tmp_path / "c", device="generic-arm-cpu", precision="fp32")  # flags override
    assert res.manifest.precision == "fp32"
    res = _export(tiny_model(), tmp_path / "d", precision="int4", accuracy_level=0)
    assert res.manifest.quantization.activations == "float"


def test_model_that_cannot_fit_fails_early_with_the_fix(tmp_path):
    """A 3B-class config (no weights at all in the folder): the fit check must refuse before any loading."""
    from transformers import LlamaConfig

    folder = tmp_path / "big"
    cfg = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                      num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    with pytest.raises(FitError) as err:
        _export(folder, tmp_path / "b", device="jetson-orin-nano-8gb", precision="fp32", target="cpu", max_context=2048)
    msg = str(err.value)
    assert "does not fit device 'jetson-orin-nano-8gb'" in msg and "GB over" in msg
    assert "--precision int4 (needs" in msg and "--prune" in msg
    assert not (tmp_path / "b").exists()


def test_fit_estimate_scales_with_precision_and_context():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4)
    dev = load_profile("jetson-orin-nano-8gb")
    fp32, int4 = estimate(cfg, "fp32", 2048, 1, dev), estimate(cfg, "int4", 2048, 1, dev)
    assert int4.weights_mb < 0.3 * fp32.weights_mb
    assert estimate(cfg, "int4", 4096, 1, dev).kv_cache_mb == pytest.approx(2 * int4.kv_cache_mb)
    assert estimate(cfg, "int4", 2048, 4, dev).kv_cache_mb == pytest.approx(4 * int4.kv_cache_mb)
    # TinyLlama-1.1B: 22 layers x (K and V) x 4 kv heads x 64 dims x 2048 positions x 4 bytes = 88 MB of KV cache
    assert fp32.kv_cache_mb == pytest.approx(88.0)


def test_device_profiles_are_complete():
    names = list_profiles()
    for required in ("jetson-orin-nano-8gb", "jetson-orin-nano-super-8gb", "jetson-orin-nx-16gb",
                     "jetson-agx-orin-64gb", "jetson-xavier-nx-8gb", "rtx-4090", "generic-x86-cpu", "generic-arm-cpu"):
        assert required in names
        p = load_profile(required)
        assert p.memory_budget_gb <= p.memory_gb and p.execution_providers
    orin = load_profile("jetson-orin-nano-8gb")
    assert orin.compute_capability == "8.7" and "fp8" not in orin.precisions


def test_custom_device_file(tmp_path, tiny_model):
    toml = tmp_path / "mine.toml"
    toml.write_text('name = "mine"\ndescription = "test"\nkind = "cpu"\nmemory_gb = 1.0\nmemory_budget_gb = 0.001\n'
                    'runtime_overhead_mb = 1\nprecisions = ["fp32"]\ndefault_precision = "fp32"\n'
                    'default_max_context = 128\nexecution_providers = ["CPUExecutionProvider"]\n')
    with pytest.raises(FitError, match="does not fit device 'mine'"):
        _export(tiny_model(), tmp_path / "b", device=str(toml))
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nwat = 1\n')
    with pytest.raises(ConfigError, match="unknown keys: wat"):
        load_profile(str(bad))


# --- GGUF block carry-over, checked against gguf-py's reference dequantization --------------------------------------
# bytes per block and where its fp16 scale fields sit; the other bytes are codes (and K-quant sub-block scales),
# for which any value is valid, so random bytes are valid blocks of every type (no encoder needed)
BLOCK_BYTES = {"Q4_0": (18, 32, [0]), "Q4_1": (20, 32, [0, 2]), "Q5_0": (22, 32, [0]), "Q5_1": (24, 32, [0, 2]),
               "Q8_0": (34, 32, [0]), "Q4_K": (144, 256, [0, 2]), "Q5_K": (176, 256, [0, 2]),
               "Q6_K": (210, 256, [208])}
GGUF_TYPES = list(BLOCK_BYTES)


def _random_blocks(qtype: str, rows: int, blocks: int, rng) -> np.ndarray:
    size, _, fp16_at = BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    for at in fp16_at:
        raw[:, :, at:at + 2] = (rng.standard_normal((rows, blocks)) * 0.02).astype(np.float16).view(
            np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * size)


def _k(qtype: str, blocks: int) -> int:
    return blocks * BLOCK_BYTES[qtype][1]


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_ggml_blocks_convert_bit_identically(qtype):
    """Every carried type: the MatMulNBits codes, scales, zero points and offsets dequantize to exactly the
    floats gguf-py's reference dequantization gives (max |diff| 0, not a tolerance)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    blocks = 4 if BLOCK_BYTES[qtype][1] == 32 else 2
    raw = _random_blocks(qtype, rows=64, blocks=blocks, rng=rng)
    ours = gguf.from_ggml(raw, qtype)
    assert (ours.bits, ours.block) == gguf.CARRIED[qtype]
    ref = dequantize(raw, GGMLQuantizationType[qtype]).reshape(64, _k(qtype, blocks))
    assert np.array_equal(ours.dequantize(), ref), float(np.abs(ours.dequantize() - ref).max())


@pytest.mark.parametrize("qtype", [t for t in GGUF_TYPES if gguf.CARRIED[t][0] == 8])
def test_8bit_blocks_split_into_two_exact_4bit_weights(qtype):
    """The float-activation form of 8-bit types (two 4-bit matmuls) holds the very same weights."""
    raw = _random_blocks(qtype, rows=16, blocks=256 // BLOCK_BYTES[qtype][1], rng=np.random.default_rng(4))
    w = gguf.from_ggml(raw, qtype)
    lo, hi = w.nibbles()
    assert lo.bits == hi.bits == 4 and hi.offsets is None
    assert np.array_equal(lo.dequantize() + hi.dequantize(), w.dequantize())


def test_folding_the_min_into_a_zero_point_would_be_inexact():
    """Why scale and min stay separate: for Q4_K, s * (q - 8) + (8 s - dmin * m) with s = d * sc is not always
    the float s * q - dmin * m that the GGUF means (s carries more bits than an fp16)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = _random_blocks("Q4_K", rows=256, blocks=1, rng=np.random.default_rng(3))
    ours = gguf.from_ggml(raw, "Q4_K")
    q = ours.codes.reshape(256, 8, 32).astype(np.float32)
    s, off = ours.scales[:, :, None], ours.offsets[:, :, None]
    folded = ((q - 8) * s + (8 * s + off)).reshape(256, 256)
    ref = dequantize(raw, GGMLQuantizationType.Q4_K).reshape(256, 256)
    off_by = np.mean(folded != ref)
    assert 0 < off_by < 0.01, off_by  # a few weights land one ulp away
    assert np.array_equal(ours.dequantize(), ref)


@pytest.mark.parametrize("target", ["cpu", "cuda", "tensorrt"])
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_matmulnbits_graph_computes_the_dequantized_matmul(qtype, target):
    """cpu: fp32, exact kernels (8-bit blocks as two 4-bit ones, the min as a block-sum correction). cuda: the fp16
    flavour, where 4-bit blocks are a scale-only MatMulNBits (centred codes, no zero points: the CUDA kernels' GEMV
    and fpA_intB paths) plus the block-sum offset term (checked here on the CPU kernels, which compute the same
    values). tensorrt (fp32 here): signed int4 behind DequantizeLinear plus
    a plain-op offset term, or dense for 8-bit blocks; only ops TensorRT 10.3 parses."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgekit.export.onnx_graph import MS_DOMAIN, Graph

    rng = np.random.default_rng(1)
    blocks = 3 if BLOCK_BYTES[qtype][1] == 32 else 1
    k = _k(qtype, blocks)
    w = gguf.from_ggml(_random_blocks(qtype, rows=40, blocks=blocks, rng=rng), qtype)  # N=40
    half = target == "cuda"
    g = Graph(accuracy_level=0, dtype="float16" if half else "float32", target=target)
    y = g.linear("x", w, "lin")
    g.op_named("Identity", [y], ["y"])
    tensor = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", tensor, ["M", k])],
                              [helper.make_tensor_value_info("y", tensor, None)], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # (what a qdq bundle records)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = sess.run(None, {"x": x.astype(np.float16) if half else x})[0].astype(np.float32)
    want = x @ w.dequantize().T
    if half and w.bits == 4:  # CUDA's fast paths: a scale-only MatMulNBits (no zero_points input) + the offset term
        nbits = [n for n in g.nodes if n.op_type == "MatMulNBits"]
        assert len(nbits) == 1 and len(nbits[0].input) == 3, [n.input for n in nbits]
        assert not any(i.name == "lin.zero_points" for i in g.inits)
        assert ("ReduceSum" in {n.op_type for n in g.nodes}) == (w.offsets is not None)  # block sums x offsets
    if target == "tensorrt":
        from edgekit.export import tensorrt

        assert tensorrt.problems(model) == [] and "MatMulNBits" not in {n.op_type for n in g.nodes}
        assert ("DequantizeLinear" in {n.op_type for n in g.nodes}) == (w.bits == 4)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.allclose(got, want, atol=(3e-3 if half else 1e-4) * scale), np.abs(got - want).max() / scale


@pytest.mark.parametrize("a, b", [("Q4_K", "Q6_K"), ("Q5_0", "Q8_0"), ("Q4_0", "Q4_1"), ("Q4_K", "Q5_0")])
def test_mixed_types_pack_into_one_matmul_exactly(a, b):
    """A Q4_K_M file packs e.g. Q4_K gate with Q6_K up: widened to the common code width and block size, the
    packed weight still dequantizes to exactly both parts."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(2)
    parts, refs = [], []
    for qtype, rows in ((a, 8), (b, 12)):
        raw = _random_blocks(qtype, rows=rows, blocks=256 // BLOCK_BYTES[qtype][1], rng=rng)
        parts.append(gguf.from_ggml(raw, qtype))
        refs.append(dequantize(raw, GGMLQuantizationType[qtype]).reshape(rows, 256))
    packed = weights.concat_rows(parts)
    assert np.array_equal(packed.dequantize(), np.concatenate(refs))


def test_unpermute_matches_transformers():
    rows, heads = 24, 3
    w = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    dim = rows // heads // 2
    expected = w.reshape(heads, dim, 2, 2).swapaxes(2, 1).reshape(w.shape)  # transformers' reverse permute
    assert np.array_equal(w[gguf._unpermute(rows, heads)], expected)


def test_manifest_records_quantization(tiny_model, tmp_path):
    res = _export(tiny_model(), tmp_path / "b", precision="int4", block_size=64)
    m = json.loads((res.path / "edgekit.json").read_text())
    assert m["quantization"]["block_size"] == 64 and m["precision"] == "int4"


def test_fp16_bundle_runs_on_cpu_with_fp16_kv_cache(tiny_model, tmp_path):
    from edgekit.parity import verifier

    res = export_bundle(ExportConfig(source=str(tiny_model()), output=tmp_path / "b", precision="fp16"),
                        verify=verifier(new_tokens=8), progress=Silent())
    assert res.manifest.kv_cache.dtype == "float16"
    assert res.manifest.parity["summary"]["top1"] >= 0.95
    model = load(res.path)
    assert model.graph.new_cache().slots.arrays[0].dtype == np.float16
    assert isinstance(model.generate("Hello", max_new_tokens=4), str)


def _write_gguf(path, arch: str, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A GGUF holding only the given tensors: name -> (ggml type, raw rows uint8 [N, row_bytes] or float [N, K])."""
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(path), arch)
    for name, (qtype, data) in tensors.items():
        if qtype in ("F32", "F16"):
            w.add_tensor(name, data.astype(np.float32 if qtype == "F32" else np.float16))
        else:
            w.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _layer_file(tmp_path, types: dict[str, str], arch: str = "qwen2"):
    """One layer of a Q4_K_M-like mix (hidden 256 so that K-quants apply): returns (path, config, raw tensors)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(5)
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (256, 256), "ffn_up": (256, 256), "ffn_down": (256, 256)}
    tensors = {}
    for n, (rows, k) in shapes.items():
        qtype = types.get(n, "Q5_0")
        if qtype == "F32":
            data = rng.standard_normal((rows, k)).astype(np.float32)
        else:
            size, per, _ = BLOCK_BYTES.get(qtype, (110, 256, []))
            data = (_random_blocks(qtype, rows, k // per, rng) if qtype in BLOCK_BYTES
                    else _q3k_blocks(rows, k // 256, rng))
        tensors[f"blk.0.{n}.weight"] = (qtype, data)
    path = tmp_path / "m.gguf"
    _write_gguf(path, arch, tensors)
    cfg = SimpleNamespace(model_type=arch, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    return path, cfg, tensors


def _q3k_blocks(rows: int, blocks: int, rng) -> np.ndarray:
    raw = rng.integers(0, 256, size=(rows, blocks, 110), dtype=np.uint8)
    raw[:, :, 108:110] = (rng.standard_normal((rows, blocks)) * 0.02).astype(np.float16).view(np.uint8).reshape(
        rows, blocks, 2)
    return raw.reshape(rows, -1)


def test_a_q4_k_m_style_mix_is_carried_exactly_from_a_file(tmp_path):
    """Q4_K q, Q6_K k, Q8_0 v packed into one QKV matmul; Q5_K gate with Q4_K up; Q6_K down: every matrix read
    from the file dequantizes bit-identically to gguf-py's reference, packing included."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    types = {"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q8_0", "attn_output": "Q5_1", "ffn_gate": "Q5_K",
             "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
    path, cfg, tensors = _layer_file(tmp_path, types)
    carried = gguf.read(path, cfg)
    assert carried.max_abs_diff == 0.0 and not carried.requantized

    def ref(n):
        qtype, raw = tensors[f"blk.0.{n}.weight"]
        return dequantize(raw, GGMLQuantizationType[qtype]).reshape(raw.shape[0], -1)

    layer = carried.layers[0]
    assert np.array_equal(layer["qkv"].dequantize(), np.concatenate([ref("attn_q"), ref("attn_k"), ref("attn_v")]))
    assert layer["qkv"].block == 16 and layer["qkv"].bits == 8  # Q6_K's blocks of 16 set the pack's form
    assert np.array_equal(layer["gate_up"].dequantize(), np.concatenate([ref("ffn_gate"), ref("ffn_up")]))
    assert np.array_equal(layer["down"].dequantize(), ref("ffn_down"))
    assert np.array_equal(layer["o"].dequantize(), ref("attn_output"))


def test_a_type_without_exact_carry_over_is_requantized_with_a_warning(tmp_path):
    path, cfg, tensors = _layer_file(tmp_path, {"ffn_down": "Q3_K", "attn_v": "F32"})
    carried = gguf.read(path, cfg)
    assert [r.name for r in carried.requantized] == ["blk.0.ffn_down.weight"]
    r = carried.requantized[0]
    assert r.source_type == "Q3_K" and 0 < r.rel_error < 0.2
    assert carried.layers[0]["down"].source_type == "RTN4"
    # a float tensor packed with block-quantized ones makes the pack float (exact)
    assert isinstance(carried.layers[0]["qkv"], np.ndarray)


def test_llama_q_and_k_rows_are_unpermuted(tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path, cfg, tensors = _layer_file(tmp_path, {}, arch="llama")
    carried = gguf.read(path, cfg)
    qtype, raw = tensors["blk.0.attn_q.weight"]
    q = dequantize(raw, GGMLQuantizationType[qtype]).reshape(256, 256)
    got = carried.layers[0]["qkv"].dequantize()[:256]
    assert np.array_equal(got, q[gguf._unpermute(256, 4)])


def test_the_gguf_layout_is_a_field_of_the_architecture_record():
    from edgekit.export import registry

    assert registry.GGUF_FAMILIES == ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
    assert registry.gguf_layout("gemma3_text") is registry.ARCHITECTURES["Gemma3ForCausalLM"].gguf_layout
    assert registry.gguf_layout("llama").permute_qk and registry.gguf_layout("phi3").qkv == ("attn_qkv",)
    assert registry.gguf_layout("gemma") is None and registry.gguf_layout("olmo2") is None


def test_an_unknown_gguf_layout_is_refused_by_name(tmp_path):
    from edgekit.runtimes.errors import UnsupportedModelError

    path, cfg, _ = _layer_file(tmp_path, {})
    cfg.model_type = "falcon"
    with pytest.raises(UnsupportedModelError, match="'falcon'.*--algo rtn"):
        gguf.read(path, cfg)


def test_a_gguf_tensor_type_never_seen_is_a_clear_error(tmp_path):
    """A file whose tensor table names a ggml type id gguf-py does not know."""
    from edgekit.runtimes.errors import UnsupportedModelError

    path, _, _ = _layer_file(tmp_path, {})
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(name) + len(name)  # then: n_dims u32, dims u64 x n, type u32
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match="bad.gguf.*type"):
        gguf.inspect(bad)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K", "Q5_1", "Q5_K"])
def test_centred_form_for_int8_activations_is_the_same_weight(qtype):
    """The int8-activation form (codes' midpoint as zero point, the offset absorbing it) holds the same weights up
    to float rounding, with a centred main term."""
    raw = _random_blocks(qtype, rows=32, blocks=256 // BLOCK_BYTES[qtype][1], rng=np.random.default_rng(6))
    w = gguf.from_ggml(raw, qtype)
    c = w.centered()
    assert np.allclose(c.dequantize(), w.dequantize(), rtol=1e-6, atol=1e-6)
    zp = np.full(c.scales.shape, 8) if c.zero_points is None else c.zero_points
    assert (zp > 0).all()


def test_tensorrt_blocks_with_negative_and_zero_scales_become_positive_ones():
    """TensorRT refuses DequantizeLinear scales <= 0; GGUF Q4_0 stores negative scales (and any block type can hold
    zero ones). The tensorrt form flips such a block's codes and moves the difference into its offset: the same
    matmul, only positive scales."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.export import tensorrt
    from edgekit.export.onnx_graph import Graph

    rng = np.random.default_rng(7)
    w = gguf.from_ggml(_random_blocks("Q4_0", rows=16, blocks=2, rng=rng), "Q4_0")
    scales = w.scales.copy()
    scales[0, 0], scales[1, :], scales[2, 1] = 0.0, -np.abs(scales[1, :]), -1e-3  # zero and negative blocks
    w = replace(w, scales=scales)
    assert (w.scales < 0).any() and (w.scales == 0).any()
    g = Graph(accuracy_level=0, dtype="float32", target="tensorrt")
    g.op_named("Identity", [g.linear("x", w, "lin")], ["y"])
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    assert tensorrt.problems(model) == []
    assert (numpy_helper.to_array(next(i for i in g.inits if i.name == "lin.scales")) > 0).all()
    x = rng.standard_normal((3, 64)).astype(np.float32)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # (float activations, as recorded)
    got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ w.dequantize().T
    assert np.allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))
