"""Weight-only quantization of a built decoder graph with onnxruntime's MatMulNBits quantizers (RTN, HQQ).

The transformer matmuls get ``bits`` (4 or 8); lm_head gets 8 bits (4-bit logits cost too much fidelity); the
embedding stays float. GGUF sources can instead carry their blocks over unchanged (export/gguf.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx

from edgekit.runtimes.errors import ConfigError

ALGOS: tuple[str, ...] = ("gguf", "rtn", "hqq")


def quantize_weights(
    model: onnx.ModelProto, bits: int, algo: str, block_size: int, accuracy_level: int,
    on_step: Callable[[str], None] | None = None,
) -> onnx.ModelProto:
    """Quantize every MatMul with a constant weight; lm_head (node name 'lm_head') to 8 bits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    if algo == "rtn":
        body_cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                accuracy_level=accuracy_level, bits=bits)
    elif algo == "hqq":
        body_cfg = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    else:
        raise ConfigError(f"algo {algo!r} cannot re-quantize a graph; use rtn or hqq.")
    if on_step:
        on_step(f"{algo} {bits}-bit, block {block_size}, transformer matmuls")
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                             accuracy_level=accuracy_level, algo_config=body_cfg, nodes_to_exclude=["lm_head"])
    q.process()
    model = q.model.model
    if on_step:
        on_step(f"rtn 8-bit, block {block_size}, lm_head")
    head_cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                            accuracy_level=accuracy_level, bits=8)
    q8 = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, accuracy_level=accuracy_level,
                              algo_config=head_cfg, nodes_to_include=["lm_head"])
    q8.process()
    return q8.model.model
