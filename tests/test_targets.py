"""Graph flavours for GPU targets, checked on the CPU provider: the tensorrt flavour (plain standard ops TensorRT 10.3
parses whole) of every family against PyTorch and against the fused graph; the provider options, TensorRT profiles
and engine-cache paths the bundle records; what the targets refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ARCHS
from edgekit.export import tensorrt
from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.runtimes import backend, load
from edgekit.runtimes.bundle import MANIFEST_FILE, KVCacheLayout, RuntimeSpec
from edgekit.runtimes.errors import BundleError, ConfigError

PROMPTS = ["Hello there, how are you?", "Why is the sky blue? Rayleigh", "def reverse(s):", "请用一句话介绍"]


def _export(src: Path, out: Path, verify: bool = False, **kw):
    from edgekit.parity import verifier

    return export_bundle(ExportConfig(source=str(src), output=out, **kw), verify=verifier(16) if verify else None,
                         progress=Silent())


@pytest.mark.parametrize("arch", ARCHS)
def test_tensorrt_flavour_of_each_architecture_passes_fp32_parity(tiny_model, tmp_path, arch):
    res = _export(tiny_model(arch), tmp_path / "b", verify=True, target="tensorrt")
    report = res.manifest.parity
    assert report["passed"], report["misses"]
    assert report["summary"]["max_abs_diff"] <= 1e-3 and report["summary"]["tokens_identical"] == 1.0
    graph = onnx.load(str(res.path / "model.onnx"), load_external_data=False)
    assert tensorrt.problems(graph) == []
    assert {o.domain for o in graph.opset_import} == {""}
    m = res.manifest
    assert m.runtime.target == "tensorrt" and m.runtime.providers[0] == "TensorrtExecutionProvider"
    assert m.kv_cache.shared_buffer is False  # past ++ new: the copying loop
    # logits_to_keep is a Slice start, so a shape tensor for TensorRT: the profile gives its values (1..max_context)
    assert tensorrt.shape_inputs(graph) == {"logits_to_keep"}
    trt = m.runtime.provider_options["TensorrtExecutionProvider"]
    assert [_profiles(trt[f"trt_profile_{k}_shapes"])["logits_to_keep"] for k in ("min", "opt", "max")] == [
        [(1,)], [(1,)], [(m.max_context,)]]


def test_a_shape_tensor_input_without_profile_values_is_refused():
    """A graph input that reaches a Slice start (or a Reshape shape, through arithmetic) is a TensorRT shape tensor;
    one the runtime's profile does not give values for is a problem at export, not an engine build failure."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [onnx.numpy_helper.from_array(np.array([2**62], np.int64), "end"),
             onnx.numpy_helper.from_array(np.array([0], np.int64), "axis")]
    nodes = [helper.make_node("Neg", ["k"], ["negk"]), helper.make_node("Add", ["negk", "negk"], ["start"]),
             helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Reshape", ["x", "xs"], ["xr"]),
             helper.make_node("Slice", ["xr", "start", "end", "axis"], ["y"])]
    graph = helper.make_model(helper.make_graph(nodes, "g", [x, k], [y], inits))
    assert tensorrt.shape_inputs(graph) == {"k"}  # (x reaches the Reshape only through Shape: its dims, not values)
    assert any("'k' is a TensorRT shape tensor" in p for p in tensorrt.problems(graph))


def _batched(model, prompts, max_new_tokens=16):
    batch = model.new_batch(len(prompts))
    seqs = []
    for text in prompts:
        ids = model.tokenizer.encode(text)
        seq = model.new_sequence(ids, model.params(len(ids), max_new_tokens=max_new_tokens, temperature=0.0))
        batch.admit(seq)
        batch.step()  # rows of different lengths decode together (right padding)
        seqs.append(seq)
    while batch.active:
        batch.step()
    return [list(s.stats.token_ids) for s in seqs]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM"])  # (Gemma 2: windows and soft-caps)
def test_tensorrt_flavour_decodes_batches_like_the_fused_graph(tiny_model, tiny_bundle, tmp_path, arch):
    """Rows of different lengths in one graph run: the plain graph writes each row's new K/V at its own position
    and masks by position, as GroupQueryAttention does."""
    fused = load(tiny_bundle(arch))
    plain = load(_export(tiny_model(arch), tmp_path / "b", target="tensorrt").path)
    assert _batched(plain, PROMPTS) == _batched(fused, PROMPTS)
    text = PROMPTS[1]
    assert plain.generate(text, max_new_tokens=16, temperature=0.9, seed=4) == fused.generate(
        text, max_new_tokens=16, temperature=0.9, seed=4)


def test_tensorrt_int4_is_symmetric_weight_only_qdq(tiny_model, tmp_path):
    res = _export(tiny_model(), tmp_path / "b", precision="int4", target="tensorrt")
    graph = onnx.load(str(res.path / "model.onnx"))
    assert tensorrt.problems(graph) == []
    inits = {i.name: i for i in graph.graph.initializer}
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * 4  # qkv, o, gate_up, down per layer; lm_head stays fp16
    assert {inits[n.input[0]].data_type for n in dq} == {onnx.TensorProto.INT4}
    assert all(len(n.input) == 2 for n in dq)  # no zero point: TensorRT's INT4 needs 0
    assert {inits[n.input[1]].data_type for n in dq} == {onnx.TensorProto.FLOAT16}
    m = res.manifest
    assert m.quantization.format == "qdq" and m.kv_cache.dtype == "float16"
    assert m.runtime.provider_options["TensorrtExecutionProvider"]["trt_fp16_enable"] == "True"
    assert m.runtime.session_config == {"session.qdq_matmulnbits_accuracy_level": "0"}  # (CPU/CUDA fusion: exact)
    assert m.extra["quality"]["top1"] > 0.3  # (random tiny weights lose much to int4; chance is 1/400)


def test_cuda_flavour_records_its_providers_and_runs_on_cpu(tiny_model, tmp_path):
    res = _export(tiny_model(), tmp_path / "b", precision="int4", target="cuda")
    m = res.manifest
    assert m.runtime.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert m.runtime.session_config == {"ep.cuda.fpa_intb_gemm": "1"}
    assert m.kv_cache.dtype == "float16" and m.kv_cache.shared_buffer and m.quantization.accuracy_level == 0
    assert isinstance(load(res.path).generate("Hello", max_new_tokens=4), str)


def test_gpu_device_profiles_default_to_the_cuda_target(tiny_model, tmp_path):
    m = _export(tiny_model(), tmp_path / "b", device="jetson-orin-nano-8gb").manifest
    assert m.runtime.target == "cuda" and m.precision == "int4" and m.kv_cache.dtype == "float16"


@pytest.mark.parametrize("kw, message", [
    (dict(precision="int8", target="tensorrt"), "static W8A8.*28% top-1"),
    (dict(precision="int8", algo="rtn", quant_format="qdq"), "static W8A8.*is refused.*28% top-1"),
    (dict(precision="int4", target="tensorrt", quant_format="nbits"), "MatMulNBits, which TensorRT cannot parse"),
    (dict(precision="int4", target="cuda", accuracy_level=4), "int8-activation CPU kernels"),
    (dict(target="cuda"), "--target cuda computes attention with GroupQueryAttention, whose CUDA kernel takes "
                          "fp16/bf16 only"),
    (dict(precision="int4", target="cuda", kv_cache="fp32"), "whose CUDA kernel takes fp16/bf16 only"),
    (dict(target="gpu"), "Unknown target 'gpu'"),
])
def test_targets_refuse_what_they_cannot_run(tiny_model, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        _export(tiny_model(), tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()


def test_the_export_targets_table_and_the_runtimes_manifest_choices_agree():
    """The runtime floor keeps its own tuple of target names (it cannot import export): the two must not drift."""
    from edgekit.export.targets import TARGETS
    from edgekit.runtimes import bundle

    assert set(TARGETS) == set(bundle.TARGETS)
    assert all(t.providers[-1] == "CPUExecutionProvider" for t in TARGETS.values())  # the runtime's last resort


def _profiles(option: str) -> dict[str, list[tuple[int, ...]]]:
    out: dict[str, list[tuple[int, ...]]] = {}
    for item in option.split(","):
        name, dims = item.split(":")
        out.setdefault(name, []).append(tuple(int(d) for d in dims.split("x")))
    return out


def test_one_tensorrt_profile_covers_prefill_decode_and_the_servers_rows():
    """onnxruntime's TensorRT EP stays on profile 0: one profile from one token on an empty past to a long prompt
    and to every row a server's step runs (max batch + prefix-cache rows)."""
    layout = KVCacheLayout(num_layers=2, num_kv_heads=3, head_dim=64)
    opts = backend.tensorrt_profiles(layout, max_context=2048, max_batch=4)
    lo, opt, hi = (_profiles(opts[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    names = {"input_ids", "attention_mask", "logits_to_keep",
             *(f"past_key_values.{i}.{t}" for i in range(2) for t in ("key", "value"))}
    assert set(lo) == set(opt) == set(hi) == names
    for name in names:
        assert len(lo[name]) == len(opt[name]) == len(hi[name]) == 1  # one profile
        assert all(x <= y <= z for x, y, z in zip(lo[name][0], opt[name][0], hi[name][0])), name
    assert hi["input_ids"] == [(12, 2048)] and opt["input_ids"] == [(4, 1)]  # 4 + 8 prefix rows; tuned for decode
    assert hi["past_key_values.0.key"] == [(12, 3, 2047, 64)] and lo["past_key_values.0.key"] == [(1, 3, 0, 64)]
    assert (lo["logits_to_keep"], opt["logits_to_keep"], hi["logits_to_keep"]) == ([(1,)], [(1,)], [(2048,)])
    spec = RuntimeSpec(provider_options={"TensorrtExecutionProvider": opts})
    assert backend.tensorrt_rows(spec) == 12
    backend.check_rows(spec, 12, ["TensorrtExecutionProvider"])
    backend.check_rows(spec, 16, ["CPUExecutionProvider"])  # (TensorRT does not run it: no limit)
    with pytest.raises(ConfigError, match="needs 16 KV rows .* TensorRT profile covers 12.*--batch 8"):
        backend.check_rows(spec, 16, ["TensorrtExecutionProvider", "CPUExecutionProvider"])


def test_provider_list_puts_the_engine_cache_beside_the_bundle(tmp_path):
    spec = RuntimeSpec(providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                       target="tensorrt", provider_options={"TensorrtExecutionProvider": {"trt_fp16_enable": "True"},
                                                            "CUDAExecutionProvider": {"arena_extend_strategy":
                                                                                      "kSameAsRequested"}})
    bundle = tmp_path / "qwen-int4"
    got = dict(backend.provider_list(spec.providers, spec, bundle, backend.BackendOptions()))
    trt = got["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] == "True" and trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path / "qwen-int4.trt-cache")
    assert got["CUDAExecutionProvider"] == {"arena_extend_strategy": "kSameAsRequested"}
    assert got["CPUExecutionProvider"] == {}
    elsewhere = backend.BackendOptions(engine_cache=tmp_path / "engines")
    assert dict(backend.provider_list(spec.providers, spec, bundle, elsewhere))["TensorrtExecutionProvider"][
        "trt_engine_cache_path"] == str(tmp_path / "engines")


@pytest.mark.parametrize("runtime, message", [
    ({"provider_options": {"TensorrtExecutionProvider": {"trt_engine_cache_path": "/etc"}}},
     "'provider_options.TensorrtExecutionProvider' sets 'trt_engine_cache_path', which a bundle may not set"),
    ({"provider_options": {"CUDAExecutionProvider": {"arena_extend_strategy": 3}}}, "an object of string objects"),
    ({"session_config": {"session.load_model_format": "ORT"}}, "sets 'session.load_model_format'"),
    ({"target": "fpga"}, "'target' must be one of cpu, cuda, tensorrt"),
])
def test_a_manifest_cannot_set_arbitrary_runtime_options(llama_bundle, tmp_path, runtime, message):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(llama_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["runtime"].update(runtime)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load(bundle)


def test_missing_gpu_provider_falls_back_to_cpu_with_a_warning(tiny_model, tmp_path, capsys):
    model = load(_export(tiny_model(), tmp_path / "b", precision="fp16", target="cuda").path)
    assert model.graph.session.get_providers() == ["CPUExecutionProvider"]
    assert "prefers CUDAExecutionProvider" in capsys.readouterr().err
    assert np.isfinite(model.graph.forward([1, 2, 3], model.graph.new_cache())).all()


def test_gpu_device_check_skips_cleanly_without_a_gpu(llama_bundle):
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "benchmarks" / "gpu.py"
    out = subprocess.run([sys.executable, str(script), "--bundles", str(llama_bundle)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "No GPU execution provider" in out.stdout and "skipped the CUDA and TensorRT checks" in out.stdout
    sys.path.insert(0, str(script.parent))
    import gpu

    runs, skipped = gpu.plan([llama_bundle], ["CPUExecutionProvider"])
    assert runs == [(llama_bundle, "CPUExecutionProvider")] and not skipped
    runs, skipped = gpu.plan([llama_bundle], ["CUDAExecutionProvider"])
    assert not runs and "CPUExecutionProvider is not in this onnxruntime build" in skipped[0]


def test_doctor_says_where_a_tensorrt_bundle_runs_and_whether_its_engines_exist(tiny_model, tmp_path):
    from test_doctor import jetson

    from edgekit.doctor import inspect

    bundle = _export(tiny_model(), tmp_path / "trt", target="tensorrt").path
    root = jetson(tmp_path / "root", "NVIDIA Jetson Orin Nano Developer Kit", 7_800_000)
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    m = inspect(root, providers=gpu, arch="aarch64", bundle=bundle)
    assert m.bundle["runs_on"] == "TensorrtExecutionProvider" and m.bundle["target"] == "tensorrt"
    assert "none built yet" in m.bundle["engine_cache"] and "trt.trt-cache" in m.bundle["engine_cache"]
    (tmp_path / "trt.trt-cache").mkdir()
    (tmp_path / "trt.trt-cache" / "TensorrtExecutionProvider_TRTKernel_graph_0.engine").write_bytes(b"x")
    m = inspect(root, providers=gpu, arch="aarch64", bundle=bundle)
    assert m.bundle["engine_cache"].startswith("1 TensorRT engine(s)") and "engines" in m.table()
    cpu = inspect(root, providers=["CPUExecutionProvider"], arch="aarch64", bundle=bundle)
    assert cpu.bundle["runs_on"] == "CPUExecutionProvider" and cpu.bundle["fallback"]


def test_spin_false_lets_onnxruntime_threads_sleep_between_runs(llama_bundle):
    """``edgekit serve`` loads with spin=False (its HTTP side shares the cores); the library default is ORT's."""
    from edgekit.serve import ServeConfig

    key = "session.intra_op.allow_spinning"
    quiet = load(llama_bundle, spin=False).graph.session.get_session_options()
    assert quiet.get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: onnxruntime spins
        load(llama_bundle).graph.session.get_session_options().get_session_config_entry(key)
    assert ServeConfig(bundle=llama_bundle).spin is False
