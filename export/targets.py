"""The graph targets as data: one record per target (cpu, cuda, tensorrt) saying what its graph is made of and what
the bundle records for it. The plan validates against them, the graph builder reads them, the manifest copies their
provider options; nothing else asks which target it holds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import onnx

from edgekit.export import tensorrt
from edgekit.runtimes import backend


@dataclass(frozen=True)
class Target:
    """One flavour of the decoder graph and the providers it runs on."""

    name: str
    summary: str
    providers: tuple[str, ...]  # in order of preference (recorded in the bundle; the runtime falls back down it)
    quant_formats: tuple[str, ...]  # graph forms of quantized weights it takes (METHODS' formats), default first
    # the attention form of causal layers / of block-causal (block diffusion) layers: keys of onnx_graph.ATTENTION
    attention: Literal["gqa", "plain"]
    block_attention: Literal["mha", "plain"]
    shared_kv_buffer: bool  # present K/V written in place into the past's max-length buffer (GroupQueryAttention)
    baseline: bool = False  # the reference flavour: every model kind exports to it; plan labels leave it unsaid
    fp16_quantized: bool = False  # int8/int4 exports compute (activations, KV cache) in fp16 unless told otherwise
    custom_ops: bool = True  # com.microsoft ops (fused norms, MatMulNBits, GatherBlockQuantized) may appear
    block_format: Literal["nbits", "qdq"] = "nbits"  # carried GGUF blocks: MatMulNBits | signed int4 DequantizeLinear
    # (TensorRT's blockwise DequantizeLinear is INT4: in the qdq form 8-bit blocks go dense, exact in fp32)
    # GGUF 4-bit blocks as a scale-only main term (codes centred on the default zero point 8, no zero_points input)
    # plus the block-sum offset term: the form MatMulNBits' CUDA kernels run on their fused GEMV and fpA_intB paths
    # (float zero points send them to dequantize + cuBLAS on every call)
    scale_only_4bit: bool = False
    split_8bit: bool = False  # 8-bit blocks at float activations as two 4-bit matmuls (the CPU kernels' fast path)
    accuracy_levels: bool = False  # MatMulNBits accuracy levels (int8-activation kernels) apply
    quantized_embedding: bool = False  # a GGUF's 8-bit embedding as GatherBlockQuantized (a CPU kernel)
    check: Callable[[onnx.ModelProto], None] | None = None  # refuses a graph its parser would not take whole
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # recorded in the bundle
    quantized_session_config: Mapping[str, str] = field(default_factory=dict)  # ... for int8/int4 bundles
    tensorrt_options: bool = False  # records the TensorRT EP's fp16 flag and the KV cache's shape profiles
    # its causal attention kernel takes fp32 (CUDA's GroupQueryAttention is fp16/bf16 only: an fp32 graph falls back to
    # the CPU, copying the max-length KV buffers to the host and back every layer and step)
    fp32_attention: bool = True


# grow the CUDA arena by what is asked (the default doubling wastes a Jetson's memory)
CUDA_ARENA = {backend.CUDA: {"arena_extend_strategy": "kSameAsRequested"}}

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("cpu", "onnxruntime's fused CPU kernels", ("CPUExecutionProvider",), quant_formats=("nbits", "qdq"),
           attention="gqa", block_attention="mha", shared_kv_buffer=True, baseline=True, split_8bit=True,
           accuracy_levels=True, quantized_embedding=True),
    Target("cuda", "fp16 fused kernels for the CUDA EP (scale-only 4-bit blocks: its GEMV/fpA_intB paths)",
           (backend.CUDA, "CPUExecutionProvider"), quant_formats=("nbits", "qdq"), attention="gqa",
           block_attention="mha", shared_kv_buffer=True, fp16_quantized=True, scale_only_4bit=True,
           provider_options=CUDA_ARENA, fp32_attention=False,
           quantized_session_config={"ep.cuda.fpa_intb_gemm": "1"}),  # MatMulNBits' fpA_intB kernels (fp16)
    # past ++ new K/V concatenated (no in-place buffer): its runtime copies the past per step
    Target("tensorrt", "plain standard ops that TensorRT 10.3 parses whole (run through onnxruntime's TensorRT EP)",
           (backend.TENSORRT, backend.CUDA, "CPUExecutionProvider"), quant_formats=("qdq",), attention="plain",
           block_attention="plain", shared_kv_buffer=False, fp16_quantized=True, custom_ops=False,
           block_format="qdq", check=tensorrt.check, provider_options=CUDA_ARENA, tensorrt_options=True),
)}
