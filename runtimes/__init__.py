"""edgekit's torch-free runtime: load a bundle and generate text with numpy + onnxruntime only.

    import edgekit.runtimes as rt
    model = rt.load("bundles/smollm2")
    for piece in model.stream([{"role": "user", "content": "Hi"}], max_new_tokens=64):
        print(piece, end="", flush=True)
"""

from edgekit.runtimes.blocks import BlockDiffusionModel
from edgekit.runtimes.bundle import FORMAT_VERSION, Manifest, read_manifest
from edgekit.runtimes.decoder import ARModel
from edgekit.runtimes.denoiser import DiffusionModel
from edgekit.runtimes.diffusion_params import DiffusionParams
from edgekit.runtimes.engine import Engine, Event, Request
from edgekit.runtimes.errors import (
    BundleError,
    ConfigError,
    ContextLengthError,
    EdgekitError,
    QueueFullError,
)
from edgekit.runtimes.kv_cache import KVCache
from edgekit.runtimes.loader import load
from edgekit.runtimes.model import Batch, FinishReason, Model, Stats, TextStream
from edgekit.runtimes.sampling import SamplingParams
from edgekit.runtimes.sequence import Sequence
from edgekit.runtimes.tokenizer import StreamingDetokenizer, Tokenizer

__all__ = [
    "ARModel",
    "Batch",
    "BlockDiffusionModel",
    "BundleError",
    "ConfigError",
    "ContextLengthError",
    "DiffusionModel",
    "DiffusionParams",
    "EdgekitError",
    "Engine",
    "Event",
    "FORMAT_VERSION",
    "FinishReason",
    "KVCache",
    "Manifest",
    "Model",
    "QueueFullError",
    "Request",
    "SamplingParams",
    "Sequence",
    "Stats",
    "StreamingDetokenizer",
    "TextStream",
    "Tokenizer",
    "load",
    "read_manifest",
]
