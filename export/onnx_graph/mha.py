"""Block-causal attention (block diffusion) in the onnxruntime flavours: com.microsoft RotaryEmbedding and
MultiHeadAttention, which, unlike GroupQueryAttention, take several rows of several new tokens on a past and an
additive mask (far fewer ops per layer than the plain form)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from onnx import TensorProto

from edgekit.export.onnx_graph.ops import MS_DOMAIN
from edgekit.export.onnx_graph.rows import RowAttention

if TYPE_CHECKING:
    from edgekit.export.onnx_graph.decoder import DecoderDims, Rope
    from edgekit.export.onnx_graph.ops import Graph


class MultiHeadAttention(RowAttention):
    """RotaryEmbedding on q and k at each row's positions, the K/V write, then MultiHeadAttention over every head's
    K/V (each KV head repeated G times) with the block-causal mask as its bias. It has no soft-capping."""

    softcap: ClassVar[bool] = False

    def __init__(self, g: Graph, dims: DecoderDims, ropes: tuple[Rope, ...]) -> None:
        super().__init__(g, dims, ropes)
        self._half: dict[str, str] = {}  # fp32 bias -> its fp16 cast

    def layer(self, i: int, qkv: list[str], kv_io: tuple[str, str, str, str], rows: str) -> str:
        qkv = self.unpack(qkv)
        past_k, past_v, present_k, present_v = kv_io
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
