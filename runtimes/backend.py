"""onnxruntime sessions: execution-provider choice, threads, and a clear error for a corrupt graph."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgekit.runtimes.errors import BundleError, ConfigError, did_you_mean

# Preferred order when the caller does not choose: the first one onnxruntime offers wins.
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass(frozen=True)
class BackendOptions:
    """How sessions are created. ``providers=None`` picks from PROVIDER_PREFERENCE; ``threads=None`` lets ORT decide."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def choose_providers(requested: Sequence[str] | None) -> list[str]:
    available = available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ConfigError(
                f"Execution provider {unknown[0]!r} is not available in this onnxruntime build. "
                f"Available: {', '.join(available)}.{did_you_mean(unknown[0], available)}"
            )
        return list(requested)
    # TensorRT needs engines built for the device; it is only used when asked for by name.
    return [p for p in PROVIDER_PREFERENCE if p in available and p != "TensorrtExecutionProvider"] or available


def create_session(path: Path, options: BackendOptions,
                   disabled_optimizers: Sequence[str] = ()) -> ort.InferenceSession:
    """An onnxruntime session for one graph of a bundle. ``disabled_optimizers``: onnxruntime graph transformers the
    bundle's manifest asks to skip (``extra.runtime.disabled_optimizers``), e.g. one that mishandles a QDQ graph."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads is not None:
        if options.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {options.threads}.")
        so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=choose_providers(options.providers),
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except ConfigError:
        raise
    except Exception as e:  # onnxruntime raises several unrelated types for a corrupt or foreign graph
        raise BundleError(
            f"onnxruntime cannot load '{path}': {str(e).strip().splitlines()[0][:300]}. "
            "HINT: the ONNX file is corrupt or was made for another onnxruntime; re-export the bundle."
        ) from None
