"""``load(bundle)``: read and verify a bundle's manifest, then build the model object for its kind."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from edgekit.runtimes.backend import BackendOptions
from edgekit.runtimes.bundle import load_manifest
from edgekit.runtimes.decoder import ARModel
from edgekit.runtimes.denoiser import DiffusionModel
from edgekit.runtimes.errors import BundleError


def load(
    bundle_dir: str | os.PathLike[str],
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    verify_hashes: bool = True,
) -> ARModel:
    """Load a bundle for inference; ``providers`` overrides the provider choice (e.g. ["CPUExecutionProvider"]).

    The manifest's format version and every file's SHA-256 are checked first (``verify_hashes=False`` skips hashing,
    for fast restarts of a bundle already verified).
    """
    root = Path(bundle_dir)
    manifest = load_manifest(root, check_hashes=verify_hashes)
    backend = BackendOptions(providers=tuple(providers) if providers else None, threads=threads)
    if manifest.kind == "ar":
        return ARModel(root, manifest, backend)
    if manifest.kind == "diffusion":
        return DiffusionModel(root, manifest, backend)  # type: ignore[return-value]
    raise BundleError(f"Bundle '{root}' is of kind '{manifest.kind}', which this edgekit version cannot run yet.")
