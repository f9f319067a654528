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
    quant_format: str = "nbits",
) -> onnx.ModelProto:
    """Quantize every MatMul with a constant weight; lm_head (node name 'lm_head') to 8 bits. ``calibration``:
    graph feeds for GPTQ (required there). ``quant_format``: "nbits" writes MatMulNBits (onnxruntime's kernels);
    "qdq" writes blockwise DequantizeLinear(int4/int8 weight) -> MatMul, the weight-only form TensorRT consumes
    (rtn only). Which combinations exist is the plan's business (export.methods); they are not re-checked here."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        QuantFormat,
    )

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
    if quant_format == "qdq" and bits == 8:
        return _check(_int8_qdq(model, calibration, on_step), "int8 QDQ")
    if algo == "rtn":
        body_cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=quant_format == "qdq",
                                                accuracy_level=accuracy_level, bits=bits, quant_format=fmt)
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
    # lm_head first: once it is a MatMulNBits the body pass cannot touch it (GPTQ ignores nodes_to_exclude). In QDQ
    # form onnxruntime writes 4-bit only, so there the head stays float (TensorRT runs it in fp16)
    if quant_format != "qdq":
        if on_step:
            on_step(f"rtn 8-bit, block {block_size}, lm_head")
        head_cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                accuracy_level=accuracy_level, bits=8)
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != "lm_head"]
        q8 = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, accuracy_level=accuracy_level,
                                  algo_config=head_cfg, nodes_to_exclude=others)  # nodes_to_include: no restriction
        q8.process()
        model = q8.model.model
    if on_step:
        extra = f" ({len(calibration)} calibration sequences)" if algo == "gptq" else ""
        on_step(f"{algo} {bits}-bit, block {block_size}, transformer matmuls{extra}")
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=quant_format == "qdq",
                             accuracy_level=accuracy_level, algo_config=body_cfg, nodes_to_exclude=["lm_head"])
    q.process()
    return _check(q.model.model, f"{algo} {bits}-bit", allow=("lm_head",) if quant_format == "qdq" else ())


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


def _int8_qdq(model: onnx.ModelProto, calibration: Sequence[dict[str, np.ndarray]],
              on_step: Callable[[str], None] | None) -> onnx.ModelProto:
    """Static int8 QDQ (QuantizeLinear/DequantizeLinear on activations and weights around every MatMul): symmetric,
    per-channel weights and min-max calibrated activations, the explicit-quantization form TensorRT builds int8
    engines from. onnxruntime's quantize_static does the work."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ConfigError("int8 QDQ needs calibration sequences (the built-in text or --calibration FILE).")
    if on_step:
        on_step(f"int8 QDQ: weights per channel, activations calibrated on {len(calibration)} sequences")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        raw, src, out = Path(tmp) / "r.onnx", Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save_model(model, raw, save_as_external_data=True, location="r.onnx.data")
        # tensor types of the intermediate activations (symbolic shape inference knows the contrib ops); without
        # them quantize_static quantizes the weights only
        quant_pre_process(str(raw), str(src), skip_optimization=True, save_as_external_data=True)
        quantize_static(str(src), str(out), _reader(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        return onnx.load(str(out))
