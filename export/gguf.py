"""Carries GGUF block-quantized weights into the bundle without re-rounding them.

Every ggml type below maps onto onnxruntime's MatMulNBits weight form ``w = scale * (code - zero_point) + offset``
(``offset`` added as ``block_sums(x) @ offsets^T`` next to the matmul) with the same integers and fp32 products
that ``gguf.quants.dequantize`` computes, so each carried matrix dequantizes bit-identically:

  Q4_0: d * (q - 8)                    4-bit codes q, zero point 8
  Q4_1: d * q + m                      4-bit codes q, zero point 0, offset m
  Q5_0: d * (q - 16)                   8-bit codes q + 112, zero point 128
  Q5_1: d * q + m                      8-bit codes q, zero point 0, offset m
  Q8_0: d * q  (q signed)              8-bit codes q + 128, zero point 128
  Q4_K: (d * sc) * q - (dmin * m)      4-bit codes q, scale d * sc, zero point 0, offset -(dmin * m)   (blocks of 32)
  Q5_K: (d * sc) * q - (dmin * m)      8-bit codes q, the same                                         (blocks of 32)
  Q6_K: (d * sc) * (q - 32)            8-bit codes q + 96, zero point 128                              (blocks of 16)

The scale and min terms stay separate (zero point 0 plus an offset): folding them into one offset with zero point 8,
as a symmetric kernel would want, rounds about 0.01% of the weights one ulp away from what the GGUF holds.

Layouts: ggml packs elements j and j+16 of a 32-block in byte j (K-quants: j and j+32 of a 64-element group);
MatMulNBits packs elements 2k and 2k+1 in byte k. llama.cpp stores Llama/Mistral q/k rows permuted for its rotary
layout; transformers un-permutes them on load, and so do we (rows only: blocks run along the input dimension, so a
row permutation keeps every block intact). Other types (Q2_K, Q3_K, the IQ family, ternary) cannot be carried
exactly; ``read`` leaves them to the caller, which dequantizes and re-quantizes them with a warning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export import registry
from edgekit.export.weights import BLOCK, BlockQuantLinear, concat_rows
from edgekit.runtimes.errors import ExportError, UnsupportedModelError

QK_K = 256
# ggml type -> (MatMulNBits bits, block size) of its exact carry-over
CARRIED: dict[str, tuple[int, int]] = {
    "Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (8, 32), "Q5_1": (8, 32), "Q8_0": (8, 32),
    "Q4_K": (4, 32), "Q5_K": (8, 32), "Q6_K": (8, 16),
}
DENSE = ("F32", "F16", "BF16")  # carried as float weights (exact)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of a 32-block -> [..., 32] values: byte j holds elements j (low) and j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """[..., count / 8] bytes -> [..., count] bits, element i = bit (i % 8) of byte i / 8 (little-endian)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :count]


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins per super-block."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _kquant_low(qs: np.ndarray) -> np.ndarray:
    """K-quant 4-bit low parts: [n, S, 128] bytes -> [n, S, 256]; each 32-byte chunk c holds elements
    64c + j (low nibble) and 64c + 32 + j (high nibble)."""
    n, s = qs.shape[:2]
    q = qs.reshape(n, s, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    return (q & 0x0F).reshape(n, s, QK_K)


def from_ggml(raw: np.ndarray, qtype: str) -> BlockQuantLinear:
    """Convert raw ggml rows (uint8 [N, row_bytes]) of a type in ``CARRIED`` into MatMulNBits blocks."""
    n = raw.shape[0]
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[qtype]
        b = raw.reshape(n, -1, size)
        d = _f16(b[:, :, 0:2].reshape(n, -1, 2))
        if qtype == "Q8_0":
            q = b[:, :, 2:].view(np.int8).astype(np.int16) + 128
            return BlockQuantLinear(8, q.astype(np.uint8).reshape(n, -1), d, None, None, qtype)
        m = _f16(b[:, :, 2:4].reshape(n, -1, 2)) if qtype in ("Q4_1", "Q5_1") else None
        qs = b[:, :, size - 16:]
        q = _nibbles32(qs)
        if qtype in ("Q5_0", "Q5_1"):
            qh = b[:, :, size - 20:size - 16]
            q = q | (_high_bits(qh, 32) << 4)
        if qtype == "Q4_0":
            return BlockQuantLinear(4, q.reshape(n, -1), d, None, None, qtype)
        if qtype == "Q5_0":  # d * (q - 16) = d * ((q + 112) - 128)
            return BlockQuantLinear(8, (q + 112).astype(np.uint8).reshape(n, -1), d, None, None, qtype)
        bits = 4 if qtype == "Q4_1" else 8
        return BlockQuantLinear(bits, q.reshape(n, -1), d, np.zeros(d.shape, np.uint8), m, qtype)
    if qtype in ("Q4_K", "Q5_K"):
        size = 144 if qtype == "Q4_K" else 176
        b = raw.reshape(n, -1, size)
        s = b.shape[1]
        d, dmin = _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4])
        sc, mn = _k_scales(b[:, :, 4:16])
        scale = (d[:, :, None] * sc).reshape(n, -1)
        offset = -(dmin[:, :, None] * mn).reshape(n, -1)
        if qtype == "Q4_K":
            q = _kquant_low(b[:, :, 16:144])
        else:  # 32 bytes of high bits: bit i of byte j is element 32 i + j's fifth bit
            hi = b[:, :, 16:48].reshape(n, s, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
            q = _kquant_low(b[:, :, 48:176]) | ((hi & 1).reshape(n, s, QK_K) << 4)
        return BlockQuantLinear(4 if qtype == "Q4_K" else 8, q.reshape(n, -1).astype(np.uint8), scale,
                                np.zeros(scale.shape, np.uint8), offset, qtype)
    if qtype == "Q6_K":
        b = raw.reshape(n, -1, 210)
        s = b.shape[1]
        ql, qh = b[:, :, 0:128], b[:, :, 128:192]
        sc = b[:, :, 192:208].view(np.int8).astype(np.float32)
        d = _f16(b[:, :, 208:210])
        low = ql.reshape(n, s, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        low = (low & 0x0F).reshape(n, s, 2, 4, 32)  # [half, quarter, 32]
        high = qh.reshape(n, s, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        q = (low | ((high & 0x03) << 4)).reshape(n, -1)
        scale = (d[:, :, None] * sc).reshape(n, -1)  # one per 16 elements
        return BlockQuantLinear(8, (q + 96).astype(np.uint8), scale, None, None, qtype, block=16)
    raise UnsupportedModelError(f"GGUF tensor type {qtype} has no exact carry-over (carried: {', '.join(CARRIED)}).")


def _unpermute(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (the same reshape transformers applies on load)."""
    idx = np.arange(n_rows)
    dim = n_rows // n_head // 2
    return idx.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows)


@dataclass(frozen=True)
class Requantized:
    """A tensor whose GGUF type has no exact carry-over: dequantized, then re-quantized (RTN, 4-bit)."""

    name: str
    source_type: str
    rel_error: float  # ||w_rtn - w_gguf|| / ||w_gguf||


@dataclass(frozen=True)
class GGUFWeights:
    """The linear weights of a GGUF, in the layout of export.registry.LayerWeights."""

    layers: list[dict[str, BlockQuantLinear | np.ndarray]]  # per layer: qkv, o, gate_up, down
    embed: BlockQuantLinear | None  # token embedding (also the tied lm_head) when carried as 8-bit blocks
    lm_head: BlockQuantLinear | None  # untied output weight when carried as blocks
    types: dict[str, int]  # ggml type name -> tensor count
    requantized: tuple[Requantized, ...] = ()
    max_abs_diff: float = 0.0  # carried matrices vs gguf.quants.dequantize (0: bit-identical)


def _requantize(w: np.ndarray) -> BlockQuantLinear:
    """Round-to-nearest 4-bit, blocks of 32 with a float offset (the fallback for types without a carry-over)."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK)
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    scale = np.where(hi > lo, (hi - lo) / 15, 1.0).astype(np.float32)
    q = np.clip(np.rint((b - lo[:, :, None]) / scale[:, :, None]), 0, 15).astype(np.uint8)
    return BlockQuantLinear(4, q.reshape(n, k), scale, np.zeros(scale.shape, np.uint8), lo.astype(np.float32), "RTN4")


def read(path: Path, config: Any, verify: bool = True) -> GGUFWeights:
    """Read every linear of a GGUF as MatMulNBits blocks (exact for the types in ``CARRIED``; float types stay
    float; other types are re-quantized and reported). With ``verify``, check every carried matrix dequantizes to
    exactly what ``gguf.quants.dequantize`` gives for the file's bytes (max |diff| 0) and refuse the file if not."""
    from gguf.quants import dequantize

    reader = _reader(path)
    tensors = {t.name: t for t in reader.tensors}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    model_type = getattr(config, "model_type", "")
    layout = registry.gguf_layout(model_type)
    if layout is None:
        raise UnsupportedModelError(f"GGUF carry-over supports the {', '.join(registry.GGUF_FAMILIES)} layouts; "
                                    f"'{path.name}' is "
                                    f"{model_type!r}. HINT: use --algo rtn to re-quantize its dequantized weights.")
    requantized: list[Requantized] = []
    worst = [0.0]

    def get(name: str, rows: np.ndarray | None = None) -> BlockQuantLinear | np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"GGUF file {path.name} has no tensor '{name}' (not a {model_type} layout?).")
        qtype = t.tensor_type.name
        raw = np.asarray(t.data)
        if qtype in DENSE:
            w = raw.astype(np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
            return w if rows is None else w[rows]
        ref = (dequantize(raw, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
               if verify or qtype not in CARRIED else None)
        if ref is not None and qtype not in CARRIED:
            w = _requantize(ref)
            err = float(np.linalg.norm(w.dequantize() - ref) / max(np.linalg.norm(ref), 1e-30))
            requantized.append(Requantized(name, qtype, err))
        else:
            w = from_ggml(raw.reshape(int(t.shape[1]), -1), qtype)
            if ref is not None:
                diff = float(np.abs(w.dequantize() - ref).max())
                if diff != 0.0:
                    raise ExportError(f"GGUF carry-over of '{name}' ({qtype}) differs from gguf's dequantization "
                                      f"(max |diff| {diff:.3g}); refusing an inexact bundle. HINT: use --algo rtn.")
                worst[0] = max(worst[0], diff)
        return w if rows is None else w.rows(rows)

    def pack(parts: list[BlockQuantLinear | np.ndarray]) -> BlockQuantLinear | np.ndarray:
        if len(parts) == 1:
            return parts[0]
        if all(isinstance(x, BlockQuantLinear) for x in parts):
            return concat_rows(parts)  # type: ignore[arg-type]
        return np.concatenate([x.dequantize() if isinstance(x, BlockQuantLinear) else x for x in parts])

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"blk.{i}."
        if layout.permute_qk:
            q = get(p + "attn_q.weight", _unpermute(_rows(tensors, p + "attn_q.weight"), heads))
            k = get(p + "attn_k.weight", _unpermute(_rows(tensors, p + "attn_k.weight"), kv_heads))
            qkv = [q, k, get(p + "attn_v.weight")]
        else:
            qkv = [get(p + n + ".weight") for n in layout.qkv]
        layers.append({"qkv": pack(qkv), "o": get(p + "attn_output.weight"),
                       "gate_up": pack([get(p + n + ".weight") for n in layout.gate_up]),
                       "down": get(p + "ffn_down.weight")})

    def head(name: str) -> BlockQuantLinear | None:
        t = tensors.get(name)
        if t is None or CARRIED.get(t.tensor_type.name, (0,))[0] != 8 or t.tensor_type.name in ("Q5_1", "Q5_K"):
            return None  # 8-bit blocks without offsets only (GatherBlockQuantized has no offset term)
        w = get(name)
        assert isinstance(w, BlockQuantLinear)
        return w.widened(8, BLOCK) if w.block != BLOCK else w

    return GGUFWeights(layers, head("token_embd.weight"), head("output.weight"), types, tuple(requantized),
                       worst[0])


def _rows(tensors: dict[str, Any], name: str) -> int:
    t = tensors.get(name)
    if t is None:
        raise UnsupportedModelError(f"GGUF file has no tensor '{name}'.")
    return int(t.shape[1])


def check_layer(i: int, ours: dict[str, BlockQuantLinear | np.ndarray], reference: Any, tol: float = 1e-5) -> float:
    """Check layer ``i``'s carried weights match the ones transformers loaded (``reference``: its LayerWeights; same
    layout: names, row order, packing); return max|Δ|."""
    worst = 0.0
    for key, w in ours.items():
        dense = w.dequantize() if isinstance(w, BlockQuantLinear) else w
        diff = float(np.abs(dense - getattr(reference, key)).max())
        worst = max(worst, diff)
        if diff > tol:
            raise ExportError(
                f"GGUF carry-over of layer {i} '{key}' differs from the weights transformers loaded "
                f"(max |Δ| {diff:.3g} > {tol:g}); refusing a lossy bundle. HINT: use --algo rtn or --algo hqq."
            )
    return worst


@dataclass(frozen=True)
class Inspection:
    """What a GGUF file holds, read from its tensor table without loading the weights."""

    linear_types: frozenset[str]  # ggml types of the layers' 2-D weights
    embed_type: str | None
    output_type: str | None  # None: tied to the embedding

    def carries(self, bits: int) -> bool:
        """Whether every layer weight is carried over exactly in a ``bits``-bit bundle: int4 takes every carried
        type (a Q4_K_M file is mostly Q5_0/Q6_K/Q8_0; types without one are re-quantized with a warning), int8
        the 8-bit ones."""
        if bits == 8:
            return bool(self.linear_types) and self.linear_types <= {t for t, (b, _) in CARRIED.items() if b == 8}
        return bool(self.linear_types) and bool(self.linear_types & set(CARRIED))

    @property
    def head_is_q8(self) -> bool:
        """The embedding (and output layer, when it has its own) are 8-bit blocks without offsets (Q8_0, Q5_0,
        Q6_K) that edgekit carries as 8-bit GatherBlockQuantized / MatMulNBits."""
        eight = {"Q8_0", "Q5_0", "Q6_K"}
        return self.embed_type in eight and (self.output_type or self.embed_type) in eight

    @property
    def uncarried(self) -> frozenset[str]:
        """Linear types with no exact carry-over (re-quantized with a warning)."""
        return frozenset(t for t in self.linear_types if t not in CARRIED and t not in DENSE)


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError) as e:  # e.g. "250 is not a valid GGMLQuantizationType"
        raise UnsupportedModelError(
            f"GGUF file {Path(path).name} cannot be read by gguf-py: {e}. A tensor type this gguf version does not "
            "know, or a damaged file. HINT: re-convert it with a current llama.cpp (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/"
            "Q4_K/Q5_K/Q6_K carry over exactly), or upgrade the gguf package.") from None


def _reader(path: Path) -> Any:
    """One parsed reader per file (parsing a GGUF's metadata, e.g. a 150k-token vocabulary, takes seconds)."""
    st = Path(path).stat()
    return _open(str(path), st.st_mtime_ns, st.st_size)


def inspect(path: Path) -> Inspection:
    tensors = _reader(path).tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    linear = frozenset(t.tensor_type.name for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return Inspection(linear, types.get("token_embd.weight"), types.get("output.weight"))
