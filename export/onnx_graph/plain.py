"""Attention in plain standard ops, for the tensorrt flavour (TensorRT 10.3's parser has no Attention /
RotaryEmbedding importers and no com.microsoft ops) and for soft-capped block-causal models: rotary embedding by
gathered cos/sin rows, MatMul/Softmax attention over past + new K/V, causal (optionally sliding-window, soft-capped)
or block-causal."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from onnx import TensorProto

from edgekit.export.onnx_graph.rows import RowAttention

if TYPE_CHECKING:
    from edgekit.export.onnx_graph.decoder import DecoderDims, Rope
    from edgekit.export.onnx_graph.ops import Graph


class PlainAttention(RowAttention):
    """Rotate-half rotary embedding, grouped queries against present K/V with MatMul, soft-cap, mask and Softmax
    in fp32, all in ops of the ONNX standard domain."""

    softcap: ClassVar[bool] = True

    def __init__(self, g: Graph, dims: DecoderDims, ropes: tuple[Rope, ...]) -> None:
        super().__init__(g, dims, ropes)
        self._rope: dict[int, tuple[str, str]] = {}

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

    def layer(self, i: int, qkv: list[str], kv_io: tuple[str, str, str, str], rows: str) -> str:
        qkv = self.unpack(qkv)
        past_k, past_v, present_k, present_v = kv_io
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
