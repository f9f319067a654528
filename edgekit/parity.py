"""The parity harness: the bundle (through the torch-free runtime) against the full PyTorch model.

Per prompt it reports prompt-logits max abs diff, KL(reference || bundle), top-1 agreement over prompt positions,
and greedy-token agreement over N new tokens. Tolerances come from a table keyed by precision; a report lists
every miss, and ``passed`` is true only when there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export.progress import Progress, Silent
from edgekit.export.prompts import PROMPTS, reference_ids
from edgekit.runtimes import load
from edgekit.runtimes.decoder import ARModel
from edgekit.runtimes.tokenizer import Prompt


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float  # prompt logits
    kl: float  # mean over prompt positions, nats
    top1: float  # minimum fraction of prompt positions whose argmax agrees, over all prompts together
    top1_prompt: float  # the same, for each prompt on its own
    greedy: float  # minimum fraction of the N greedy tokens generated identically (prefix up to first divergence);
    # 0 for lossy modes, where one flipped near-tie sends the rest of the continuation elsewhere


# Keyed by precision, or precision/method for quantization methods with their own promise: a GGUF carry-over at
# accuracy level 0 computes the same weights as the dequantized reference, so it is held to near-fp32 tolerances.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_diff=1e-3, kl=1e-5, top1=1.0, top1_prompt=1.0, greedy=1.0),
    "fp16": Tolerance(max_abs_diff=0.25, kl=1e-3, top1=0.98, top1_prompt=0.95, greedy=0.0),
    "int8": Tolerance(max_abs_diff=2.0, kl=5e-2, top1=0.95, top1_prompt=0.85, greedy=0.0),
    "int4": Tolerance(max_abs_diff=10.0, kl=0.5, top1=0.85, top1_prompt=0.6, greedy=0.0),
    "int4/gguf": Tolerance(max_abs_diff=1e-2, kl=1e-5, top1=0.99, top1_prompt=0.99, greedy=0.9),
    "int8/gguf": Tolerance(max_abs_diff=1e-2, kl=1e-5, top1=0.99, top1_prompt=0.99, greedy=0.9),
    # layers exact, the Q8_0 output layer with int8 activations: the 99% top-1 bar, small logit drift
    "int4/gguf-int8head": Tolerance(max_abs_diff=2.0, kl=5e-3, top1=0.99, top1_prompt=0.95, greedy=0.0),
    "int8/gguf-int8head": Tolerance(max_abs_diff=2.0, kl=5e-3, top1=0.99, top1_prompt=0.95, greedy=0.0),
    # static W8A8 (QDQ for TensorRT): activations share one calibrated scale per tensor, the int4 class of drift
    "int8/qdq-w8a8": Tolerance(max_abs_diff=10.0, kl=0.5, top1=0.75, top1_prompt=0.6, greedy=0.0),
    "int4/gguf-int8act": Tolerance(max_abs_diff=5.0, kl=5e-2, top1=0.97, top1_prompt=0.9, greedy=0.0),
    "int8/gguf-int8act": Tolerance(max_abs_diff=5.0, kl=5e-2, top1=0.97, top1_prompt=0.9, greedy=0.0),
}


def tolerance_key(manifest: Any) -> str:
    """'fp32', 'int4', 'int4/gguf', 'int4/gguf-int8head', 'int4/gguf-int8act', ...: the TOLERANCES row that applies
    to a bundle."""
    q = (manifest.extra or {}).get("quantization") or {}
    if q.get("format") == "qdq" and str(q.get("activations", "")).startswith("int8"):
        return "int8/qdq-w8a8"
    if q.get("method") == "gguf":
        suffix = "-int8act" if q.get("accuracy_level", 0) >= 4 else "-int8head" if q.get("lm_head_int8act") else ""
        key = f"{manifest.precision}/gguf{suffix}"
        if key in TOLERANCES:
            return key
    return manifest.precision if manifest.precision in TOLERANCES else "int4"


@dataclass
class PromptResult:
    name: str
    prompt_tokens: int
    tokenizer_match: bool
    max_abs_diff: float
    kl: float
    top1: float
    greedy_tokens: int
    greedy_agree: int  # tokens equal before the first divergence
    misses: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> float:
        return self.greedy_agree / self.greedy_tokens if self.greedy_tokens else 1.0


@dataclass
class ParityReport:
    precision: str
    tolerance: Tolerance
    new_tokens: int
    prompts: list[PromptResult]

    @property
    def misses(self) -> list[str]:
        out = [f"{p.name}: {m}" for p in self.prompts for m in p.misses]
        overall = self.top1_overall
        if overall < self.tolerance.top1:
            out.append(f"all prompts: top-1 agreement {overall:.1%} < {self.tolerance.top1:.0%}")
        return out

    @property
    def top1_overall(self) -> float:
        """Top-1 agreement over every prompt position of every prompt."""
        total = sum(p.prompt_tokens for p in self.prompts)
        return sum(p.top1 * p.prompt_tokens for p in self.prompts) / total if total else 1.0

    @property
    def passed(self) -> bool:
        return not self.misses

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "tolerance": asdict(self.tolerance),
            "new_tokens": self.new_tokens,
            "summary": self.summary(),
            "prompts": [{**asdict(p), "greedy": p.greedy} for p in self.prompts],
            "misses": self.misses,
        }

    def summary(self) -> dict[str, float]:
        ps = self.prompts
        return {
            "max_abs_diff": max(p.max_abs_diff for p in ps),
            "mean_kl": float(np.mean([p.kl for p in ps])),
            "top1": self.top1_overall,
            "greedy": float(np.mean([p.greedy for p in ps])),
            "greedy_identical": sum(p.greedy_agree == p.greedy_tokens for p in ps) / len(ps),
        }

    def table(self) -> str:
        head = f"{'prompt':<12} {'tokens':>6} {'tok=':>4} {'max|Δ|':>9} {'KL':>9} {'top-1':>7} {'greedy':>9}  ok"
        lines = [head, "-" * len(head)]
        for p in self.prompts:
            lines.append(
                f"{p.name:<12} {p.prompt_tokens:>6} {'yes' if p.tokenizer_match else 'NO':>4} {p.max_abs_diff:>9.2e} "
                f"{p.kl:>9.2e} {p.top1:>7.1%} {p.greedy_agree:>4}/{p.greedy_tokens:<4}  {'✓' if not p.misses else '✗'}"
            )
        t = self.tolerance
        s = self.summary()
        lines.append("-" * len(head))
        lines.append(
            f"precision {self.precision}: tolerance max|Δ| <= {t.max_abs_diff:g}, KL <= {t.kl:g}, "
            f"top-1 >= {t.top1:.0%} overall ({t.top1_prompt:.0%} per prompt), greedy >= {t.greedy:.0%} | "
            f"overall top-1 {s['top1']:.1%}, "
            f"greedy identical {s['greedy_identical']:.0%}"
        )
        lines.append("PASSED" if self.passed else f"FAILED ({len(self.misses)} misses):")
        lines.extend(f"  ✗ {m}" for m in self.misses)
        return "\n".join(lines)


def _torch_logits_and_greedy(model: Any, ids: Sequence[int], n: int) -> tuple[np.ndarray, list[int]]:
    """Reference: full-prompt logits [S, V] and ``n`` greedy tokens from the PyTorch model with its own KV cache."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([list(ids)]), use_cache=True)
        logits = out.logits[0].float().numpy()
        past, nxt, tokens = out.past_key_values, int(out.logits[0, -1].argmax()), []
        for i in range(n):
            tokens.append(nxt)
            if i + 1 < n:
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return logits, tokens


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(got)), in nats."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def compare(
    runtime: ARModel,
    torch_model: Any,
    hf_tokenizer: Any,
    new_tokens: int = 64,
    prompts: Sequence[tuple[str, Prompt]] = PROMPTS,
    progress: Progress | None = None,
) -> ParityReport:
    """Run every prompt through both models and build the report (tolerances from the bundle's precision)."""
    progress = progress or Silent()
    precision = tolerance_key(runtime.manifest)
    tol = TOLERANCES[precision]
    has_template = runtime.tokenizer.has_chat_template
    results = []
    for k, (name, prompt) in enumerate(prompts):
        progress.tick(k, len(prompts))
        if not isinstance(prompt, str) and not has_template:
            prompt = "\n".join(m["content"] for m in prompt)
        ids = reference_ids(hf_tokenizer, prompt)
        ours = runtime.tokenizer.encode_prompt(prompt)
        ref_logits, ref_greedy = _torch_logits_and_greedy(torch_model, ids, new_tokens)
        got = runtime.forward(ids, runtime.new_cache(), logits_to_keep=len(ids))
        got_greedy = runtime.greedy_ids(ids, new_tokens)
        agree = next((i for i, (a, b) in enumerate(zip(ref_greedy, got_greedy)) if a != b), new_tokens)
        r = PromptResult(
            name=name,
            prompt_tokens=len(ids),
            tokenizer_match=ours == ids,
            max_abs_diff=float(np.abs(ref_logits - got).max()),
            kl=max(_kl(ref_logits, got), 0.0),
            top1=float(np.mean(ref_logits.argmax(-1) == got.argmax(-1))),
            greedy_tokens=new_tokens,
            greedy_agree=agree,
        )
        if not r.tokenizer_match:
            first = next((i for i, (a, b) in enumerate(zip(ours, ids)) if a != b), min(len(ours), len(ids)))
            r.misses.append(f"runtime tokenizer gives {len(ours)} ids, reference {len(ids)} (first differ at {first})")
        if r.max_abs_diff > tol.max_abs_diff:
            r.misses.append(f"prompt logits max|Δ| {r.max_abs_diff:.3g} > {tol.max_abs_diff:g}")
        if r.kl > tol.kl:
            r.misses.append(f"KL {r.kl:.3g} > {tol.kl:g}")
        if r.top1 < tol.top1_prompt:
            r.misses.append(f"top-1 agreement {r.top1:.1%} < {tol.top1_prompt:.0%}")
        if r.greedy < tol.greedy:
            r.misses.append(f"greedy tokens agree {agree}/{new_tokens} (first divergence at token {agree}) "
                            f"< {tol.greedy:.0%}")
        results.append(r)
    progress.tick(len(prompts), len(prompts))
    return ParityReport(precision, tol, new_tokens, results)


def verifier(new_tokens: int = 64):
    """A ``Verifier`` for ``export_bundle``: runs ``compare`` on the freshly written bundle."""

    def verify(bundle_dir: Path, torch_model: Any, hf_tokenizer: Any, progress: Progress) -> dict[str, Any]:
        runtime = load(bundle_dir)
        if runtime.kind == "diffusion":
            report: Any = compare_diffusion(runtime, torch_model, hf_tokenizer, progress=progress)
        else:
            report = compare(runtime, torch_model, hf_tokenizer, new_tokens=new_tokens, progress=progress)
        verify.last_report = report  # type: ignore[attr-defined]
        return report.to_dict()

    return verify


def run_parity(bundle_dir: Path, reference: str, new_tokens: int = 64, trust_remote_code: bool = False,
               progress: Progress | None = None) -> ParityReport:
    """``edgekit parity``: load the bundle and the reference source, compare them."""
    from edgekit.export import source

    progress = progress or Progress(total=2)
    runtime = load(bundle_dir)
    ref = source.resolve(reference)
    with progress.stage(f"Loading the reference {ref.label}"):
        model = source.load_model(ref, trust_remote_code, kind=runtime.kind)
        tokenizer = source.load_tokenizer(ref, trust_remote_code)
    if runtime.kind == "diffusion":
        with progress.stage("Comparing the denoiser with the PyTorch reference sampler"):
            return compare_diffusion(runtime, model, tokenizer, progress=progress)  # type: ignore[return-value]
    with progress.stage(f"Comparing on {len(PROMPTS)} prompts x {new_tokens} greedy tokens"):
        return compare(runtime, model, tokenizer, new_tokens=new_tokens, progress=progress)


# --- diffusion bundles -----------------------------------------------------------------------------------------------
DIFFUSION_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("low_confidence", {"remasking": "low_confidence"}),
    ("threshold_0.9", {"remasking": "low_confidence", "threshold": 0.9}),
    ("entropy_bound_0.5", {"remasking": "low_confidence", "entropy_bound": 0.5}),
    ("margin", {"remasking": "margin"}),
    ("entropy", {"remasking": "entropy"}),
    ("random_seed3", {"remasking": "random", "seed": 3}),
    ("sampled_T0.7", {"temperature": 0.7, "top_k": 50, "top_p": 0.95, "seed": 5}),
)


CACHE_AGREEMENT_SETTINGS = ("low_confidence", "threshold_0.9")


@dataclass
class DiffusionRow:
    prompt: str
    setting: str
    steps: int
    max_abs_diff: float
    tokens_identical: bool
    misses: list[str] = field(default_factory=list)


@dataclass
class DiffusionParityReport:
    """Runtime denoiser vs the PyTorch reference sampler, no-cache mode: per-step logits and final tokens."""

    tolerance: float
    rows: list[DiffusionRow]
    # cached modes are approximations: the fraction of generated tokens equal to no-cache's, per mode/setting
    cache_agreement: dict[str, float] = field(default_factory=dict)

    @property
    def misses(self) -> list[str]:
        return [f"{r.prompt}/{r.setting}: {m}" for r in self.rows for m in r.misses]

    @property
    def passed(self) -> bool:
        return not self.misses

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "kind": "diffusion", "precision": "fp32", "tolerance": self.tolerance,
                "summary": {"max_abs_diff": max(r.max_abs_diff for r in self.rows),
                            "tokens_identical": sum(r.tokens_identical for r in self.rows) / len(self.rows),
                            "steps": sum(r.steps for r in self.rows)},
                "cache_agreement": self.cache_agreement,
                "rows": [asdict(r) for r in self.rows], "misses": self.misses}

    def table(self) -> str:
        head = f"{'prompt':<10} {'setting':<16} {'steps':>5} {'max|Δ| per step':>16} {'tokens':>9}  ok"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.prompt:<10} {r.setting:<16} {r.steps:>5} {r.max_abs_diff:>16.2e} "
                         f"{'identical' if r.tokens_identical else 'DIFFER':>9}  {'✓' if not r.misses else '✗'}")
        lines.append("-" * len(head))
        lines.append(f"fp32 no-cache: per-step logits max|Δ| <= {self.tolerance:g} and identical tokens required")
        for k, v in self.cache_agreement.items():
            lines.append(f"cache {k}: {v:.1%} of tokens equal to no-cache (approximate cache, reported only)")
        lines.append("PASSED" if self.passed else f"FAILED ({len(self.misses)} misses):")
        lines.extend(f"  ✗ {m}" for m in self.misses)
        return "\n".join(lines)


def compare_diffusion(runtime: Any, torch_model: Any, hf_tokenizer: Any, gen_length: int = 16,
                      block_length: int = 8, prompts: Sequence[tuple[str, Prompt]] = PROMPTS[:3],
                      progress: Progress | None = None, tolerance: float = 1e-3) -> DiffusionParityReport:
    """Run every (prompt, setting) through the runtime denoiser and the PyTorch reference sampler."""
    from edgekit.export.diffusion import reference_generate
    from edgekit.runtimes.denoiser import DenoiseStats

    progress = progress or Silent()
    rows = []
    agree: dict[str, list[float]] = {}
    jobs = [(name, prompt, setting, opts) for name, prompt in prompts for setting, opts in DIFFUSION_SETTINGS]
    for j, (name, prompt, setting, opts) in enumerate(jobs):
        progress.tick(j, len(jobs))
        if not isinstance(prompt, str) and not runtime.tokenizer.has_chat_template:
            prompt = "\n".join(m["content"] for m in prompt)
        ids = runtime.tokenizer.encode_prompt(prompt)
        params = runtime.params(len(ids), gen_length=gen_length, block_length=block_length,
                                diffusion_steps=gen_length, **opts)
        ours: list[np.ndarray] = []
        ref: list[np.ndarray] = []
        stats = DenoiseStats()
        got = [t for block in runtime.generate_blocks(ids, params, stats, on_step=lambda i, lg, o=ours: o.append(lg))
               for t in block]
        want = reference_generate(torch_model, ids, params, runtime.mask_id, set(runtime.stop_ids),
                                  on_step=lambda i, lg, r=ref: r.append(lg))
        diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
        row = DiffusionRow(name, setting, len(ours), max(diffs) if diffs else 0.0, got == want)
        if len(ours) != len(ref):
            row.misses.append(f"{len(ours)} denoising steps vs the reference's {len(ref)}")
        if row.max_abs_diff > tolerance:
            row.misses.append(f"step logits max|Δ| {row.max_abs_diff:.3g} > {tolerance:g}")
        if not row.tokens_identical:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            row.misses.append(f"generated tokens differ from the reference at position {first}")
        rows.append(row)
        for mode in (m for m in getattr(runtime, "cache_modes", ()) if m != "none"):
            if setting not in CACHE_AGREEMENT_SETTINGS:
                continue
            cached = [t for block in runtime.generate_blocks(ids, replace(params, cache=mode), DenoiseStats())
                      for t in block]
            same = sum(a == b for a, b in zip(cached, got)) / max(len(cached), len(got), 1)
            agree.setdefault(f"{mode}/{setting}", []).append(same)
    progress.tick(len(jobs), len(jobs))
    return DiffusionParityReport(tolerance, rows, {k: float(np.mean(v)) for k, v in agree.items()})
