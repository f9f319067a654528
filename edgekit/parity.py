"""The parity harness: a bundle's own generation loop run twice, on its ONNX graphs and on the full PyTorch model.

For every built-in prompt and every setting the model names (AR: greedy decoding; dLLM: each unmasking rule and
sampler), the runtime's loop (sampler included: it is written once) runs over two logits providers. The report
gives per row the first step's logits distance (max abs diff, KL, top-1 agreement over its positions, e.g. every
prompt position of an AR model), the max abs diff over every step both runs took on identical inputs, and how many
generated tokens agree before the first divergence. Tolerances come from a table keyed by the bundle's recorded
quantization; a report lists every miss, and ``passed`` is true only when there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export.progress import Progress, Silent
from edgekit.export.prompts import PROMPTS, reference_ids
from edgekit.export.reference import TorchReference
from edgekit.report import (
    REFERENCE_FORMAT,
    TOLERANCES,
    TOP_K,
    ParityReport,
    TopK,
    ran_on,
    score,
    tolerance_key,
)
from edgekit.runtimes import load
from edgekit.runtimes.model import Model
from edgekit.runtimes.tokenizer import Prompt


def compare(runtime: Model, torch_model: Any, hf_tokenizer: Any, new_tokens: int = 64,
            prompts: Sequence[tuple[str, Prompt]] | None = None, progress: Progress | None = None) -> ParityReport:
    """Run every (prompt, setting) through the runtime's loop on both providers and build the report.
    ``torch_model``: the PyTorch model, or a ``TorchReference`` the export shares with its quality report."""
    progress = progress or Silent()
    reference = (torch_model if isinstance(torch_model, TorchReference)
                 else TorchReference.for_manifest(torch_model, runtime.manifest))
    key = tolerance_key(runtime.manifest)
    tol = TOLERANCES[key]
    prompts = PROMPTS[: runtime.parity_prompts] if prompts is None else prompts
    has_template = runtime.tokenizer.has_chat_template
    jobs = [(name, prompt, s) for name, prompt in prompts for s in runtime.parity_settings]
    rows, agreement, references = [], {}, []
    for j, (name, prompt, setting) in enumerate(jobs):
        progress.tick(j, len(jobs))
        if not isinstance(prompt, str) and not has_template:
            prompt = "\n".join(m["content"] for m in prompt)
        ids = reference_ids(hf_tokenizer, prompt, runtime.tokenizer.spec.add_special_tokens)
        ours = runtime.tokenizer.encode_prompt(prompt)
        want = runtime.trace(ids, setting.options, reference=reference.provider(), new_tokens=new_tokens)
        got = runtime.trace(ids, setting.options, new_tokens=new_tokens)
        rows.append(score(name, setting.name, ids, ours, got, want, tol))
        references.append({"prompt": name, "text": prompt, "setting": setting.name, "options": dict(setting.options),
                           "ids": list(ids), "tokens": want.tokens,
                           "steps": [TopK.of(s).to_dict() for s in want.steps]})
        for variant, options in setting.variants.items():
            alt = runtime.trace(ids, {**setting.options, **options}, new_tokens=new_tokens).tokens
            same_tokens = sum(a == b for a, b in zip(alt, got.tokens)) / max(len(alt), len(got.tokens), 1)
            agreement.setdefault(f"{variant}/{setting.name}", []).append(same_tokens)
    progress.tick(len(jobs), len(jobs))
    return ParityReport(key, tol, new_tokens, rows, {k: float(np.mean(v)) for k, v in agreement.items()},
                        {"format": REFERENCE_FORMAT, "k": TOP_K, "new_tokens": new_tokens, "rows": references},
                        machine=ran_on(runtime.providers))


def verifier(new_tokens: int = 64):
    """A ``Verifier`` for ``export_bundle``: runs ``compare`` on the freshly written (and loaded) bundle."""

    def verify(runtime: Model, reference: TorchReference, hf_tokenizer: Any, progress: Progress) -> ParityReport:
        return compare(runtime, reference, hf_tokenizer, new_tokens=new_tokens, progress=progress)

    return verify


def run_parity(bundle_dir: Path, reference: str, new_tokens: int = 64, trust_remote_code: bool = False,
               progress: Progress | None = None) -> ParityReport:
    """``edgekit parity``: load the bundle and the reference source, compare them."""
    from edgekit.export import source
    from edgekit.export.registry import lookup

    progress = progress or Progress(total=2)
    runtime = load(bundle_dir)
    ref = source.resolve(reference)
    with progress.stage(f"Loading the reference {ref.label}"):
        auto = lookup(runtime.manifest.architecture).auto_classes
        model = source.load_model(ref, trust_remote_code, auto)
        tokenizer = source.load_tokenizer(ref, trust_remote_code)
    with progress.stage(f"Comparing the bundle's loop on the ONNX graphs and on the PyTorch model "
                        f"({runtime.parity_prompts} prompts x {len(runtime.parity_settings)} settings)"):
        return compare(runtime, model, tokenizer, new_tokens=new_tokens, progress=progress)
