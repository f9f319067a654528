"""``edgekit verify``: parity on the device, without PyTorch: the bundle's own loop against the reference it stores.

The export stores the PyTorch model's runs of the parity prompts (each step's top-k logits and the generated
tokens) in the bundle; this re-runs them with whatever runtime and provider the device has (a Jetson's onnxruntime,
the CUDA EP's kernels, a newer onnxruntime) and reports the same table as ``edgekit parity``, with the tolerance of
the bundle's precision. KL needs every logit, so it is not computed here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgekit.report import (
    REFERENCE_FORMAT,
    TOLERANCES,
    ParityReport,
    TopK,
    kernel_note,
    ran_on,
    score,
    tolerance_key,
)
from edgekit.runtimes import load
from edgekit.runtimes.bundle import bundle_file
from edgekit.runtimes.errors import BundleError
from edgekit.runtimes.model import Trace
from edgekit.runtimes.schema import Reader, loads

MAX_REFERENCE_BYTES = 64 << 20


def verify(bundle_dir: str | os.PathLike[str], providers: Sequence[str] | None = None,
           threads: int | None = None) -> ParityReport:
    """Re-run the stored reference's prompts on this device; the report says what this device computes."""
    root = Path(bundle_dir)
    runtime = load(root, providers=providers, threads=threads)
    name = (runtime.manifest.parity or {}).get("reference_file")
    if not isinstance(name, str):
        raise BundleError(f"Bundle '{root}' stores no parity reference (exported without parity, or by an older "
                          "edgekit). HINT: re-export it with parity on the export machine.")
    path = bundle_file(root, name, "parity reference")
    with open(path, "rb") as f:
        data = Reader(loads(f.read(MAX_REFERENCE_BYTES + 1), str(path), MAX_REFERENCE_BYTES), str(path))
    data.str("format", choices=(REFERENCE_FORMAT,))
    new_tokens = data.int("new_tokens", lo=1, hi=1 << 16)
    key = tolerance_key(runtime.manifest)
    rows = []
    for i, entry in enumerate(data.data.get("rows") or []):
        r = Reader(entry, f"{path}: rows[{i}]")
        ids, options = list(r.ints("ids")), r.mapping("options")
        try:
            steps = [TopK(np.asarray(s["ids"], dtype=np.int64).reshape(len(s["ids"]), -1),
                          np.asarray(s["values"], dtype=np.float32).reshape(len(s["values"]), -1))
                     for s in entry.get("steps", [])]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise BundleError(f"{path}: rows[{i}] has malformed steps ({type(e).__name__}). HINT: re-export.") from None
        if not ids or not steps or any(s.ids.shape != s.values.shape for s in steps):
            raise BundleError(f"{path}: rows[{i}] has no prompt ids or steps. HINT: re-export the bundle.")
        prompt = entry.get("text")
        ours = runtime.tokenizer.encode_prompt(prompt) if isinstance(prompt, (str, list)) else ids
        got = runtime.trace(ids, options, new_tokens=new_tokens)
        want = Trace(steps, list(r.ints("tokens")))
        rows.append(score(r.str("prompt"), r.str("setting"), ids, ours, got, want, TOLERANCES[key]))
    if not rows:
        raise BundleError(f"{path} holds no reference rows. HINT: re-export the bundle.")
    here = ran_on(runtime.providers)
    note = kernel_note(runtime.manifest, here)
    return ParityReport(key, TOLERANCES[key], new_tokens, rows, machine=here, notes=[note] if note else [])
