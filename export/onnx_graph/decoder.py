"""Builds the ONNX graph of an AR decoder straight from its weights, in the flavour of its target (its record in
``export.targets`` picks the linear forms, the norms and the attention form).

``cpu`` / ``cuda``: onnxruntime's fused kernels (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization,
GroupQueryAttention with in-kernel rotary embedding), packed QKV and gate/up projections: about 11 ops per layer,
which is what makes decode fast on small models, where per-op overhead rivals the matmuls. ``cuda`` computes in
fp16 and writes 4-bit blocks scale-only (centred codes, no zero points) plus the block-sum min term: the form
the CUDA kernels run on their fused GEMV and fpA_intB paths.
``tensorrt``: the same model in plain standard ops that TensorRT 10.3's ONNX parser takes whole (its importers for
Attention / RMSNormalization / RotaryEmbedding and every com.microsoft op are missing there): explicit RMSNorm in
fp32, rotary embedding by gathered cos/sin rows, MatMul/Softmax attention over past + new K/V, weights as fp16/fp32
or symmetric int4 blocks behind DequantizeLinear (TensorRT's INT4 weight-only form needs zero point 0).
The attention form is the record's: ``gqa`` (causal layers of cpu / cuda), ``mha`` (their block-causal layers),
``plain`` (tensorrt, and any layer whose form cannot soft-cap the logits); see ``ATTENTION``.

I/O (names recorded in the bundle manifest):
  input_ids            int64 [B, S]
  attention_mask       int64 [B, P + S]          (1 for real tokens; P = past length)
  logits_to_keep       int64 [1]                 (how many trailing positions get logits: 1 when decoding)
  past_key_values.{i}.key / .value   float [B, kv_heads, P, head_dim]
  -> logits            float [B, logits_to_keep, V]
  -> present.{i}.key / .value        float [B, kv_heads, P + S, head_dim]

Rows of a batch are right-padded: row b's new tokens sit at positions mask_sum(b) - S ... mask_sum(b) - 1, in the
rotary embedding and in its present K/V (what GroupQueryAttention does with ``seqlens_k``; the plain graph writes
them there with ScatterElements).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit.export.onnx_graph import gqa, mha, plain
from edgekit.export.onnx_graph.ops import MS_DOMAIN, OPSET, Graph
from edgekit.export.registry import LayerWeights
from edgekit.export.targets import Target
from edgekit.export.weights import BLOCK, BlockQuantLinear
from edgekit.runtimes.bundle import KVCacheLayout

ROTARY_POSITIONS = "edgekit.rotary_positions"  # model metadata: rows of the rotary cos/sin caches


@dataclass(frozen=True)
class DecoderDims:
    """Shapes and the per-family scalars of the decoder (defaults: a Llama)."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    max_positions: int
    local_window: int = -1  # -1: full causal attention (every layer, unless layer_windows says otherwise)
    layer_windows: tuple[int, ...] = ()  # per layer: local window or -1 (empty: local_window everywhere)
    layer_rope: tuple[int, ...] = ()  # per layer: index into DecoderWeights.rope, -1 for none (empty: all 0)
    activation: str = "silu"  # MLP gate activation: silu | gelu_pytorch_tanh
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # softcap * tanh(scores / softcap); 0: off
    embed_scale: float = 1.0
    residual_scale: float = 1.0  # branch outputs multiplied before each residual add
    logits_divisor: float = 1.0
    final_softcap: float = 0.0
    # block diffusion: > 0 makes attention bidirectional inside blocks of absolute positions and causal across them
    # (a block sees every earlier block and all of itself), the attention that keeps a block dLLM's KV cache of
    # finished blocks exact; the block length of a run is the graph's ``block_length`` input, this the default.
    # 0: causal (AR)
    block_length: int = 0
    block_lengths: tuple[int, ...] = ()  # the lengths it was trained with

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else self.local_window

    def rope(self, layer: int) -> int:
        return self.layer_rope[layer] if self.layer_rope else 0


@dataclass(frozen=True)
class Rope:
    """One rotary table: ``inv_freq`` [rotary_dim / 2] (rotary_dim < head_dim: partial rotary), cos/sin scaled
    by ``scaling``. LongRoPE: ``long_inv_freq`` replaces it once the sequence is longer than ``original``."""

    inv_freq: np.ndarray
    scaling: float = 1.0
    long_inv_freq: np.ndarray | None = None
    original: int = 0


@dataclass(frozen=True)
class BuildOptions:
    """How weights are laid out in the graph.

    ``lm_head_matmul``: emit lm_head as a MatMul on its own [H, V] copy (the form onnxruntime's weight-only
    quantizers rewrite) instead of a Gemm sharing the tied embedding. ``embed_quant`` / ``lm_head_quant``: carry
    block-quantized embedding / output weights (GatherBlockQuantized / MatMulNBits). ``accuracy_level``: the
    MatMulNBits compute mode (0: float activations, 4: int8 activations, faster on CPUs with int8 dot products).
    """

    lm_head_matmul: bool = False
    dtype: str = "float32"  # float weights, activations and KV cache; "float16" for GPU targets (logits stay fp32)
    embed_quant: BlockQuantLinear | None = None
    lm_head_quant: BlockQuantLinear | None = None
    accuracy_level: int = 0
    lm_head_accuracy_level: int | None = None  # None: accuracy_level
    target: str = "cpu"  # cpu | cuda (fp16 fused kernels, scale-only 4-bit blocks) | tensorrt (plain standard ops)
    qdq_bits: int = 0  # 4: dense body weights as symmetric int4 blocks behind DequantizeLinear (lm_head stays float)
    qdq_block: int = BLOCK
    block_attention: str | None = None  # the form of block-causal layers instead of the target's (older onnxruntimes)
    split_8bit: bool | None = None  # 8-bit blocks as two 4-bit matmuls (None: the target's choice)


@dataclass(frozen=True)
class DecoderWeights:
    embed: np.ndarray  # [V, H]
    lm_head: np.ndarray | None  # [V, H]; None when tied to embed
    final_norm: np.ndarray  # [H]
    rope: tuple[Rope, ...]  # rotary tables; DecoderDims.layer_rope picks one per layer
    layers: Callable[[int], LayerWeights]  # built lazily, one layer at a time, to bound peak memory


def input_names(n_layers: int, blocks: bool = False) -> tuple[str, ...]:
    """The graph's inputs; ``blocks``: a block-diffusion graph, which also takes ``block_length`` int64 [1]."""
    kv = KVCacheLayout(n_layers, 0, 0)
    pasts = [n.format(layer=i) for i in range(n_layers) for n in (kv.past_key, kv.past_value)]
    return ("input_ids", "attention_mask", "logits_to_keep", *(("block_length",) if blocks else ()), *pasts)


def output_names(n_layers: int) -> tuple[str, ...]:
    kv = KVCacheLayout(n_layers, 0, 0)
    presents = [n.format(layer=i) for i in range(n_layers) for n in (kv.present_key, kv.present_value)]
    return ("logits", *presents)


class Attention(Protocol):
    """An attention form: built once per graph (its shared inputs: positions, masks, rotary caches), then called
    once per layer."""

    softcap: ClassVar[bool]  # whether it can soft-cap the attention logits

    def __init__(self, g: Graph, dims: DecoderDims, ropes: tuple[Rope, ...]) -> None: ...

    def layer(self, i: int, qkv: list[str], kv_io: tuple[str, str, str, str], rows: str) -> str: ...


# the attention forms a target record names (Target.attention / Target.block_attention)
ATTENTION: dict[str, type[Attention]] = {
    "gqa": gqa.GroupQueryAttention,
    "mha": mha.MultiHeadAttention,
    "plain": plain.PlainAttention,
}


def attention_form(target: Target, dims: DecoderDims, block: str | None = None) -> type[Attention]:
    """The target's form for causal or block-causal layers (``block``: another form for the latter); plain ops
    where that form cannot soft-cap the logits."""
    form = ATTENTION[(block or target.block_attention) if dims.block_length else target.attention]
    return form if form.softcap or not dims.attn_softcap else ATTENTION["plain"]


def build_decoder(
    dims: DecoderDims,
    weights: DecoderWeights,
    on_layer: Callable[[int], None] | None = None,
    options: BuildOptions | None = None,
) -> onnx.ModelProto:
    """Return the decoder ModelProto (weights inline; save with ``save_model`` to split them out)."""
    opt = options or BuildOptions()
    g = Graph(opt.accuracy_level, opt.dtype, opt.target, opt.qdq_bits, opt.qdq_block, opt.split_8bit)
    n, H, hd = dims.num_layers, dims.hidden, dims.head_dim
    f32 = TensorProto.FLOAT
    fkv = TensorProto.FLOAT16 if opt.dtype == "float16" else TensorProto.FLOAT
    attention = attention_form(g.target, dims, opt.block_attention)(g, dims, weights.rope)

    if opt.embed_quant is not None:  # [V, H] as 8-bit blocks along H
        eq = opt.embed_quant
        assert eq.bits == 8 and eq.offsets is None and eq.zero_points is None, "8-bit blocks, default zero point"
        hidden = g.op("GatherBlockQuantized", [
            g.init("model.embed_tokens.qweight", eq.codes), "input_ids",
            g.init("model.embed_tokens.scales", eq.scales)],
            domain=MS_DOMAIN, name="embed", bits=eq.bits, block_size=eq.block, gather_axis=0, quantize_axis=1)
        embed = ""
    else:
        embed = g.init("model.embed_tokens.weight", weights.embed.astype(np.float32))
        hidden = g.op("Gather", [embed, "input_ids"], name="embed")  # [B, S, H]
    # The layer bodies run on [B*S, H] (2-D) so that Gemm can fuse a matmul with an add; GroupQueryAttention
    # and the final slice need [B, S, ...], reshaped with the runtime batch and sequence sizes.
    bs = g.op("Shape", ["input_ids"])
    shape_bs_any = g.op("Concat", [bs, g.init("const.minus1", np.array([-1], np.int64))], axis=0)
    flat_shape = g.init("const.flat", np.array([-1, H], np.int64))
    hidden = g.op("Reshape", [hidden, flat_shape])  # [B*S, H]
    if dims.embed_scale != 1.0:
        hidden = g.op("Mul", [hidden, g.scalar("embed_scale", dims.embed_scale)])
    lw = weights.layers(0)
    residual = hidden
    x = hidden if lw.input_norm is None else g.norm(hidden, lw.input_norm, "model.layers.0.input_layernorm",
                                                    dims.rms_eps)
    kv = KVCacheLayout(n, dims.num_kv_heads, hd)

    def add_residual(branch: str, residual: str, norm: np.ndarray | None, norm_name: str) -> tuple[str, str]:
        """(next block's input, new residual) = (norm(residual + branch), residual + branch)."""
        if dims.residual_scale != 1.0:
            branch = g.op("Mul", [branch, g.scalar("residual_scale", dims.residual_scale)])
        if norm is None:
            total_ = g.op("Add", [branch, residual])
            return total_, total_
        return g.skip_norm(branch, residual, norm, norm_name, dims.rms_eps)

    q_width, kv_width = dims.num_heads * hd, dims.num_kv_heads * hd
    for i in range(n):
        lw_next = weights.layers(i + 1) if i + 1 < n else None
        p = f"model.layers.{i}"
        qkv = g.linear(x, lw.qkv, f"{p}/qkv", bias=lw.qkv_bias)
        split = [q_width, kv_width, kv_width]
        if lw.q_norm is not None and lw.k_norm is not None:  # q/k RMSNorm before the rotary embedding
            q, k, v = g.op("Split", [qkv, g.init(f"const.qkv_split{q_width}_{kv_width}", np.array(split, np.int64))],
                           n_out=3, axis=-1)
            q = g.head_norm(q, lw.q_norm, f"{p}.self_attn.q_norm", hd, dims.rms_eps)
            k = g.head_norm(k, lw.k_norm, f"{p}.self_attn.k_norm", hd, dims.rms_eps)
            qkv_in = [q, k, v]
        else:
            qkv_in = [qkv]  # packed [B*S, (heads + 2 kv) * head_dim]
        kv_io = (kv.past_key.format(layer=i), kv.past_value.format(layer=i), kv.present_key.format(layer=i),
                 kv.present_value.format(layer=i))
        attn_flat = attention.layer(i, qkv_in, kv_io, shape_bs_any)
        o = g.linear(attn_flat, lw.o, f"{p}/o")
        if lw.attn_out_norm is not None:
            o = g.norm(o, lw.attn_out_norm, f"{p}.attn_out_norm", dims.rms_eps)
        x, residual = add_residual(o, residual, lw.post_norm, f"{p}.post_attention_layernorm.weight")
        gate_up = g.linear(x, lw.gate_up, f"{p}/gate_up")
        gate, up = g.op("Split", [gate_up], n_out=2, axis=-1, num_outputs=2)
        if dims.activation == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        else:  # gelu_pytorch_tanh
            act = g.op("Gelu", [gate], approximate="tanh")
        down = g.linear(g.op("Mul", [act, up]), lw.down, f"{p}/down")
        if lw.mlp_out_norm is not None:
            down = g.norm(down, lw.mlp_out_norm, f"{p}.mlp_out_norm", dims.rms_eps)
        if lw_next is None:
            next_norm, next_name = weights.final_norm, "model.norm.weight"
        else:
            next_norm, next_name = lw_next.input_norm, f"model.layers.{i + 1}.input_layernorm.weight"
        x, residual = add_residual(down, residual, next_norm, next_name)
        if on_layer is not None:
            on_layer(i)
        lw = lw_next  # type: ignore[assignment]

    # logits only for the last `logits_to_keep` positions: [B, K, H] -> [B*K, H] -> Gemm(W^T) -> [B, K, V]
    x3 = g.op("Reshape", [x, g.op("Concat", [bs, g.init("const.hidden", np.array([H], np.int64))], axis=0)])
    kept = g.op("Slice", [x3, g.op("Neg", ["logits_to_keep"]), g.init("const.int64max", np.array([2**62], np.int64)),
                          "const.axis1"])
    flat = g.op("Reshape", [kept, flat_shape])
    head_w = weights.embed if weights.lm_head is None else weights.lm_head
    if opt.lm_head_quant is not None:
        logits2d = g.linear(flat, opt.lm_head_quant, "lm_head", accuracy_level=opt.lm_head_accuracy_level)
    elif opt.lm_head_matmul or not embed:  # a MatMul on its own [H, V] copy: what weight-only quantizers rewrite
        logits2d = g.linear(flat, head_w, "lm_head")
    else:  # Gemm with transB shares the (tied) embedding: no second copy of the largest matrix
        head = embed if weights.lm_head is None else g.init("lm_head.weight", weights.lm_head.astype(np.float32))
        logits2d = g.op("Gemm", [flat, head], transB=1, name="lm_head")
    if dims.logits_divisor != 1.0:
        logits2d = g.op("Div", [logits2d, g.scalar("logits_divisor", dims.logits_divisor)])
    if dims.final_softcap:
        cap = g.scalar("final_softcap", dims.final_softcap)
        logits2d = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits2d, cap])]), cap])
    out_shape = g.op("Concat", [g.op("Shape", [kept], start=0, end=2),
                                g.init("const.vocab", np.array([dims.vocab_size], np.int64))], axis=0)
    if opt.dtype == "float32":
        g.op_named("Reshape", [logits2d, out_shape], ["logits"])
    else:  # logits leave the graph in fp32 whatever the compute dtype
        g.op_named("Cast", [g.op("Reshape", [logits2d, out_shape])], ["logits"], to=TensorProto.FLOAT)

    B, S, P, T, K = "batch", "sequence", "past_sequence", "total_sequence", "kept"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, T]),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    if dims.block_length:
        inputs.append(helper.make_tensor_value_info("block_length", TensorProto.INT64, [1]))
    outputs = [helper.make_tensor_value_info("logits", f32, [B, K, dims.vocab_size])]
    for i in range(n):
        for name in (kv.past_key, kv.past_value):
            inputs.append(helper.make_tensor_value_info(name.format(layer=i), fkv, [B, dims.num_kv_heads, P, hd]))
        for name in (kv.present_key, kv.present_value):
            outputs.append(helper.make_tensor_value_info(name.format(layer=i), fkv, [B, dims.num_kv_heads, T, hd]))
    graph = helper.make_graph(g.nodes, "edgekit_decoder", inputs, outputs, initializer=g.inits)
    domains = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if g.target.custom_ops else [])
    model = helper.make_model(graph, opset_imports=domains, producer_name="edgekit")
    model.ir_version = 10
    # what the runtime checks the manifest against (initializers are out of a torch-free runtime's reach)
    helper.set_model_props(model, {ROTARY_POSITIONS: str(dims.max_positions)})
    return model



def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save with weights in one external ``<name>.data`` file; return the files written (names relative to dir)."""
    data_name = path.name + ".data"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
        size_threshold=1024,
    )
    return [path.name, data_name]

