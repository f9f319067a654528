"""What the attention forms that take batched rows of several new tokens on a past share (MultiHeadAttention and
plain ops): each row's positions, the additive mask of its causal / sliding-window / block-causal attention, and the
KV write at each row's own positions, all done in the graph as GroupQueryAttention does them in its kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgekit.export.onnx_graph.ops import Graph, rotary_caches, total_length

if TYPE_CHECKING:
    from edgekit.export.onnx_graph.decoder import DecoderDims, Rope


class RowAttention:
    """Grouped-query attention over right-padded rows: row b's new tokens sit at positions mask_sum(b) - S ...
    mask_sum(b) - 1, in the rotary embedding and in its present K/V. Subclasses write the attention itself."""

    softcap: ClassVar[bool]  # whether the form can soft-cap attention logits

    def __init__(self, g: Graph, dims: DecoderDims, ropes: tuple[Rope, ...]) -> None:
        self.g, self.dims = g, dims
        self.tables = rotary_caches(g, ropes, dims.max_positions, total_length(g))
        self.halves = [r.inv_freq.shape[0] for r in ropes]  # rotary_dim / 2 per table
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
        self._kv_index: str | None = None

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


    def unpack(self, qkv: list[str]) -> list[str]:
        """[q, k, v] from a packed [B*S, (heads + 2 kv) * head_dim] projection (or as given)."""
        if len(qkv) != 1:
            return qkv
        d = self.dims
        q_width, kv_width = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        return self.g.op("Split", [qkv[0], self.g.init(f"const.qkv_split{q_width}_{kv_width}", np.array(
            [q_width, kv_width, kv_width], np.int64))], n_out=3, axis=-1)

    def layer(self, i: int, qkv: list[str], kv_io: tuple[str, str, str, str], rows: str) -> str:
        """Attention of layer ``i`` on its q, k, v [B*S, width] (or one packed projection): writes present K/V
        (``kv_io``: past key, past value, present key, present value), returns [B*S, heads * hd]. ``rows``: the
        [3] shape (B, S, -1) of the batch-rows form, for forms that want it."""
        raise NotImplementedError
