"""``load(bundle)``: read and verify a bundle, then build its model. The one place a bundle's kind is decided."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from edgekit.runtimes.backend import BackendOptions, check_onnxruntime
from edgekit.runtimes.blocks import BlockDiffusionModel
from edgekit.runtimes.bundle import Manifest, load_manifest
from edgekit.runtimes.decoder import ARModel
from edgekit.runtimes.denoiser import DiffusionModel
from edgekit.runtimes.model import Model

# bundle kind -> the Model implementation that runs it (bundle.MODEL_KINDS: the manifest reader refuses others)
MODELS: dict[str, Callable[[Path, Manifest, BackendOptions], Model]] = {
    "ar": ARModel, "diffusion": DiffusionModel, "block_diffusion": BlockDiffusionModel}


def load(
    bundle_dir: str | os.PathLike[str],
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    verify_hashes: bool = True,
    spin: bool | None = None,
    device_buffers: bool | None = None,
) -> Model:
    """Load a bundle for inference; ``providers`` overrides the bundle's recorded execution providers (e.g.
    ["CPUExecutionProvider"]).

    The manifest's format version and every file's SHA-256 are checked first (``verify_hashes=False`` skips hashing,
    for fast restarts of a bundle already verified). ``spin=False``: onnxruntime's threads sleep between runs
    (``BackendOptions.spin``). ``device_buffers=True``: KV buffers as OrtValues bound by pointer even on the CPU
    (the GPU's code path; ``BackendOptions.device_buffers``).
    """
    root = Path(bundle_dir)
    manifest = load_manifest(root, check_hashes=verify_hashes)  # refuses kinds outside bundle.MODEL_KINDS
    check_onnxruntime(manifest.runtime, root)
    backend = BackendOptions(providers=tuple(providers) if providers else None, threads=threads, spin=spin,
                             device_buffers=device_buffers)
    return MODELS[manifest.kind](root, manifest, backend)
