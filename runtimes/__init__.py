"""edgekit's torch-free runtime: load a bundle and generate text with numpy + onnxruntime only.

    import edgekit.runtimes as rt
    model = rt.load("bundles/smollm2")
    for piece in model.stream([{"role": "user", "content": "Hi"}], max_new_tokens=64):
        print(piece, end="", flush=True)
"""

from edgekit.runtimes.bundle import FORMAT_VERSION, Manifest, read_manifest
from edgekit.runtimes.decoder import ARModel, GenerationStats, TextStream
from edgekit.runtimes.errors import (
    BundleError,
    ConfigError,
    ContextLengthError,
    EdgekitError,
)
from edgekit.runtimes.kv_cache import KVCache
from edgekit.runtimes.loader import load
from edgekit.runtimes.sampling import SamplingParams
from edgekit.runtimes.tokenizer import StreamingDetokenizer, Tokenizer

__all__ = [
    "ARModel",
    "BundleError",
    "ConfigError",
    "ContextLengthError",
    "EdgekitError",
    "FORMAT_VERSION",
    "GenerationStats",
    "KVCache",
    "Manifest",
    "SamplingParams",
    "StreamingDetokenizer",
    "TextStream",
    "Tokenizer",
    "load",
    "read_manifest",
]
