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
    head_bits: int | None = 8,
) -> onnx.ModelProto:
    """Quantize every MatMul with a constant weight to MatMulNBits; lm_head (node name 'lm_head') to ``head_bits``
    (None: it stays float, for an onnxruntime without 8-bit MatMulNBits).
    ``calibration``: graph feeds for GPTQ (required there). Which combinations exist is the plan's business
    (export.methods); they are not re-checked here. (The QDQ form for TensorRT is written by the graph builder.)"""
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
        if not calibration:
            raise ConfigError("GPTQ needs calibration sequences (the built-in text or --calibration FILE).")
        logging.getLogger("onnxruntime.quantization.neural_compressor").setLevel(logging.WARNING)
        body_cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(calibration), percdamp=0.01,
                                             block_size=128, actorder=False, mse=False, perchannel=True)
    else:
        raise ConfigError(f"algo {algo!r} cannot re-quantize a graph; use rtn, hqq or gptq.")
    # lm_head first: once it is a MatMulNBits the body pass cannot touch it (GPTQ ignores nodes_to_exclude)
    if head_bits is not None:
        if on_step:
            on_step(f"rtn {head_bits}-bit, block {block_size}, lm_head")
        head_cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                accuracy_level=accuracy_level, bits=head_bits)
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != "lm_head"]
        q8 = MatMulNBitsQuantizer(model, bits=head_bits, block_size=block_size, accuracy_level=accuracy_level,
                                  algo_config=head_cfg, nodes_to_exclude=others)  # nodes_to_include: no restriction
        q8.process()
        model = q8.model.model
    if on_step:
        extra = f" ({len(calibration)} calibration sequences)" if algo == "gptq" else ""
        on_step(f"{algo} {bits}-bit, block {block_size}, transformer matmuls{extra}")
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                             accuracy_level=accuracy_level, algo_config=body_cfg, nodes_to_exclude=["lm_head"])
    q.process()
    return _check(q.model.model, f"{algo} {bits}-bit", allow=("lm_head",) if head_bits is None else ())


def _check(model: onnx.ModelProto, what: str, allow: Sequence[str] = ()) -> onnx.ModelProto:
    """onnxruntime's quantizers log and skip what they cannot do; a float MatMul weight left over is an error."""
    from edgekit.runtimes.errors import ExportError

    floats = {i.name for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT,
                                                                         onnx.TensorProto.FLOAT16)}
    left = [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.input[1] in floats and n.name not in allow]
    if left:
        raise ExportError(f"{what} quantization left {len(left)} matmul(s) in float ({', '.join(left[:4])}...): "
                          "onnxruntime's quantizer skipped them. HINT: try another --algo or --quant-format.")
    return model
