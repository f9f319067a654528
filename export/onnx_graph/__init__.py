"""The AR decoder's ONNX graph builder: ``ops`` (the accumulator, linear forms, norms, rotary caches), one module per
attention form (``gqa``, ``mha``, ``plain``, sharing ``rows``) and ``decoder`` (dimensions, options, the body)."""

from edgekit.export.onnx_graph.decoder import (
    ATTENTION,
    ROTARY_POSITIONS,
    BuildOptions,
    DecoderDims,
    DecoderWeights,
    Rope,
    attention_form,
    build_decoder,
    input_names,
    output_names,
    save_model,
)
from edgekit.export.onnx_graph.ops import MS_DOMAIN, OPSET, Graph

__all__ = ["ATTENTION", "MS_DOMAIN", "OPSET", "ROTARY_POSITIONS", "BuildOptions", "DecoderDims", "DecoderWeights",
           "Graph", "Rope", "attention_form", "build_decoder", "input_names", "output_names", "save_model"]
