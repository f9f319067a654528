"""Per-layer KV cache of one sequence: the past tensors fed to the decoder graph and updated from its outputs."""

from __future__ import annotations

import numpy as np

from edgekit.runtimes.bundle import KVCacheLayout


class KVCache:
    """Holds past key/value arrays, each [1, kv_heads, length, head_dim], and the token ids they encode."""

    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        layers = range(layout.num_layers)
        self.past_names = [n.format(layer=i) for i in layers for n in (layout.past_key, layout.past_value)]
        self.present_names = [n.format(layer=i) for i in layers for n in (layout.present_key, layout.present_value)]
        self.tokens: list[int] = []
        self._arrays: list[np.ndarray] = []
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.layout.num_kv_heads, 0, self.layout.head_dim), dtype=np.dtype(self.layout.dtype))
        self._arrays = [empty] * len(self.past_names)
        self.tokens = []

    def __len__(self) -> int:
        return len(self.tokens)

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.past_names, self._arrays))

    def update(self, presents: list[np.ndarray], new_tokens: list[int]) -> None:
        """Replace the past with the graph's present outputs, which already include ``new_tokens``."""
        self._arrays = presents
        self.tokens.extend(new_tokens)

    def rewind_to(self, length: int) -> None:
        """Drop every position from ``length`` on (e.g. to reuse a shared prompt prefix)."""
        if length >= len(self.tokens):
            return
        self._arrays = [np.ascontiguousarray(a[:, :, :length, :]) for a in self._arrays]
        self.tokens = self.tokens[:length]

    def common_prefix(self, tokens: list[int]) -> int:
        """Length of the longest prefix shared by the cached tokens and ``tokens``."""
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        return n

    @classmethod
    def from_arrays(cls, layout: KVCacheLayout, arrays: list[np.ndarray], tokens: list[int]) -> KVCache:
        """A cache holding ``arrays`` (each [1, kv_heads, len(tokens), head_dim]) for ``tokens``."""
        cache = cls(layout)
        cache._arrays, cache.tokens = arrays, list(tokens)
        return cache

    @property
    def arrays(self) -> list[np.ndarray]:
        return self._arrays


class PrefixCache:
    """A few finished sequences' KV caches, so a request that starts with one of them skips re-encoding it.

    A chat's next turn repeats the previous turn's prompt and answer: only the new tokens need a prefill.
    """

    def __init__(self, layout: KVCacheLayout, capacity: int = 8) -> None:
        self.layout = layout
        self.capacity = capacity
        self._entries: list[tuple[list[int], list[np.ndarray]]] = []  # most recent last

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], arrays: list[np.ndarray]) -> None:
        if self.capacity <= 0 or not tokens:
            return
        others = [e for e in self._entries if e[0] != tokens]
        self._entries = [*others[len(others) - self.capacity + 1 :], (list(tokens), arrays)]

    def lookup(self, prompt: list[int]) -> KVCache:
        """A cache for the longest stored prefix of ``prompt`` (always leaving one prompt token to prefill)."""
        best, best_len = None, 0
        for entry in self._entries:
            n = 0
            for a, b in zip(entry[0], prompt):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = entry, n
        keep = min(best_len, len(prompt) - 1)
        if best is None or keep <= 0:
            return KVCache(self.layout)
        arrays = [np.ascontiguousarray(a[:, :, :keep, :]) for a in best[1]]
        return KVCache.from_arrays(self.layout, arrays, prompt[:keep])
