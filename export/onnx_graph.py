"""Builds the fused-op ONNX graph of an AR decoder straight from its weights.

The graph uses onnxruntime's fused kernels (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization,
GroupQueryAttention with in-kernel rotary embedding), packed QKV and gate/up projections: about 11 ops per layer,
which is what makes decode fast on small models, where per-op overhead rivals the matmuls.

I/O (names recorded in the bundle manifest):
  input_ids            int64 [B, S]
  attention_mask       int64 [B, P + S]          (1 for real tokens; P = past length)
  logits_to_keep       int64 [1]                 (how many trailing positions get logits: 1 when decoding)
  past_key_values.{i}.key / .value   float [B, kv_heads, P, head_dim]
  -> logits            float [B, logits_to_keep, V]
  -> present.{i}.key / .value        float [B, kv_heads, P + S, head_dim]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.export.gguf import BLOCK, BlockQuantLinear
from edgekit.export.registry import LayerWeights
from edgekit.runtimes.bundle import KVCacheLayout

OPSET = 21
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


@dataclass(frozen=True)
class DecoderWeights:
    embed: np.ndarray  # [V, H]
    lm_head: np.ndarray | None  # [V, H]; None when tied to embed
    final_norm: np.ndarray  # [H]
    rope: tuple[Rope, ...]  # rotary tables; DecoderDims.layer_rope picks one per layer
    layers: Callable[[int], LayerWeights]  # built lazily, one layer at a time, to bound peak memory


def input_names(n_layers: int) -> tuple[str, ...]:
    kv = KVCacheLayout(n_layers, 0, 0)
    pasts = [n.format(layer=i) for i in range(n_layers) for n in (kv.past_key, kv.past_value)]
    return ("input_ids", "attention_mask", "logits_to_keep", *pasts)


def output_names(n_layers: int) -> tuple[str, ...]:
    kv = KVCacheLayout(n_layers, 0, 0)
    presents = [n.format(layer=i) for i in range(n_layers) for n in (kv.present_key, kv.present_value)]
    return ("logits", *presents)


class _Graph:
    """A tiny node/initializer accumulator with unique names."""

    def __init__(self, accuracy_level: int = 0, dtype: str = "float32") -> None:
        self.float_dtype = np.dtype(dtype)
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
            y = self.op("MatMul", [x, self.init(f"{name}.weight", w.T.astype(np.float32))], name=name)
        else:
            n, k = w.shape
            if level >= 4:  # int8 activations: a centred main term (see BlockQuantLinear.centered)
                w = w.centered()
            split = w.nibbles() if level < 4 else None  # 8-bit blocks with float activations: two 4-bit matmuls
            y = self.matmul_nbits(x, split[0] if split else w, name, level)
            if split is not None:
                y = self.op("Add", [y, self.matmul_nbits(x, split[1], f"{name}.high", level)])
            if w.offsets is not None:  # the per-block min term: y += block_sums(x) @ offsets^T
                corr = self.op("MatMul", [self.block_sums(x, k, w.block),
                                          self.init(f"{name}.block_offsets", w.offsets.T)])
                y = self.op("Add", [y, corr])  # (measured faster than one Gemm with C=y on onnxruntime 1.31 CPU)
        if bias is not None:
            y = self.op("Add", [y, self.init(f"{name}.bias", bias.astype(np.float32))])
        return y

    def matmul_nbits(self, x: str, w: BlockQuantLinear, name: str, level: int) -> str:
        """x @ (scale * (code - zero_point))^T, without the offset term."""
        n, k = w.shape
        inputs = [x, self.init(f"{name}.qweight", w.packed), self.init(f"{name}.scales", w.scales.reshape(-1))]
        zp = w.packed_zero_points()
        if zp is not None:
            inputs.append(self.init(f"{name}.zero_points", zp.reshape(-1)))
        return self.op("MatMulNBits", inputs, domain=MS_DOMAIN, name=name, K=k, N=n, bits=w.bits,
                       block_size=w.block, accuracy_level=level)

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
        """RMSNorm over the last axis."""
        return self.op("SimplifiedLayerNormalization", [x, self.init(name if name.endswith(".weight") else
                                                                     f"{name}.weight", w)],
                       axis=-1, epsilon=eps, stash_type=1)

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
    g = _Graph(opt.accuracy_level, opt.dtype)
    n, H, hd = dims.num_layers, dims.hidden, dims.head_dim
    f32 = TensorProto.FLOAT
    fkv = TensorProto.FLOAT16 if opt.dtype == "float16" else TensorProto.FLOAT

    # seqlens_k: [B] int32 = valid tokens - 1; total_sequence_length: scalar int32
    mask_sum = g.op("ReduceSum", ["attention_mask", g.init("const.axis1", np.array([1], np.int64))], keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [mask_sum, g.init("const.one", np.array(1, np.int64))])], to=TensorProto.INT32)
    total = g.op("Shape", ["attention_mask"], start=1, end=2)
    total = g.op("Cast", [g.op("Squeeze", [total])], to=TensorProto.INT32)
    tables = [_rotary(g, j, rope, dims.max_positions, total) for j, rope in enumerate(weights.rope)]

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
        out, _, _, total_ = g.op("SkipSimplifiedLayerNormalization", [branch, residual, g.init(norm_name, norm)],
                                 n_out=4, domain=MS_DOMAIN, epsilon=dims.rms_eps)
        return out, total_

    q_width, kv_width = dims.num_heads * hd, dims.num_kv_heads * hd
    for i in range(n):
        lw_next = weights.layers(i + 1) if i + 1 < n else None
        p = f"model.layers.{i}"
        qkv = g.linear(x, lw.qkv, f"{p}/qkv", bias=lw.qkv_bias)
        if lw.q_norm is not None and lw.k_norm is not None:  # q/k RMSNorm before the rotary embedding
            q, k, v = g.op("Split", [qkv, g.init(f"const.qkv_split{q_width}_{kv_width}", np.array(
                [q_width, kv_width, kv_width], np.int64))], n_out=3, axis=-1)
            q = g.head_norm(q, lw.q_norm, f"{p}.self_attn.q_norm", hd, dims.rms_eps)
            k = g.head_norm(k, lw.k_norm, f"{p}.self_attn.k_norm", hd, dims.rms_eps)
            qkv_in = [g.op("Reshape", [t, shape_bs_any]) for t in (q, k, v)]
        else:
            qkv_in = [g.op("Reshape", [qkv, shape_bs_any]), "", ""]  # packed [B, S, (heads + 2 kv) * head_dim]
        table = dims.rope(i)
        cos, sin = tables[table] if table >= 0 else ("", "")
        attrs = dict(num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads, do_rotary=int(table >= 0),
                     rotary_interleaved=0, local_window_size=dims.window(i))
        if dims.attn_scale is not None:
            attrs["scale"] = float(dims.attn_scale)
        if dims.attn_softcap:
            attrs["softcap"] = float(dims.attn_softcap)
        # present K/V are the graph outputs themselves (no Identity copy), so a runtime that binds one max-length
        # buffer as both past and present gets GroupQueryAttention's in-place shared-buffer mode
        attn_out = f"{p}/attn/out0"
        g.op_named("GroupQueryAttention",
                   [*qkv_in, kv.past_key.format(layer=i), kv.past_value.format(layer=i), seqlens, total, cos, sin],
                   [attn_out, kv.present_key.format(layer=i), kv.present_value.format(layer=i)],
                   domain=MS_DOMAIN, name=f"{p}/attn", **attrs)
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
    outputs = [helper.make_tensor_value_info("logits", f32, [B, K, dims.vocab_size])]
    for i in range(n):
        for name in (kv.past_key, kv.past_value):
            inputs.append(helper.make_tensor_value_info(name.format(layer=i), fkv, [B, dims.num_kv_heads, P, hd]))
        for name in (kv.present_key, kv.present_value):
            outputs.append(helper.make_tensor_value_info(name.format(layer=i), fkv, [B, dims.num_kv_heads, T, hd]))
    graph = helper.make_graph(g.nodes, "edgekit_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edgekit",
    )
    model.ir_version = 10
    # what the runtime checks the manifest against (initializers are out of a torch-free runtime's reach)
    helper.set_model_props(model, {ROTARY_POSITIONS: str(dims.max_positions)})
    return model


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

