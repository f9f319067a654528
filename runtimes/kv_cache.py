"""KV caches that stay where the session computes: one max-length buffer per past tensor for a few sequences
(``KVSlots``; a slot is a row), a sequence's place in it (``KVCache``: slot + the token ids it encodes), and finished
sequences kept for prefix reuse (``PrefixCache``: they keep their rows). Buffers are [slots, kv_heads, length,
head_dim] (BNSH), numpy-backed on the CPU provider and device memory on CUDA.

The decoder binds a range of rows of each buffer as both the graph's past input and its present output
(onnxruntime IO binding by pointer), so GroupQueryAttention reads the valid positions of each row and writes only the
new ones in place: per token only the ids, the small attention mask and the logits move. Reusing a prefix, rewinding
and joining or leaving a batch are length changes, never copies of the past.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgekit.runtimes.bundle import KVCacheLayout
from edgekit.runtimes.errors import EdgekitError

INITIAL_LENGTH = 256  # positions per row allocated up front on the CPU (buffers double as sequences grow)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest shared prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def past_names(layout: KVCacheLayout) -> list[str]:
    return [n.format(layer=i) for i in range(layout.num_layers) for n in (layout.past_key, layout.past_value)]


def present_names(layout: KVCacheLayout) -> list[str]:
    return [n.format(layer=i) for i in range(layout.num_layers) for n in (layout.present_key, layout.present_value)]


class KVSlots:
    """Max-length KV buffers for ``capacity`` sequences on ``device`` ("cpu" or "cuda").

    numpy buffers (the CPU) start at ``INITIAL_LENGTH`` positions and double (one copy of the valid rows) when a
    sequence outgrows them, up to ``max_length``; onnxruntime OrtValues (``ortvalues``: device memory, the graph
    runner's choice on a GPU) are allocated at ``max_length`` once, zero-filled (device memory cannot be re-laid out
    without a device kernel). OrtValues work on the CPU device too: the same code path, testable without a GPU.
    Only shared-buffer graphs bind them (``bind``); the copying path (``pasts``/``store``) needs numpy buffers."""

    def __init__(self, layout: KVCacheLayout, capacity: int, max_length: int, device: str = "cpu",
                 ortvalues: bool = False) -> None:
        self.layout, self.capacity, self.max_length, self.device = layout, capacity, max_length, device
        self.ortvalues = ortvalues
        self.names = past_names(layout)
        self.present = present_names(layout)
        self.dtype = np.dtype(layout.dtype)
        self.length = 0
        self.arrays: list[np.ndarray] = []  # CPU buffers
        self._device_values: list[object] = []  # OrtValues (kept alive; their pointers are bound)
        self._ptrs: list[int] = []
        self.free = list(range(capacity))
        self._alloc(max_length if self.ortvalues else min(max_length, INITIAL_LENGTH))

    def _shape(self, rows: int, length: int) -> list[int]:
        return [rows, self.layout.num_kv_heads, length, self.layout.head_dim]

    def _alloc(self, length: int) -> None:
        """(Re)allocate at ``length`` positions, every row's contents copied over (numpy only): sequences decoding
        in other rows and rows kept for prefix reuse stay intact."""
        shape = self._shape(self.capacity, length)
        if not self.ortvalues:
            old, n = self.arrays, self.length
            self.arrays = [np.zeros(shape, self.dtype) for _ in self.names]
            for new, prev in zip(self.arrays, old):
                new[:, :, :n] = prev[:, :, :n]
            self._ptrs = [a.ctypes.data for a in self.arrays]
        else:
            from edgekit.runtimes.flavour import module

            ort = module()
            zeros = np.zeros(shape, self.dtype)  # (device memory starts uninitialised: a row read past its length
            self._device_values = []  # would be garbage, NaN included, where numpy buffers hold zeros)
            for _ in self.names:
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
                value.update_inplace(zeros)
                self._device_values.append(value)
            self._ptrs = [v.data_ptr() for v in self._device_values]  # type: ignore[attr-defined]
        self.length = length

    def ensure(self, length: int) -> None:
        """Make room for ``length`` positions per row, keeping every row's contents."""
        if length <= self.length:
            return
        if length > self.max_length or self.ortvalues:
            raise EdgekitError(f"KV buffer of {self.length} positions cannot hold {length} (max {self.max_length}).")
        new = self.length
        while new < length:
            new *= 2
        self._alloc(min(new, self.max_length))

    def take(self) -> int:
        if not self.free:
            raise EdgekitError(f"All {self.capacity} KV slots are in use.")
        return self.free.pop(0)

    def give(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)
            self.free.sort()

    def bind(self, io: object, lo: int, hi: int) -> None:
        """Bind rows [lo, hi) of every buffer as both past and present (the shared-buffer mode)."""
        shape = self._shape(hi - lo, self.length)
        row_bytes = self.layout.num_kv_heads * self.length * self.layout.head_dim * self.dtype.itemsize
        for past, present, ptr in zip(self.names, self.present, self._ptrs):
            at = ptr + lo * row_bytes
            io.bind_input(past, self.device, 0, self.dtype.type, shape, at)  # type: ignore[attr-defined]
            io.bind_output(present, self.device, 0, self.dtype.type, shape, at)  # type: ignore[attr-defined]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of row ``src`` into row ``dst`` (numpy buffers: n > 1 choices of one prompt)."""
        assert not self.ortvalues, "row copies run on numpy buffers"
        for a in self.arrays:
            a[dst, :, :length] = a[src, :, :length]

    def pasts(self, lo: int, hi: int, width: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi), positions [0, width) as contiguous arrays (the copying path; numpy buffers)."""
        assert not self.ortvalues, "the copying path runs on numpy buffers (GraphRunner.new_slots)"
        return {n: np.ascontiguousarray(a[lo:hi, :, :width]) for n, a in zip(self.names, self.arrays)}

    def store(self, lo: int, presents: Sequence[np.ndarray]) -> None:
        """Write an older graph's present outputs (rows from ``lo``, positions from 0) back into the buffers."""
        for a, p in zip(self.arrays, presents):
            a[lo:lo + p.shape[0], :, :p.shape[2]] = p


class KVCache:
    """One sequence's KV: its slot in a ``KVSlots`` and the token ids whose positions are valid there."""

    def __init__(self, slots: KVSlots, slot: int | None = None) -> None:
        self.slots = slots
        self.slot = slots.take() if slot is None else slot
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def rewind_to(self, length: int) -> None:
        """Drop every position from ``length`` on (a length change: the rows stay where they are)."""
        del self.tokens[length:]

    def release(self) -> None:
        self.slots.give(self.slot)


class PrefixCache:
    """A few finished sequences' KV, kept in their rows, so a request that starts with one of them skips
    re-encoding it: it takes the row over and rewinds it to the shared prefix.

    A chat's next turn repeats the previous turn's prompt and answer: only the new tokens need a prefill.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: list[KVCache] = []  # most recent last

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, cache: KVCache) -> None:
        """Keep ``cache`` (its row stays allocated); the oldest entry beyond capacity gives its row back."""
        if self.capacity <= 0 or not cache.tokens:
            cache.release()
            return
        for e in [e for e in self._entries if e.tokens == cache.tokens]:
            self._entries.remove(e)
            e.release()
        self._entries.append(cache)
        while len(self._entries) > self.capacity:
            self._entries.pop(0).release()

    def held(self) -> dict[int, int]:
        """Slot -> valid length of every kept row."""
        return {e.slot: len(e) for e in self._entries}

    def evict(self, slot: int) -> None:
        for e in [e for e in self._entries if e.slot == slot]:
            self._entries.remove(e)
            e.release()

    def evict_oldest(self) -> bool:
        if not self._entries:
            return False
        self._entries.pop(0).release()
        return True

    def take(self, prompt: Sequence[int]) -> KVCache | None:
        """The entry sharing the longest prefix with ``prompt``, removed from the cache and rewound to that prefix
        (always leaving one prompt token to prefill), or None."""
        best, best_len = None, 0
        for entry in self._entries:
            n = common_prefix(entry.tokens, prompt)
            if n > best_len:
                best, best_len = entry, n
        keep = min(best_len, len(prompt) - 1)
        if best is None or keep <= 0:
            return None
        self._entries.remove(best)
        best.rewind_to(keep)
        return best
