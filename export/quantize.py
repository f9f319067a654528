"""Weight-only quantization of a built decoder graph with onnxruntime's MatMulNBits quantizers (RTN, HQQ, GPTQ).

The transformer matmuls get ``bits`` (4 or 8); lm_head gets 8 bits (4-bit logits cost too much fidelity); the
embedding stays float. GPTQ (onnxruntime's bundled implementation) runs the float graph on calibration sequences to
collect each matmul's input Hessian, then quantizes column by column compensating the error. GGUF sources can
instead carry their blocks over unchanged (export/gguf.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from edgekit.runtimes.errors import ConfigError

ALGOS: tuple[str, ...] = ("gguf", "rtn", "hqq", "gptq")


def _reader(feeds: Sequence[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

        def __deepcopy__(self, memo: Any) -> Any:  # the quantizer deep-copies the reader before iterating it
            return Reader()

    return Reader()


def quantize_weights(
    model: onnx.ModelProto, bits: int, algo: str, block_size: int, accuracy_level: int,
    on_step: Callable[[str], None] | None = None, calibration: Sequence[dict[str, np.ndarray]] = (),
) -> onnx.ModelProto:
    """Quantize every MatMul with a constant weight; lm_head (node name 'lm_head') to 8 bits. ``calibration``:
    graph feeds for GPTQ (required there)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    if algo == "rtn":
        body_cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                accuracy_level=accuracy_level, bits=bits)
    elif algo == "hqq":
        body_cfg = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    elif algo == "gptq":
        if bits != 4:
            raise ConfigError("onnxruntime's GPTQ writes 4-bit weights only; use --precision int4 with --algo gptq "
                              "(or --algo rtn for int8).")
        if not calibration:
            raise ConfigError("GPTQ needs calibration sequences (the built-in text or --calibration FILE).")
        logging.getLogger("onnxruntime.quantization.neural_compressor").setLevel(logging.WARNING)
        body_cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(calibration), percdamp=0.01,
                                             block_size=128, actorder=False, mse=False, perchannel=True)
    else:
        raise ConfigError(f"algo {algo!r} cannot re-quantize a graph; use rtn or hqq.")
    # lm_head first: once it is a MatMulNBits the body pass cannot touch it (GPTQ ignores nodes_to_exclude)
    if on_step:
        on_step(f"rtn 8-bit, block {block_size}, lm_head")
    head_cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                            accuracy_level=accuracy_level, bits=8)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != "lm_head"]
    q8 = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, accuracy_level=accuracy_level,
                              algo_config=head_cfg, nodes_to_exclude=others)  # (nodes_to_include does not restrict)
    q8.process()
    model = q8.model.model
    if on_step:
        extra = f" ({len(calibration)} calibration sequences)" if algo == "gptq" else ""
        on_step(f"{algo} {bits}-bit, block {block_size}, transformer matmuls{extra}")
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                             accuracy_level=accuracy_level, algo_config=body_cfg, nodes_to_exclude=["lm_head"])
    q.process()
    return q.model.model
