"""Block-quantized weight types: a [N, K] matrix as MatMulNBits blocks of codes, scales, zero points and offsets.
The GGUF reader produces them, the graph builder writes them (MatMulNBits, or DequantizeLinear for TensorRT)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

BLOCK = 32  # elements per block along K (GGUF's legacy and K-quant sub-blocks; Q6_K halves it)


@dataclass(frozen=True)
class BlockQuantLinear:
    """A [N, K] weight as MatMulNBits blocks: w[n, k] = scales[n, b] * (codes[n, k] - zp[n, b]) + offsets[n, b]."""

    bits: int  # 4 or 8
    codes: np.ndarray  # uint8 [N, K], unpacked
    scales: np.ndarray  # float32 [N, K / block]
    zero_points: np.ndarray | None  # uint8 [N, K / block]; None: the default 2^(bits - 1)
    offsets: np.ndarray | None  # float32 [N, K / block]; None: zero
    source_type: str
    block: int = BLOCK

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    @property
    def packed(self) -> np.ndarray:
        """uint8 [N, K / block, block * bits / 8] in MatMulNBits order (4-bit: element 2k low nibble of byte k)."""
        n, k = self.shape
        c = self.codes.reshape(n, k // self.block, self.block)
        return c if self.bits == 8 else (c[:, :, 0::2] | (c[:, :, 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits' zero_points input: 8-bit [N, blocks]; 4-bit two per byte, even block in the low nibble."""
        if self.zero_points is None:
            return None
        if self.bits == 8:
            return self.zero_points
        z = self.zero_points
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
        return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        nb = k // self.block
        zp = (np.full((n, nb), 1 << (self.bits - 1), np.float32) if self.zero_points is None
              else self.zero_points.astype(np.float32))
        q = self.codes.reshape(n, nb, self.block).astype(np.float32) - zp[:, :, None]
        w = q * self.scales[:, :, None]
        if self.offsets is not None:
            w = w + self.offsets[:, :, None]
        return w.reshape(n, k)

    def nibbles(self) -> tuple[BlockQuantLinear, BlockQuantLinear] | None:
        """An 8-bit weight as two 4-bit ones whose sum is exactly it: codes c = lo + 16 hi, so
        s (c - z) = s (lo - 0) + 16 s (hi - z / 16) (z is 0 or 128). onnxruntime's CPU kernel for 8-bit blocks
        with float activations is a slow fallback; two 4-bit matmuls stay on the fast path. Both products are
        exact in fp32 and the sum rounds once, so the weight is the same float. None if z is not a multiple of 16."""
        if self.bits != 8:
            return None
        zp = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, 128, np.uint8)
        if (zp % 16).any():
            return None
        lo = replace(self, bits=4, codes=(self.codes & 0x0F).astype(np.uint8), zero_points=np.zeros_like(zp))
        hi = replace(self, bits=4, codes=(self.codes >> 4).astype(np.uint8), scales=self.scales * np.float32(16),
                     zero_points=(zp // 16).astype(np.uint8), offsets=None)
        return lo, hi

    def centered(self) -> BlockQuantLinear:
        """The form for int8-activation kernels: blocks with zero point 0 and an offset (the min term) get their
        codes' midpoint as zero point, the offset absorbing ``zp * scale``. Mathematically the same weight (for
        Q4_K about 0.01% of weights move one ulp), but the main term the kernel computes on quantized activations
        is then centred, so its activation-rounding error no longer carries the whole min term: SmolLM2's Q4_1 at
        accuracy level 4 gives 89.5% top-1 in the zero-point-0 form and 98.2% in this one (onnxruntime 1.32)."""
        if self.offsets is None or self.zero_points is None:
            return self
        n, k = self.shape
        peak = self.codes.reshape(n, k // self.block, self.block).max(axis=-1)
        mid = np.where(peak < 16, 8, 16 if self.bits == 8 else 8).astype(np.uint8)
        move = self.zero_points == 0
        zp = np.where(move, mid, self.zero_points).astype(np.uint8)
        offsets = np.where(move, self.offsets + zp.astype(np.float32) * self.scales, self.offsets)
        zp_out = None if self.bits == 4 and (zp == 8).all() else zp
        return replace(self, zero_points=zp_out, offsets=offsets.astype(np.float32))

    def rows(self, order: np.ndarray) -> BlockQuantLinear:
        pick = lambda a: None if a is None else a[order]  # noqa: E731
        return replace(self, codes=self.codes[order], scales=self.scales[order],
                       zero_points=pick(self.zero_points), offsets=pick(self.offsets))

    def widened(self, bits: int, block: int) -> BlockQuantLinear:
        """The same weight with ``bits``-bit codes and blocks of ``block`` (exact: the integers do not change)."""
        if (bits, block) == (self.bits, self.block):
            return self
        assert bits >= self.bits and self.block % block == 0, "only widen codes / split blocks"
        rep = self.block // block
        zp = self.zero_points if self.zero_points is not None else np.full(
            self.scales.shape, 1 << (self.bits - 1), np.uint8)
        split = lambda a: None if a is None else np.repeat(a, rep, axis=1)  # noqa: E731
        zp = split(zp)
        return replace(self, bits=bits, block=block, scales=split(self.scales),
                       zero_points=None if (zp == 1 << (bits - 1)).all() else zp, offsets=split(self.offsets))


def concat_rows(parts: Sequence[BlockQuantLinear]) -> BlockQuantLinear:
    """Stack weights along N (packed QKV, gate/up), in the widest code and smallest block any part needs."""
    bits, block = max(p.bits for p in parts), min(p.block for p in parts)
    parts = [p.widened(bits, block) for p in parts]
    explicit = any(p.zero_points is not None for p in parts)
    default = np.uint8(1 << (bits - 1))
    zps = ([p.zero_points if p.zero_points is not None else np.full(p.scales.shape, default, np.uint8)
            for p in parts] if explicit else None)
    any_offsets = any(p.offsets is not None for p in parts)
    offsets = (np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])
               if any_offsets else None)
    return BlockQuantLinear(bits, np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                            None if zps is None else np.concatenate(zps), offsets,
                            "+".join(sorted({p.source_type for p in parts})), block)
