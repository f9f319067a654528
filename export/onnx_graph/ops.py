"""The graph accumulator and what every decoder graph is built from: the linear forms (dense MatMul, MatMulNBits,
blockwise DequantizeLinear, GGUF blocks with their offset term), the RMSNorms and the rotary caches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.export.targets import TARGETS
from edgekit.export.weights import BLOCK, BlockQuantLinear

if TYPE_CHECKING:
    from edgekit.export.onnx_graph.decoder import Rope

OPSET = 21  # 21: int4 tensors and blockwise DequantizeLinear
MS_DOMAIN = "com.microsoft"


class Graph:
    """A tiny node/initializer accumulator with unique names, writing the linear forms and norms of its target
    (a key of ``export.targets.TARGETS``)."""

    def __init__(self, accuracy_level: int = 0, dtype: str = "float32", target: str = "cpu", qdq_bits: int = 0,
                 qdq_block: int = BLOCK, split_8bit: bool | None = None) -> None:
        self.float_dtype = np.dtype(dtype)
        self.target = TARGETS[target]
        # 8-bit blocks at float activations as two 4-bit matmuls: the target's choice, or forced (an onnxruntime
        # without 8-bit MatMulNBits: the exact alternative)
        self.split_8bit = self.target.split_8bit if split_8bit is None else split_8bit
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
        elif self.target.block_format == "qdq":
            return self._with_bias(self.dequantized_blocks(x, w, name), bias, name)
        else:
            n, k = w.shape
            if level >= 4 or (self.target.scale_only_4bit and w.bits == 4):
                w = w.centered()  # int8 activations, or CUDA's fast paths: a centred main term (BlockQuantLinear)
            # 8-bit blocks with float activations on the CPU: two 4-bit matmuls (its 8-bit kernel is a slow fallback)
            split = w.nibbles() if level < 4 and self.split_8bit else None
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

    def matmul_nbits(self, x: str, w: BlockQuantLinear, name: str, level: int) -> str:
        """x @ (scale * (code - zero_point))^T, without the offset term."""
        n, k = w.shape
        inputs = [x, self.init(f"{name}.qweight", w.packed), self.init(f"{name}.scales", w.scales.reshape(-1))]
        zp = w.packed_zero_points()
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
        q = w.codes.astype(np.int16) - 8
        # TensorRT takes positive scales only (GGUF Q4_0 stores negative ones for about half its blocks; mins-types
        # can hold zero): s (c - 8) = (-s) ((15 - c) - 8) - s, so a negative block flips its codes and moves -s into
        # its offset; a zero block (as stored, in the compute dtype) gets scale 1 and codes 0 (it was the offset alone)
        s = w.scales.astype(self.float_dtype).astype(np.float32)
        neg, zero = s < 0, s == 0
        q = np.where(np.repeat(neg, w.block, axis=1), -q - 1, np.where(np.repeat(zero, w.block, axis=1), 0, q))
        offsets = offsets - np.where(neg, s, 0)
        s = np.where(neg, -s, np.where(zero, 1, s))
        y = self.op("MatMul", [x, self._dq(q.astype(np.int8), s, name, w.block)], name=name)
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
        if self.target.custom_ops:
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
        if not self.target.custom_ops:
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



def total_length(g: Graph) -> str:
    """The total sequence length (past + new, the attention mask's width) as an int32 scalar."""
    total = g.op("Shape", ["attention_mask"], start=1, end=2)
    return g.op("Cast", [g.op("Squeeze", [total, g.init("const.axis0", np.array([0], np.int64))])],
                to=TensorProto.INT32)


def rotary_caches(g: Graph, ropes: tuple[Rope, ...], positions: int, total: str) -> list[tuple[str, str]]:
    """Cos/sin caches of every rotary table (see ``_rotary``)."""
    return [_rotary(g, j, rope, positions, total) for j, rope in enumerate(ropes)]


def _rotary(g: Graph, j: int, rope: Rope, positions: int, total: str) -> tuple[str, str]:
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

