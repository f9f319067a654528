"""The tables of export choices: precisions and quantization methods, what each needs and refuses, and the parity
tolerance it is held to. The plan validates against them, the CLI takes its ``choices=`` from them, and the
manifest records the chosen row as a typed ``Quantization`` record."""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
ACCURACY_LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4)
QUANT_FORMATS: tuple[str, ...] = ("nbits", "qdq")  # MatMulNBits (onnxruntime's kernels) | DequantizeLinear + MatMul
KV_DTYPES: tuple[str, ...] = ("fp32", "fp16")
LM_HEADS: tuple[str, ...] = ("fp32", "int8")  # a GGUF's output layer: dequantized exactly | its Q8_0 blocks
# static W8A8 QDQ (per-tensor activation scales), measured before it was refused: SmolLM2-135M top-1 agreement 28%
W8A8_MEASURED = "28% top-1 agreement on SmolLM2-135M (per-tensor activation scales cannot hold its outliers)"


@dataclass(frozen=True)
class QuantMethod:
    """One way of making int8/int4 weights."""

    name: str
    bits: tuple[int, ...]  # the widths it writes
    summary: str
    formats: tuple[str, ...] = ("nbits",)  # graph forms it can write
    gguf_source: bool = False  # carries a GGUF file's blocks over: needs such a source, refuses pruning
    calibrated: bool = False  # runs the float graph on calibration text
    block_sizes: tuple[int, ...] = BLOCK_SIZES
    accuracy_level: int = 4  # default MatMulNBits compute mode (0: float activations, 4: int8 activations)

    def tolerance(self, precision: str, accuracy_level: int, kv_cache: str = "fp32") -> str:
        """The parity tolerance (a key of edgekit.report.TOLERANCES) a bundle made this way is held to."""
        if self.gguf_source:  # exact layers at accuracy level 0: near-fp32 promises
            if kv_cache == "fp16":  # the same weights (fp16 scales) under fp16 activations
                return f"{precision}/gguf-fp16"
            return f"{precision}/gguf" + ("-int8act" if accuracy_level >= 4 else "")  # 8-bit heads: exact too
        return precision


METHODS: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("gguf", (4, 8), "carry the GGUF file's blocks over unchanged (exact)", gguf_source=True,
                block_sizes=(32,), accuracy_level=0),
    QuantMethod("rtn", (4, 8), "round to nearest, per block (onnxruntime's MatMulNBits quantizer)",
                formats=QUANT_FORMATS),
    QuantMethod("hqq", (4, 8), "half-quadratic quantization (float zero points)"),
    QuantMethod("gptq", (4,), "GPTQ, calibrated on --calibration text (onnxruntime's implementation)",
                calibrated=True),
)}
