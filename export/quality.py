"""Quality report: how far a (compressed) bundle is from the uncompressed PyTorch model, and what it costs.

Perplexity on an evaluation text (built-in, or a user file), top-1 agreement and KL against the reference over
the built-in parity prompts (teacher-forced on the prompt positions), size on disk and decode tok/s, for every kind
of bundle (``Model.logits`` and its ``objective``: next token, or masked positions for masked LMs). The reference
outputs are taken *before* pruning at export time, so the cost of pruning shows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export.prompts import read_user_text
from edgekit.export.reference import TorchReference
from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.sampling import kl, log_softmax

EVAL_TEXT = (
    "The history of the lighthouse is closely tied to the history of navigation. Before electric light, keepers "
    "tended oil lamps through the night, trimming wicks and polishing lenses so that ships could find the harbour. "
    "In the nineteenth century, the Fresnel lens made beams visible for many miles, and lighthouses spread along "
    "every dangerous coast. Today most of them are automated, but many are preserved as museums, and their "
    "keepers' logbooks remain a valuable record of weather, shipwrecks and daily life by the sea.\n"
    "Water boils at a lower temperature on a mountain because the air pressure is lower there. Cooks at high "
    "altitude therefore need more time to prepare pasta, and bakers adjust their recipes to keep bread from "
    "rising too quickly."
)


def read_text(path: str | None) -> str:
    return read_user_text(path, EVAL_TEXT, "evaluation text")


MASK_EVERY = 4  # masked-LM objective: every 4th position (from the second) is masked and scored


@dataclass(frozen=True)
class Reference:
    """The uncompressed model's outputs, computed once: on the prompts and the evaluation text, as the bundle's
    ``objective`` sees them (masked LMs: with every ``MASK_EVERY``-th position masked)."""

    prompt_ids: list[list[int]]
    prompt_logits: list[np.ndarray]  # [S, V] each
    eval_ids: list[int]  # the model's input (masked positions as the mask id)
    eval_targets: list[int]  # the tokens scored: the text itself
    eval_nll: float
    objective: str = "next_token"


def masked_input(ids: Sequence[int], objective: str, mask_id: int | None) -> list[int]:
    """What a model of ``objective`` is scored on: the ids themselves, or (masked LMs) every ``MASK_EVERY``-th
    position from the second replaced by the mask id."""
    if objective != "masked":
        return list(ids)
    assert mask_id is not None, "masked-LM bundles record their mask id"
    return [mask_id if i % MASK_EVERY == 1 else int(t) for i, t in enumerate(ids)]


def nll(logits: np.ndarray, targets: Sequence[int], objective: str) -> float:
    """Mean negative log-likelihood of ``targets``: of each next token, or (masked LMs) of the masked positions."""
    lp = log_softmax(logits)
    t = np.asarray(targets)
    if objective == "masked":
        at = np.arange(1, len(t), MASK_EVERY)
        return float(-np.mean(lp[at, t[at]]))
    return float(-np.mean(lp[np.arange(len(t) - 1), t[1:]]))


def baseline(ref: TorchReference, prompt_ids: list[list[int]], eval_ids: list[int], max_tokens: int | None = None,
             objective: str = "next_token", mask_id: int | None = None) -> Reference:
    """Run the reference model on the prompts and the evaluation text (each cut to ``max_tokens``). A block-diffusion
    model's "perplexity" is teacher-forced with in-block lookahead, comparable between bundles of one model only; a
    masked LM's is over the masked positions (``MASK_EVERY``)."""
    if max_tokens is not None:
        prompt_ids = [ids[:max_tokens] for ids in prompt_ids]
        eval_ids = eval_ids[:max_tokens]
    inputs = [masked_input(ids, objective, mask_id) for ids in prompt_ids]
    text = masked_input(eval_ids, objective, mask_id)
    logits = [ref.logits(ids) for ids in inputs]
    return Reference(inputs, logits, text, list(eval_ids), nll(ref.logits(text), eval_ids, objective), objective)


@dataclass(frozen=True)
class QualityReport:
    precision: str
    size_mb: float
    perplexity: float
    reference_perplexity: float
    top1: float
    kl: float
    decode_tok_s: float
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("precision", self.precision),
            ("size on disk", f"{self.size_mb:.1f} MB"),
            ("perplexity", f"{self.perplexity:.3f}  (reference {self.reference_perplexity:.3f}, "
                           f"{(self.perplexity / self.reference_perplexity - 1) * 100:+.1f}%)"),
            ("top-1 agreement", f"{self.top1:.2%} over {self.positions} prompt positions"),
            ("KL(ref || bundle)", f"{self.kl:.3e} nats"),
            ("decode", f"{self.decode_tok_s:.1f} tok/s"),
        ]
        return "\n".join(f"{k:<18} {v}" for k, v in rows)


def evaluate(runtime: Any, ref: Reference, bundle_dir: Path, speed_tokens: int = 32) -> QualityReport:
    """Compare a loaded bundle (edgekit.runtimes model) with the reference outputs."""
    agree = total = 0
    kls = []
    for ids, r in zip(ref.prompt_ids, ref.prompt_logits):
        got = runtime.logits(ids)
        agree += int((got.argmax(-1) == r.argmax(-1)).sum())
        total += len(ids)
        kls.append(kl(r, got))
    eval_logits = runtime.logits(ref.eval_ids)
    speeds = []
    prompt: Any = [{"role": "user", "content": "Write a short story about the sea."}]
    if not runtime.tokenizer.has_chat_template:
        prompt = "Once upon a time, by the sea,"
    room = runtime.max_context - len(runtime.tokenizer.encode_prompt(prompt))
    for _ in range(3 if room > 2 else 0):
        stream = runtime.stream(prompt, max_new_tokens=min(speed_tokens, room), temperature=0)
        for _piece in stream:
            pass
        speeds.append(stream.stats.decode_tokens_per_s)
    size = sum(p.stat().st_size for p in Path(bundle_dir).iterdir() if p.is_file()) / 1e6
    return QualityReport(
        precision=runtime.manifest.precision, size_mb=size,
        perplexity=float(np.exp(nll(eval_logits, ref.eval_targets, ref.objective))),
        reference_perplexity=float(np.exp(ref.eval_nll)), top1=agree / total, kl=float(np.mean(kls)),
        decode_tok_s=statistics.median(speeds) if speeds else 0.0, positions=total,
    )


def plot(report: QualityReport, path: Path) -> None:
    """Bar charts of perplexity (bundle vs reference) and agreement."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib).") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.bar(["reference", report.precision], [report.reference_perplexity, report.perplexity],
          color=["#aaaaaa", "#2b7bba"])
    a.set_title("perplexity (lower is better)", fontsize=10)
    b.bar(["top-1 agreement"], [report.top1 * 100], color="#2b7bba")
    b.set_ylim(0, 100)
    b.set_title(f"agreement with the reference (KL {report.kl:.1e})", fontsize=10)
    fig.suptitle(f"{report.precision}: {report.size_mb:.0f} MB, {report.decode_tok_s:.0f} tok/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
