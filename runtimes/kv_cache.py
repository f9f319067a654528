"""KV caches: one sequence's past (``KVCache``), finished sequences kept for prefix reuse (``PrefixCache``), and the
right-padded rows of a decoding batch (``BatchKV``). Arrays are [B, kv_heads, T, head_dim] (BNSH)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgekit.runtimes.bundle import KVCacheLayout


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest shared prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KVCache:
    """One sequence's past key/value arrays, each [1, kv_heads, length, head_dim], and the token ids they encode."""

    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        layers = range(layout.num_layers)
        self.past_names = [n.format(layer=i) for i in layers for n in (layout.past_key, layout.past_value)]
        self.present_names = [n.format(layer=i) for i in layers for n in (layout.present_key, layout.present_value)]
        self.tokens: list[int] = []
        self.arrays: list[np.ndarray] = []
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.layout.num_kv_heads, 0, self.layout.head_dim), dtype=np.dtype(self.layout.dtype))
        self.arrays = [empty] * len(self.past_names)
        self.tokens = []

    def __len__(self) -> int:
        return len(self.tokens)

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.past_names, self.arrays))

    def update(self, presents: list[np.ndarray], new_tokens: Sequence[int]) -> None:
        """Replace the past with the graph's present outputs, which already include ``new_tokens``."""
        self.arrays = presents
        self.tokens.extend(new_tokens)

    def rewind_to(self, length: int) -> None:
        """Drop every position from ``length`` on (e.g. to reuse a shared prompt prefix)."""
        if length >= len(self.tokens):
            return
        self.arrays = [np.ascontiguousarray(a[:, :, :length, :]) for a in self.arrays]
        self.tokens = self.tokens[:length]


class PrefixCache:
    """A few finished sequences' KV caches, so a request that starts with one of them skips re-encoding it.

    A chat's next turn repeats the previous turn's prompt and answer: only the new tokens need a prefill.
    """

    def __init__(self, layout: KVCacheLayout, capacity: int = 8) -> None:
        self.layout = layout
        self.capacity = capacity
        self._entries: list[KVCache] = []  # most recent last

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, cache: KVCache) -> None:
        if self.capacity <= 0 or not cache.tokens:
            return
        others = [e for e in self._entries if e.tokens != cache.tokens]
        self._entries = [*others[len(others) - self.capacity + 1:], cache]

    def lookup(self, prompt: Sequence[int]) -> KVCache:
        """A cache for the longest stored prefix of ``prompt`` (always leaving one prompt token to prefill)."""
        best, best_len = None, 0
        for entry in self._entries:
            n = common_prefix(entry.tokens, prompt)
            if n > best_len:
                best, best_len = entry, n
        cache = KVCache(self.layout)
        keep = min(best_len, len(prompt) - 1)
        if best is not None and keep > 0:
            cache.update([np.ascontiguousarray(a[:, :, :keep, :]) for a in best.arrays], prompt[:keep])
        return cache


class BatchKV:
    """The KV of the rows of a decoding batch, right-padded: row i holds ``lengths[i]`` valid positions, and the
    attention mask gives row i ``lengths[i] + 1`` ones, so GroupQueryAttention reads and writes each row at its own
    length. Rows are re-packed only when sequences join or leave."""

    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        self.names = KVCache(layout).past_names
        self.arrays: list[np.ndarray] = []
        self.lengths: list[int] = []

    def pack(self, rows: Sequence[KVCache | tuple[int, int]]) -> None:
        """Rebuild from per-row sources: a sequence's own cache (just prefilled) or (row, length) of this batch."""
        parts = [r.arrays if isinstance(r, KVCache) else [a[r[0]:r[0] + 1, :, :r[1], :] for a in self.arrays]
                 for r in rows]
        lengths = [len(r) if isinstance(r, KVCache) else r[1] for r in rows]
        width = max(lengths, default=0)
        self.arrays = [np.concatenate([np.pad(p[j], ((0, 0), (0, 0), (0, width - p[j].shape[2]), (0, 0)))
                                       for p in parts]) for j in range(len(self.names))] if parts else []
        self.lengths = lengths

    def row(self, i: int, tokens: Sequence[int]) -> KVCache:
        """Row ``i`` (``len(tokens)`` valid positions) as a sequence's own cache (copied out)."""
        n = len(tokens)
        cache = KVCache(self.layout)
        cache.update([a[i:i + 1, :, :n, :].copy() for a in self.arrays], tokens)
        return cache
