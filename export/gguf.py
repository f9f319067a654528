"""Carries GGUF block-quantized weights (Q4_0, Q4_1, Q8_0) into the bundle without re-rounding them.

Each GGUF linear becomes a MatMulNBits weight with the same integers and scales, so the int4 bundle computes what
the dequantized PyTorch model computes (up to float summation order), instead of a second rounding of it.

  Q4_0: w = d * (q - 8)          -> 4-bit MatMulNBits, default zero point 8: exact
  Q4_1: w = d * q + m            =  d * (q - 8) + (m + 8d): MatMulNBits + a per-block offset times the block sums of x
  Q8_0: w = d * q (q signed)     -> 8-bit MatMulNBits on q + 128, default zero point 128: exact

Layouts: ggml packs elements j and j+16 of a 32-block in byte j; MatMulNBits packs elements 2k and 2k+1 in byte k.
llama.cpp stores Llama q/k rows permuted for its rotary layout; transformers un-permutes them on load, and so do we
(rows only: blocks run along the input dimension, so a row permutation keeps every block intact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes.errors import ExportError, UnsupportedModelError

BLOCK = 32
SUPPORTED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


@dataclass(frozen=True)
class BlockQuantLinear:
    """A [N, K] weight as MatMulNBits blocks of 32: w[n, k] = scales[n, b] * (q[n, k] - zp) + offsets[n, b]."""

    bits: int
    packed: np.ndarray  # uint8 [N, K / 32, 32 * bits / 8]
    scales: np.ndarray  # float32 [N, K / 32]
    offsets: np.ndarray | None  # float32 [N, K / 32], None when zero (Q4_0, Q8_0)
    source_type: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * BLOCK

    def codes(self) -> np.ndarray:
        """The integer codes, [N, K] (unsigned, before subtracting the zero point)."""
        if self.bits == 8:
            return self.packed.reshape(self.packed.shape[0], -1)
        lo, hi = self.packed & 0x0F, self.packed >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.packed.shape[0], -1)

    def dequantize(self) -> np.ndarray:
        n, nb = self.scales.shape
        zp = 8 if self.bits == 4 else 128
        q = self.codes().reshape(n, nb, BLOCK).astype(np.float32) - zp
        w = q * self.scales[:, :, None]
        if self.offsets is not None:
            w = w + self.offsets[:, :, None]
        return w.reshape(n, nb * BLOCK)

    def rows(self, order: np.ndarray) -> BlockQuantLinear:
        off = None if self.offsets is None else self.offsets[order]
        return BlockQuantLinear(self.bits, self.packed[order], self.scales[order], off, self.source_type)


def concat_rows(parts: Sequence[BlockQuantLinear]) -> BlockQuantLinear:
    """Stack weights along N (packed QKV, gate/up); offsets become zeros where a part has none."""
    if len({p.bits for p in parts}) != 1:
        raise UnsupportedModelError("Cannot pack GGUF tensors of different bit widths into one matmul.")
    any_offsets = any(p.offsets is not None for p in parts)
    offsets = (np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])
               if any_offsets else None)
    return BlockQuantLinear(parts[0].bits, np.concatenate([p.packed for p in parts]),
                            np.concatenate([p.scales for p in parts]), offsets,
                            "+".join(sorted({p.source_type for p in parts})))


def from_ggml(raw: np.ndarray, qtype: str) -> BlockQuantLinear:
    """Convert raw ggml rows (uint8 [N, row_bytes]) of a Q4_0 / Q4_1 / Q8_0 tensor."""
    n = raw.shape[0]
    if qtype == "Q8_0":
        blocks = raw.reshape(n, -1, 34)
        d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
        q = blocks[:, :, 2:].copy().view(np.int8)
        return BlockQuantLinear(8, (q.astype(np.int16) + 128).astype(np.uint8), d, None, qtype)
    size = {"Q4_0": 18, "Q4_1": 20}[qtype]
    blocks = raw.reshape(n, -1, size)
    d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32) if qtype == "Q4_1" else None
    qs = blocks[:, :, size - 16 :]
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # ggml order: byte j holds elements j and j + 16
    packed = (values[:, :, 0::2] | (values[:, :, 1::2] << 4)).astype(np.uint8)  # MatMulNBits: 2k low, 2k+1 high
    offsets = None if m is None else (m + 8.0 * d).astype(np.float32)
    return BlockQuantLinear(4, packed, d, offsets, qtype)


def _unpermute(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (the same reshape transformers applies on load)."""
    idx = np.arange(n_rows)
    dim = n_rows // n_head // 2
    return idx.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows)


@dataclass(frozen=True)
class GGUFWeights:
    """The linear weights of a Llama-family GGUF, in the layout of export.registry.LayerWeights."""

    layers: list[dict[str, BlockQuantLinear]]  # per layer: qkv, o, gate_up, down
    embed: BlockQuantLinear | None  # token embedding (also the tied lm_head) when quantized
    lm_head: BlockQuantLinear | None  # untied output weight when quantized
    types: dict[str, int]  # ggml type name -> tensor count


def read(path: Path, config: Any) -> GGUFWeights:
    """Read every linear of a Llama-family GGUF as MatMulNBits blocks; refuse types that cannot carry over."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1

    def get(name: str) -> BlockQuantLinear:
        t = tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"GGUF file {path.name} has no tensor '{name}' (not a Llama-family layout?).")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED:
            raise UnsupportedModelError(
                f"GGUF tensor '{name}' is {qtype}; lossless carry-over supports {', '.join(SUPPORTED)}. "
                "HINT: pass --algo rtn or --algo hqq to re-quantize the dequantized weights instead."
            )
        return from_ggml(np.asarray(t.data), qtype)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"blk.{i}."
        q, k = get(p + "attn_q.weight"), get(p + "attn_k.weight")
        q, k = q.rows(_unpermute(q.shape[0], heads)), k.rows(_unpermute(k.shape[0], kv_heads))
        layers.append({
            "qkv": concat_rows([q, k, get(p + "attn_v.weight")]),
            "o": get(p + "attn_output.weight"),
            "gate_up": concat_rows([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")]),
            "down": get(p + "ffn_down.weight"),
        })
    embed_t = tensors.get("token_embd.weight")
    embed = get("token_embd.weight") if embed_t is not None and embed_t.tensor_type.name in SUPPORTED else None
    out_t = tensors.get("output.weight")
    lm_head = get("output.weight") if out_t is not None and out_t.tensor_type.name in SUPPORTED else None
    return GGUFWeights(layers, embed, lm_head, types)


def verify_against(weights: GGUFWeights, reference: list[dict[str, np.ndarray]], tol: float = 1e-5) -> float:
    """Check every carried-over weight dequantizes to the reference (transformers' dequantized model); return max|Δ|."""
    worst = 0.0
    for i, (ours, ref) in enumerate(zip(weights.layers, reference)):
        for key, w in ours.items():
            diff = float(np.abs(w.dequantize() - ref[key]).max())
            worst = max(worst, diff)
            if diff > tol:
                raise ExportError(
                    f"GGUF carry-over of layer {i} '{key}' differs from the weights transformers loaded "
                    f"(max |Δ| {diff:.3g} > {tol:g}); refusing a lossy bundle. HINT: use --algo rtn or --algo hqq."
                )
    return worst


FAMILIES = ("llama", "mistral")  # GGUF layouts whose q/k row permutation ``read`` undoes


@dataclass(frozen=True)
class Inspection:
    """What a GGUF file holds, read from its tensor table without loading the weights."""

    linear_types: frozenset[str]  # ggml types of the layers' 2-D weights
    embed_type: str | None
    output_type: str | None  # None: tied to the embedding

    def carries(self, bits: int) -> bool:
        """Whether every layer weight can be carried over exactly at ``bits`` (Q8_0 layers fit int4 bundles too)."""
        wanted = {t for t, b in SUPPORTED.items() if b == bits} | {"Q8_0"}
        return bool(self.linear_types) and self.linear_types <= wanted

    @property
    def head_is_q8(self) -> bool:
        """The embedding (and output layer, when it has its own) are Q8_0 blocks edgekit can carry."""
        return self.embed_type == "Q8_0" and (self.output_type or "Q8_0") == "Q8_0"


def inspect(path: Path) -> Inspection:
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    linear = frozenset(t.tensor_type.name for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return Inspection(linear, types.get("token_embd.weight"), types.get("output.weight"))
