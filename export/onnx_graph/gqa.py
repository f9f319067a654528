"""Causal attention in onnxruntime's fused kernel: com.microsoft GroupQueryAttention, with the rotary embedding in
the kernel (cos/sin caches as inputs) and full or sliding-window attention, soft-capped or not. Its present K/V are
the graph outputs themselves, so a runtime that binds one max-length buffer as both past and present gets the
kernel's in-place shared-buffer mode."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from onnx import TensorProto

from edgekit.export.onnx_graph.ops import MS_DOMAIN, Graph, rotary_caches, total_length

if TYPE_CHECKING:
    from edgekit.export.onnx_graph.decoder import DecoderDims, Rope


class GroupQueryAttention:
    """One GroupQueryAttention node per layer on [B, S, width] q/k/v (or the packed projection), right-padded rows
    given by ``seqlens_k`` (valid tokens - 1 per row) and the total sequence length."""

    softcap: ClassVar[bool] = True

    def __init__(self, g: Graph, dims: DecoderDims, ropes: tuple[Rope, ...]) -> None:
        self.g, self.dims = g, dims
        # seqlens_k: [B] int32 = valid tokens - 1; total_sequence_length: scalar int32
        mask_sum = g.op("ReduceSum", ["attention_mask", g.init("const.axis1", np.array([1], np.int64))], keepdims=0)
        self.seqlens = g.op("Cast", [g.op("Sub", [mask_sum, g.init("const.one", np.array(1, np.int64))])],
                            to=TensorProto.INT32)
        self.total = total_length(g)
        self.tables = rotary_caches(g, ropes, dims.max_positions, self.total)

    def layer(self, i: int, qkv: list[str], kv_io: tuple[str, str, str, str], rows: str) -> str:
        """Attention of layer ``i``: writes present K/V, returns [B*S, heads * hd] (``rows``: the [3] shape
        (B, S, -1) that gives GroupQueryAttention its 3-D inputs)."""
        g, dims = self.g, self.dims
        table = dims.rope(i)
        cos, sin = self.tables[table] if table >= 0 else ("", "")
        attrs = dict(num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads, do_rotary=int(table >= 0),
                     rotary_interleaved=0, local_window_size=dims.window(i))
        if dims.attn_scale is not None:
            attrs["scale"] = float(dims.attn_scale)
        if dims.attn_softcap:
            attrs["softcap"] = float(dims.attn_softcap)
        qkv_in = [g.op("Reshape", [t, rows]) for t in qkv] + [""] * (3 - len(qkv))
        # present K/V are the graph outputs themselves (no Identity copy): the in-place shared-buffer mode
        p = f"model.layers.{i}"
        attn_out = f"{p}/attn/out0"
        g.op_named("GroupQueryAttention", [*qkv_in, kv_io[0], kv_io[1], self.seqlens, self.total, cos, sin],
                   [attn_out, kv_io[2], kv_io[3]], domain=MS_DOMAIN, name=f"{p}/attn", **attrs)
        q_width = dims.num_heads * dims.head_dim
        return g.op("Reshape", [attn_out, g.init("const.flat_attn", np.array([-1, q_width], np.int64))])
