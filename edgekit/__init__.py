"""edgekit: export Hugging Face LMs to ONNX bundles for edge devices, run them torch-free, measure parity."""

__version__ = "0.1.0"
