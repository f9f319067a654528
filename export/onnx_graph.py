"""Builds the ONNX graph of an AR decoder straight from its weights, in the flavour of its target.

``cpu`` / ``cuda``: onnxruntime's fused kernels (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization,
GroupQueryAttention with in-kernel rotary embedding), packed QKV and gate/up projections: about 11 ops per layer,
which is what makes decode fast on small models, where per-op overhead rivals the matmuls. ``cuda`` computes in
fp16 and folds GGUF mins into float zero points (one MatMulNBits per linear, the CUDA kernels' fast form).
``tensorrt``: the same model in plain standard ops that TensorRT 10.3's ONNX parser takes whole (its importers for
Attention / RMSNormalization / RotaryEmbedding and every com.microsoft op are missing there): explicit RMSNorm in
fp32, rotary embedding by gathered cos/sin rows, MatMul/Softmax attention over past + new K/V, weights as fp16/fp32
or symmetric int4 blocks behind DequantizeLinear (TensorRT's INT4 weight-only form needs zero point 0).

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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.export.registry import LayerWeights
from edgekit.export.weights import BLOCK, BlockQuantLinear
from edgekit.runtimes.bundle import KVCacheLayout

OPSET = 21  # 21: int4 tensors and blockwise DequantizeLinear
MS_DOMAIN = "com.microsoft"
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
    target: str = "cpu"  # cpu | cuda (fp16 fused kernels, float zero points) | tensorrt (plain standard ops)
    qdq_bits: int = 0  # 4: dense body weights as symmetric int4 blocks behind DequantizeLinear (lm_head stays float)
    qdq_block: int = BLOCK


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


class _Graph:
    """A tiny node/initializer accumulator with unique names."""

    def __init__(self, accuracy_level: int = 0, dtype: str = "float32", target: str = "cpu", qdq_bits: int = 0,
                 qdq_block: int = BLOCK) -> None:
        self.float_dtype = np.dtype(dtype)
        self.target, self.plain = target, target == "tensorrt"
        self.qdq_bits, self.qdq_block = qdq_bits, qdq_block
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0
        self.accuracy_level = accuracy_level
        self._names: set[str] = set()
        self._block_sums: dict[str, str] = {}  # input name -> its per-32-block sums, shared by the matmuls reading it

    def linear(self, x: str, w: np.ndarray | BlockQuantLinear, name: str, bias: np.ndarray | None = None,
               accuracy_level: int | None = None) -> str:
        """y = x @ w^T (+ bias) for a dense [N, K] array or a block-quantized weight."""
        level = self.accuracy_level if accuracy_level is None else accuracy_level
        if isinstance(w, np.ndarray):
            weight = (self.dequantize_linear(w, name, self.qdq_bits) if self.qdq_bits and name != "lm_head"
                      else self.init(f"{name}.weight", w.T.astype(np.float32)))
            y = self.op("MatMul", [x, weight], name=name)
        elif self.plain:
            return self._with_bias(self.dequantized_blocks(x, w, name), bias, name)
        else:
            n, k = w.shape
            folded = w.float_zero_points() if self.target == "cuda" and w.bits == 4 else None
            if folded is not None:  # the min as a float zero point: one op, no correction
                return self._with_bias(self.matmul_nbits(x, w, name, level, folded), bias, name)
            if level >= 4:  # int8 activations: a centred main term (see BlockQuantLinear.centered)
                w = w.centered()
            # 8-bit blocks with float activations on the CPU: two 4-bit matmuls (its 8-bit kernel is a slow fallback)
            split = w.nibbles() if level < 4 and self.target == "cpu" else None
            y = self.matmul_nbits(x, split[0] if split else w, name, level)
            if split is not None:
                y = self.op("Add", [y, self.matmul_nbits(x, split[1], f"{name}.high", level)])
            if w.offsets is not None:  # the per-block min term: y += block_sums(x) @ offsets^T
                corr = self.op("MatMul", [self.block_sums(x, k, w.block),
                                          self.init(f"{name}.block_offsets", w.offsets.T)])
                y = self.op("Add", [y, corr])  # (measured faster than one Gemm with C=y on onnxruntime 1.31 CPU)
        return self._with_bias(y, bias, name)

    def _with_bias(self, y: str, bias: np.ndarray | None, name: str) -> str:
        return y if bias is None else self.op("Add", [y, self.init(f"{name}.bias", bias.astype(np.float32))])

    def matmul_nbits(self, x: str, w: BlockQuantLinear, name: str, level: int,
                     folded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> str:
        """x @ (scale * (code - zero_point))^T, without the offset term; ``folded``: (codes, scales, float zero
        points) that carry the offset too."""
        n, k = w.shape
        if folded is not None:
            w = replace(w, codes=folded[0], scales=folded[1])
        inputs = [x, self.init(f"{name}.qweight", w.packed), self.init(f"{name}.scales", w.scales.reshape(-1))]
        zp = w.packed_zero_points() if folded is None else folded[2]
        if zp is not None:
            inputs.append(self.init(f"{name}.zero_points", zp.reshape(-1)))
        return self.op("MatMulNBits", inputs, domain=MS_DOMAIN, name=name, K=k, N=n, bits=w.bits,
                       block_size=w.block, accuracy_level=level)

    def dequantize_linear(self, w: np.ndarray, name: str, bits: int) -> str:
        """A dense [N, K] weight as symmetric ``bits``-bit blocks along K (round to nearest, zero point 0) behind a
        blockwise DequantizeLinear giving the [K, N] MatMul operand: TensorRT's weight-only INT4 form."""
        n, k = w.shape
        block = self.qdq_block
        top = (1 << (bits - 1)) - 1
        blocks = w.astype(np.float32).reshape(n, k // block, block)
        scale = np.abs(blocks).max(axis=-1) / top  # [N, K / block]
        scale = np.where(scale == 0, 1.0, scale).astype(self.float_dtype).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, :, None]), -top - 1, top).astype(np.int8)
        return self._dq(q.reshape(n, k), scale, name, block)

    def _dq(self, q: np.ndarray, scale: np.ndarray, name: str, block: int) -> str:
        """DequantizeLinear of signed int4 codes q [N, K] (blocks of ``block`` along K, scales [N, K / block]) into
        the [K, N] MatMul operand, zero point 0."""
        n, k = q.shape
        qname = f"{name}.qweight"
        self._names.add(qname)
        self.inits.append(helper.make_tensor(qname, TensorProto.INT4, [k, n], q.T.reshape(-1).tolist()))
        return self.op("DequantizeLinear", [qname, self.init(f"{name}.scales", np.ascontiguousarray(scale.T))],
                       axis=0, block_size=block)

    def dequantized_blocks(self, x: str, w: BlockQuantLinear, name: str) -> str:
        """x @ w^T for GGUF blocks in TensorRT's form: 4-bit codes centred on 8 are signed int4 behind
        DequantizeLinear (zero point 0, as TensorRT requires), the min and any other zero point go into a per-block
        offset term, block sums of x times the offsets (plain ops); 8-bit blocks (TensorRT's blockwise
        DequantizeLinear is INT4) become dense weights, exact in fp32."""
        n, k = w.shape
        if w.bits == 8:
            return self.op("MatMul", [x, self.init(f"{name}.weight", w.dequantize().T)], name=name)
        # s (c - z) + o = s (c - 8) + [o + s (8 - z)]: codes centred on 8, the rest into the per-block offset
        zp = np.full(w.scales.shape, 8, np.float32) if w.zero_points is None else w.zero_points.astype(np.float32)
        offsets = (w.offsets if w.offsets is not None else 0) + w.scales * (8 - zp)
        q = (w.codes.astype(np.int16) - 8).astype(np.int8)
        y = self.op("MatMul", [x, self._dq(q, w.scales, name, w.block)], name=name)
        if not np.any(offsets):
            return y
        corr = self.op("MatMul", [self.block_sums(x, k, w.block), self.init(f"{name}.block_offsets",
                                                                            offsets.T.astype(np.float32))])
        return self.op("Add", [y, corr])

    def block_sums(self, x: str, k: int, block: int = BLOCK) -> str:
        """[M, K] -> [M, K / block]: sums of x over each block of input features, shared by matmuls reading x."""
        key = f"{x}/{block}"
        if key not in self._block_sums:
            shape = self.init(f"const.blocks{k}_{block}", np.array([0, k // block, block], np.int64))
            last = self.init("const.axis_last", np.array([-1], np.int64))
            self._block_sums[key] = self.op("ReduceSum", [self.op("Reshape", [x, shape]), last], keepdims=0)
        return self._block_sums[key]

    def scalar(self, name: str, value: float) -> str:
        """A float constant in the compute dtype."""
        return self.init(f"const.{name}", np.array(value, self.float_dtype))

    def norm(self, x: str, w: np.ndarray, name: str, eps: float) -> str:
        """RMSNorm over the last axis (statistics in fp32 whatever the compute dtype)."""
        weight = self.init(name if name.endswith(".weight") else f"{name}.weight", w)
        if not self.plain:
            return self.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)
        half = self.float_dtype != np.float32
        x32 = self.op("Cast", [x], to=TensorProto.FLOAT) if half else x
        last = self.init("const.axis_last", np.array([-1], np.int64))
        mean = self.op("ReduceMean", [self.op("Mul", [x32, x32]), last], keepdims=1)
        eps_ = self.init(f"const.eps{eps:g}", np.array(eps, np.float32))
        normed = self.op("Mul", [x32, self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [mean, eps_])])])])
        return self.op("Mul", [self.op("Cast", [normed], to=TensorProto.FLOAT16) if half else normed, weight])

    def skip_norm(self, branch: str, residual: str, w: np.ndarray, name: str, eps: float) -> tuple[str, str]:
        """(norm(residual + branch), residual + branch)."""
        if self.plain:
            total = self.op("Add", [branch, residual])
            return self.norm(total, w, name, eps), total
        out, _, _, total = self.op("SkipSimplifiedLayerNormalization", [branch, residual, self.init(name, w)],
                                   n_out=4, domain=MS_DOMAIN, epsilon=eps)
        return out, total

    def head_norm(self, x: str, w: np.ndarray, name: str, head_dim: int, eps: float) -> str:
        """RMSNorm of [M, heads * head_dim] per head (w: [head_dim]) or over the whole row (w: [heads * hd])."""
        if w.shape[0] != head_dim:
            return self.norm(x, w, name, eps)
        width = self.op("Shape", [x], start=1, end=2)
        per_head = self.op("Reshape", [x, self.init(f"const.heads{head_dim}", np.array([-1, head_dim], np.int64))])
        normed = self.norm(per_head, w, name, eps)
        return self.op("Reshape", [normed, self.op("Concat", [self.init("const.minus1", np.array([-1], np.int64)),
                                                              width], axis=0)])

    def init(self, name: str, arr: np.ndarray) -> str:
        if name in self._names:
            assert name.startswith("const."), f"duplicate initializer {name}"  # shared constants are reused
            return name
        self._names.add(name)
        if arr.dtype == np.float32 and not name.startswith("const."):
            arr = arr.astype(self.float_dtype)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str = "", **attrs):
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = [f"{base}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_named(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", name: str = "",
                 **attrs) -> None:
        self._n += 1
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name or f"{op_type}_{self._n}",
                                           domain=domain or None, **attrs))


def build_decoder(
    dims: DecoderDims,
    weights: DecoderWeights,
    on_layer: Callable[[int], None] | None = None,
    options: BuildOptions | None = None,
) -> onnx.ModelProto:
    """Return the decoder ModelProto (weights inline; save with ``save_model`` to split them out)."""
    opt = options or BuildOptions()
    g = _Graph(opt.accuracy_level, opt.dtype, opt.target, opt.qdq_bits, opt.qdq_block)
    n, H, hd = dims.num_layers, dims.hidden, dims.head_dim
    f32 = TensorProto.FLOAT
    fkv = TensorProto.FLOAT16 if opt.dtype == "float16" else TensorProto.FLOAT

    # seqlens_k: [B] int32 = valid tokens - 1; total_sequence_length: scalar int32
    if not g.plain and not dims.block_length:
        mask_sum = g.op("ReduceSum", ["attention_mask", g.init("const.axis1", np.array([1], np.int64))], keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [mask_sum, g.init("const.one", np.array(1, np.int64))])],
                       to=TensorProto.INT32)
    total = g.op("Shape", ["attention_mask"], start=1, end=2)
    total = g.op("Cast", [g.op("Squeeze", [total, g.init("const.axis0", np.array([0], np.int64))])],
                 to=TensorProto.INT32)
    tables = [_rotary(g, j, rope, dims.max_positions, total) for j, rope in enumerate(weights.rope)]
    # (block attention exists in plain ops only for now, inside either flavour)
    plain = (_PlainAttention(g, dims, tables, [r.inv_freq.shape[0] for r in weights.rope])
             if g.plain or dims.block_length else None)

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
        if plain is not None:
            if len(qkv_in) == 1:
                qkv_in = g.op("Split", [qkv, g.init(f"const.qkv_split{q_width}_{kv_width}",
                                                    np.array(split, np.int64))], n_out=3, axis=-1)
            attn_flat = plain.layer(i, qkv_in, *kv_io)
        else:
            table = dims.rope(i)
            cos, sin = tables[table] if table >= 0 else ("", "")
            attrs = dict(num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads, do_rotary=int(table >= 0),
                         rotary_interleaved=0, local_window_size=dims.window(i))
            if dims.attn_scale is not None:
                attrs["scale"] = float(dims.attn_scale)
            if dims.attn_softcap:
                attrs["softcap"] = float(dims.attn_softcap)
            qkv_in = [g.op("Reshape", [t, shape_bs_any]) for t in qkv_in] + [""] * (3 - len(qkv_in))
            # present K/V are the graph outputs themselves (no Identity copy), so a runtime that binds one max-length
            # buffer as both past and present gets GroupQueryAttention's in-place shared-buffer mode
            attn_out = f"{p}/attn/out0"
            g.op_named("GroupQueryAttention", [*qkv_in, kv_io[0], kv_io[1], seqlens, total, cos, sin],
                       [attn_out, kv_io[2], kv_io[3]], domain=MS_DOMAIN, name=f"{p}/attn", **attrs)
            attn_flat = g.op("Reshape", [attn_out, g.init("const.flat_attn", np.array([-1, q_width], np.int64))])
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
    domains = [helper.make_opsetid("", OPSET)] + ([] if g.plain else [helper.make_opsetid(MS_DOMAIN, 1)])
    model = helper.make_model(graph, opset_imports=domains, producer_name="edgekit")
    model.ir_version = 10
    # what the runtime checks the manifest against (initializers are out of a torch-free runtime's reach)
    helper.set_model_props(model, {ROTARY_POSITIONS: str(dims.max_positions)})
    return model


class _PlainAttention:
    """Grouped-query attention that takes batched rows of several new tokens on a past, with the rotary embedding
    and the KV write done as GroupQueryAttention does them (row b's new tokens at its own positions): causal
    (optionally sliding-window, soft-capped) for the tensorrt flavour, or block-causal (block diffusion). Plain ops
    for TensorRT; com.microsoft RotaryEmbedding + MultiHeadAttention in the onnxruntime flavours."""

    def __init__(self, g: _Graph, dims: DecoderDims, tables: list[tuple[str, str]], halves: list[int]) -> None:
        self.g, self.dims, self.tables, self.halves = g, dims, tables, halves  # halves: rotary_dim / 2 per table
        i64 = lambda name, v: g.init(f"const.{name}", np.array(v, np.int64))  # noqa: E731
        self.i64 = i64
        seq = g.op("Shape", ["input_ids"], start=1, end=2)  # [1] = S
        mask_sum = g.op("ReduceSum", ["attention_mask", i64("axis1", [1])], keepdims=1)  # [B, 1]
        self.valid = mask_sum  # positions 0 .. valid - 1 of each row hold tokens
        zero, one = i64("zero", 0), i64("one", 1)
        # qpos [B, S] = valid length - S + (0 .. S-1): the positions of the new tokens
        steps = g.op("Range", [zero, g.op("Squeeze", [seq, i64("axis0", [0])]), one])
        self.qpos = g.op("Add", [g.op("Sub", [mask_sum, seq]), steps])
        width = g.op("Squeeze", [g.op("Shape", ["attention_mask"], start=1, end=2), i64("axis0", [0])])
        self.kpos = g.op("Range", [zero, width, one])  # [T]
        self.shape_bs = g.op("Shape", ["input_ids"])  # [2] = B, S
        self._bias: dict[int, str] = {}
        self._untiled: dict[int, str] = {}
        self._half: dict[str, str] = {}  # fp32 bias -> its fp16 cast
        self._kv_index: str | None = None
        self._rope: dict[int, tuple[str, str]] = {}

    def bias(self, window: int, tiled: bool = True) -> str:
        """[B, 1, G * S, T] additive mask (0 or the fp32 minimum), G = heads per KV head (``tiled=False``:
        [B, 1, S, T]): key t is visible to the query at position p when t <= p (and t > p - window); with blocks of
        L: when t // L <= p // L and t is one of the row's valid positions."""
        if window not in self._untiled:
            g, i64 = self.g, self.i64
            q = g.op("Unsqueeze", [self.qpos, i64("axis2", [2])])  # [B, S, 1]
            if self.dims.block_length:  # the run's block length is an input: one model may serve several
                block = g.op("Squeeze", ["block_length", i64("axis0", [0])])
                ends = g.op("Mul", [g.op("Add", [g.op("Div", [q, block]), i64("one", 1)]), block])  # block end
                seen = g.op("And", [g.op("Less", [self.kpos, ends]), g.op("Less", [self.kpos, g.op(
                    "Unsqueeze", [self.valid, i64("axis2", [2])])])])
            else:
                seen = g.op("LessOrEqual", [self.kpos, q])  # [B, S, T]
            if window > 0:
                recent = g.op("Greater", [self.kpos, g.op("Sub", [q, i64(f"window{window}", window)])])
                seen = g.op("And", [seen, recent])
            lowest = g.init("const.f32min", np.array(np.finfo(np.float32).min, np.float32))
            bias = g.op("Where", [seen, g.init("const.f32zero", np.array(0.0, np.float32)), lowest])
            self._untiled[window] = g.op("Unsqueeze", [bias, i64("axis1", [1])])  # [B, 1, S, T]
        if not tiled:
            return self._untiled[window]
        if window not in self._bias:
            groups = self.dims.num_heads // self.dims.num_kv_heads
            self._bias[window] = self.g.op("Tile", [self._untiled[window], self.i64(f"tile_groups{groups}",
                                                                                    [1, 1, groups, 1])])
        return self._bias[window]

    def write_kv(self, past_k: str, past_v: str, k: str, v: str, present_k: str, present_v: str) -> None:
        """present = past ++ new [B, KV, P + S, hd], then the new rows written at each row's own positions (right
        padding), for K and V."""
        g = self.g
        if self._kv_index is None:  # [B, KV, S, hd] of the new positions, the same for every layer's K and V
            where = g.op("Unsqueeze", [self.qpos, self.i64("axes13", [1, 3])])  # [B, 1, S, 1]
            self._kv_index = g.op("Expand", [where, g.op("Shape", [k])])
        for past, new, present in ((past_k, k, present_k), (past_v, v, present_v)):
            g.op_named("ScatterElements", [g.op("Concat", [past, new], axis=2), self._kv_index, new], [present],
                       axis=2)

    def rope(self, table: int) -> tuple[str, str]:
        """cos/sin rows of the new positions, [B, S, 1, rotary_dim / 2]."""
        if table not in self._rope:
            g = self.g
            cos, sin = self.tables[table]
            pick = lambda t: g.op("Unsqueeze", [g.op("Gather", [t, self.qpos]), self.i64("axis2", [2])])  # noqa
            self._rope[table] = (pick(cos), pick(sin))
        return self._rope[table]

    def rotate(self, x: str, table: int, heads: int) -> str:
        """[B*S, heads * hd] -> rotary-embedded [B, S, heads, hd] (rotate-half; partial rotary keeps the tail)."""
        g, d = self.g, self.dims
        x = g.op("Reshape", [x, g.op("Concat", [self.shape_bs, self.i64(f"heads{heads}_{d.head_dim}",
                                                                        [heads, d.head_dim])], axis=0)])
        if table < 0:
            return x
        cos, sin = self.rope(table)
        half = self.halves[table]
        parts = [half, half] + ([d.head_dim - 2 * half] if d.head_dim > 2 * half else [])
        pieces = g.op("Split", [x, self.i64("split_" + "_".join(map(str, parts)), parts)], n_out=len(parts),
                      axis=-1)
        x1, x2 = pieces[0], pieces[1]
        out = [g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])]),
               g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])]), *pieces[2:]]
        return g.op("Concat", out, axis=-1)

    def layer(self, i: int, qkv: list[str], past_k: str, past_v: str, present_k: str, present_v: str) -> str:
        """Attention of layer ``i`` on its q, k, v [B*S, width]: writes present K/V, returns [B*S, heads * hd].
        Plain ops for TensorRT; in the onnxruntime flavours (block attention) the rotary embedding and the
        attention itself are com.microsoft RotaryEmbedding and MultiHeadAttention (far fewer ops per layer), which,
        unlike GroupQueryAttention, take several rows of several new tokens on a past."""
        if not self.g.plain and not self.dims.attn_softcap:
            return self._contrib_layer(i, qkv, past_k, past_v, present_k, present_v)
        g, d, i64 = self.g, self.dims, self.i64
        hd, kvh = d.head_dim, d.num_kv_heads
        table = d.rope(i)
        perm = dict(perm=[0, 2, 1, 3])
        q = g.op("Transpose", [self.rotate(qkv[0], table, d.num_heads)], **perm)  # [B, H, S, hd]
        k = g.op("Transpose", [self.rotate(qkv[1], table, kvh)], **perm)  # [B, KV, S, hd]
        v = g.op("Transpose", [self.rotate(qkv[2], -1, kvh)], **perm)
        self.write_kv(past_k, past_v, k, v, present_k, present_v)
        scale = d.attn_scale if d.attn_scale is not None else hd ** -0.5
        q = g.op("Mul", [q, g.scalar(f"attn_scale{scale:.6g}", scale)])
        q = g.op("Reshape", [q, i64(f"grouped{kvh}_{hd}", [0, kvh, -1, hd])])  # [B, KV, G*S, hd]
        scores = g.op("MatMul", [q, g.op("Transpose", [present_k], perm=[0, 1, 3, 2])])  # [B, KV, G*S, T]
        if g.float_dtype != np.float32:
            scores = g.op("Cast", [scores], to=TensorProto.FLOAT)
        if d.attn_softcap:
            cap = g.init(f"const.softcap{d.attn_softcap:g}", np.array(d.attn_softcap, np.float32))
            scores = g.op("Mul", [g.op("Tanh", [g.op("Div", [scores, cap])]), cap])
        probs = g.op("Softmax", [g.op("Add", [scores, self.bias(d.window(i))])], axis=-1)
        if g.float_dtype != np.float32:
            probs = g.op("Cast", [probs], to=TensorProto.FLOAT16)
        out = g.op("MatMul", [probs, present_v])  # [B, KV, G*S, hd]
        out = g.op("Reshape", [out, i64(f"heads_back{d.num_heads}_{hd}", [0, d.num_heads, -1, hd])])
        out = g.op("Transpose", [out], **perm)  # [B, S, H, hd]
        return g.op("Reshape", [out, i64(f"flat{d.num_heads * hd}", [-1, d.num_heads * hd])])

    def _contrib_layer(self, i: int, qkv: list[str], past_k: str, past_v: str, present_k: str, present_v: str) -> str:
        g, d, i64 = self.g, self.dims, self.i64
        hd, kvh, heads = d.head_dim, d.num_kv_heads, d.num_heads
        table = d.rope(i)
        bsw = lambda w: g.op("Concat", [self.shape_bs, i64(f"width{w}", [w])], axis=0)  # noqa: E731  [B, S, w]
        q, k, v = (g.op("Reshape", [t, bsw(n * hd)]) for t, n in zip(qkv, (heads, kvh, kvh)))
        if table >= 0:
            cos, sin = self.tables[table]
            rot = {} if 2 * self.halves[table] == hd else {"rotary_embedding_dim": 2 * self.halves[table]}
            q, k = (g.op("RotaryEmbedding", [t, self.qpos, cos, sin], domain=MS_DOMAIN, num_heads=n, interleaved=0,
                         **rot) for t, n in ((q, heads), (k, kvh)))
        bnsh = lambda t: g.op("Transpose", [g.op("Reshape", [t, g.op("Concat", [  # noqa: E731
            self.shape_bs, i64(f"heads{kvh}_{hd}", [kvh, hd])], axis=0)])], perm=[0, 2, 1, 3])
        self.write_kv(past_k, past_v, bnsh(k), bnsh(v), present_k, present_v)
        keys, values = present_k, present_v
        if kvh != heads:  # MultiHeadAttention wants every head's K/V: repeat each KV head G times
            groups = heads // kvh
            full = lambda t: g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, i64("axis2", [2])]), g.op(  # noqa
                "Concat", [g.op("Shape", [t], start=0, end=2), i64(f"g{groups}", [groups]), g.op(
                    "Shape", [t], start=2, end=4)], axis=0)]), i64(f"heads_all{heads}_{hd}", [0, heads, -1, hd])])
            keys, values = full(keys), full(values)
        attrs = {} if d.attn_scale is None else {"scale": float(d.attn_scale)}
        bias = self.bias(d.window(i), tiled=False)
        if g.float_dtype != np.float32:  # the bias takes the compute dtype (fp16's lowest is -inf: fine for softmax)
            if bias not in self._half:
                self._half[bias] = g.op("Cast", [bias], to=TensorProto.FLOAT16)
            bias = self._half[bias]
        out = g.op("MultiHeadAttention", [q, keys, values, "", "", bias], domain=MS_DOMAIN, num_heads=heads, **attrs)
        return g.op("Reshape", [out, i64(f"flat{heads * hd}", [-1, heads * hd])])


def _rotary(g: _Graph, j: int, rope: Rope, positions: int, total: str) -> tuple[str, str]:
    """Cos/sin caches [positions, rotary_dim / 2] of one table; LongRoPE picks its long table in the graph once
    the sequence (``total``) is longer than its original context, as transformers does per forward."""
    def tables(inv_freq: np.ndarray, tag: str) -> tuple[str, str]:
        freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
        name = "rotary" if j == 0 else f"rotary{j}"
        return (g.init(f"{name}{tag}.cos_cache", (np.cos(freqs) * rope.scaling).astype(np.float32)),
                g.init(f"{name}{tag}.sin_cache", (np.sin(freqs) * rope.scaling).astype(np.float32)))

    cos, sin = tables(rope.inv_freq, "")
    if rope.long_inv_freq is None or positions <= rope.original:
        return cos, sin
    long_cos, long_sin = tables(rope.long_inv_freq, ".long")
    longer = g.op("Greater", [total, g.init(f"const.original{j}", np.array(rope.original, np.int32))])
    return g.op("Where", [longer, long_cos, cos]), g.op("Where", [longer, long_sin, sin])


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save with weights in one external ``<name>.data`` file; return the files written (names relative to dir)."""
    data_name = path.name + ".data"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
        size_threshold=1024,
    )
    return [path.name, data_name]

