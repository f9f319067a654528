"""Quality report: how far a (compressed) bundle is from the uncompressed PyTorch model, and what it costs.

Perplexity on an evaluation text (built-in, or a user file), top-1 agreement and KL against the reference over
the built-in parity prompts (teacher-forced on the prompt positions), size on disk and decode tok/s. The
reference outputs are taken *before* pruning at export time, so the cost of pruning shows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export.prompts import read_user_text
from edgekit.runtimes.errors import ConfigError

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


@dataclass(frozen=True)
class Reference:
    """The uncompressed model's outputs, computed once."""

    prompt_ids: list[list[int]]
    prompt_logits: list[np.ndarray]  # [S, V] each
    eval_ids: list[int]
    eval_nll: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _nll(logits: np.ndarray, ids: Sequence[int]) -> float:
    lp = _log_softmax(logits[:-1])
    return float(-np.mean(lp[np.arange(len(ids) - 1), np.asarray(ids[1:])]))


def block_causal_mask(n: int, block: int) -> Any:
    """A block-diffusion model's attention over n positions as an additive [1, 1, n, n] torch mask: bidirectional
    inside blocks of ``block`` absolute positions, causal across them."""
    import torch

    pos = torch.arange(n)
    seen = (pos[None, :] // block) <= (pos[:, None] // block)
    return torch.where(seen, 0.0, torch.finfo(torch.float32).min)[None, None]


def reference(model: Any, prompt_ids: list[list[int]], eval_ids: list[int], max_tokens: int | None = None,
              block_length: int = 0) -> Reference:
    """Run the reference model on the prompts and the evaluation text (each cut to ``max_tokens``). ``block_length``:
    a block-diffusion model's attention (bidirectional inside blocks, causal across), as its bundle computes it; its
    "perplexity" is then teacher-forced with in-block lookahead, comparable between bundles of one model only."""
    import torch

    if max_tokens is not None:
        prompt_ids = [ids[:max_tokens] for ids in prompt_ids]
        eval_ids = eval_ids[:max_tokens]

    def run(ids: list[int]) -> np.ndarray:
        mask = block_causal_mask(len(ids), block_length) if block_length else None
        return model(torch.tensor([ids]), attention_mask=mask).logits[0].float().numpy()

    with torch.no_grad():
        logits = [run(ids) for ids in prompt_ids]
        eval_logits = run(eval_ids)
    return Reference(prompt_ids, logits, list(eval_ids), _nll(eval_logits, eval_ids))


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
        got = runtime.forward(ids, runtime.new_cache(), logits_to_keep=len(ids))
        agree += int((got.argmax(-1) == r.argmax(-1)).sum())
        total += len(ids)
        lp, lq = _log_softmax(r), _log_softmax(got)
        kls.append(float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1))))
    eval_logits = runtime.forward(ref.eval_ids, runtime.new_cache(), logits_to_keep=len(ref.eval_ids))
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
        precision=runtime.manifest.precision, size_mb=size, perplexity=float(np.exp(_nll(eval_logits, ref.eval_ids))),
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
