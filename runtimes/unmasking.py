"""dLLM unmasking rules: which masked positions a denoising step commits, and the settings that drive them.

Remasking rules are a named enum (LLaDA's low-confidence and random orders, margin, entropy); with a ``threshold``
every position whose predicted token is that confident is committed at once (Fast-dLLM's parallel decoding, at least
one per step); with an ``entropy_bound`` the longest prefix of the ranking whose summed entropy minus its largest
entropy stays within the bound is committed (the EB-sampler's rule). ``position_decay`` (PC-Sampler's positional
prior) scales each position's ranking score by exp(-decay x its offset in the block), so that, between similarly
confident positions, the earlier goes first: the order an AR-adapted block model (which knows its left-to-right
dependencies best) decodes correctly in. ``commit`` is the one denoising step both diffusion loops take (the full
denoiser and the block loop). Pure numpy functions, unit-tested on hand-worked cases.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from edgekit.runtimes.sampling import filtered

if TYPE_CHECKING:
    from edgekit.runtimes.diffusion_params import DiffusionParams


class Remasking(str, Enum):
    """Which masked positions a step commits first."""

    LOW_CONFIDENCE = "low_confidence"  # LLaDA-style: the highest probability of the predicted token
    RANDOM = "random"  # LLaDA's baseline: uniformly random positions
    MARGIN = "margin"  # top-1 minus top-2 probability (confident and unambiguous)
    ENTROPY = "entropy"  # lowest predictive entropy


class CacheMode(str, Enum):
    """How much of the sequence a denoising step recomputes (Fast-dLLM's approximate KV caches)."""

    NONE = "none"  # every step runs the whole sequence
    PREFIX = "prefix"  # prompt + finished blocks encoded once per block; steps run the current block and the suffix
    DUAL = "dual"  # the masked suffix is cached too; steps run only the current block


CACHE_MODES = tuple(c.value for c in CacheMode)
POSITION_DECAY_MAX = 10.0


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many positions each step commits: ``masked`` spread as evenly as possible, the remainder first."""
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# Remasking rule -> the score a position is ranked by (higher commits first), from its probabilities p [N, V], the
# predicted tokens' probabilities p_x0 [N] and the generator (the random rule's draw)
RULES: dict[Remasking, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    Remasking.LOW_CONFIDENCE: lambda p, p_x0, rng: p_x0,
    Remasking.RANDOM: lambda p, p_x0, rng: rng.random(len(p_x0)),
    Remasking.MARGIN: lambda p, p_x0, rng: np.diff(np.sort(p, axis=-1)[:, -2:], axis=-1)[:, 0],
    Remasking.ENTROPY: lambda p, p_x0, rng: np.sum(p * np.log(p + 1e-30), axis=-1),  # -entropy
}


def select(logits: np.ndarray, k: int, params: DiffusionParams, rng: np.random.Generator,
           offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One denoising decision for N masked positions (logits [N, V]; ``offsets``: their offsets in the block, for
    ``position_decay``): the predicted token of each, and the indices (into those N) to commit now."""
    if params.temperature > 0:  # Gumbel-max: a sample from softmax(logits / T) within top-k / top-p, per position
        scaled = filtered(logits.astype(np.float64) / params.temperature, params.top_k, params.top_p)
        x0 = np.argmax(scaled - np.log(-np.log(rng.random(scaled.shape))), axis=-1)
    else:
        x0 = np.argmax(logits, axis=-1)
    p = _softmax(logits.astype(np.float64))
    p_x0 = p[np.arange(len(x0)), x0]
    conf = RULES[Remasking(params.remasking)](p, p_x0, rng)
    if params.position_decay and offsets is not None:  # later positions rank lower (scores of either sign)
        w = np.exp(-params.position_decay * (np.asarray(offsets, np.float64) - np.min(offsets)))
        conf = np.where(conf >= 0, conf * w, conf / w)
    order = np.argsort(-conf, kind="stable")
    if params.threshold is not None:
        chosen = np.flatnonzero(p_x0 > params.threshold)
        if len(chosen) == 0:
            chosen = order[:1]
    elif params.entropy_bound is not None:  # EB-sampler: the longest prefix of the ranking within the bound
        h = -np.sum(p * np.log(p + 1e-30), axis=-1)[order]
        fits = np.cumsum(h) - np.maximum.accumulate(h) <= params.entropy_bound  # non-increasing in the prefix
        chosen = order[: max(int(fits.sum()), 1)]
    else:
        chosen = order[:k]
    return x0, np.sort(chosen)


def schedule(masked: int, params: DiffusionParams) -> list[int]:
    """A block's steps: how many of its ``masked`` positions each commits (``params.steps_per_block`` steps)."""
    return transfer_schedule(masked, params.steps_per_block)


def commit(x: MutableSequence[int], lo: int, logits: np.ndarray, masked: np.ndarray, plan: list[int], step: int,
           params: DiffusionParams, rng: np.random.Generator) -> bool:
    """Step ``step`` of the block that starts at ``lo`` of ``x``: ``logits`` [L, V] of the block, ``masked`` the
    offsets in it still to decode, ``plan`` its ``schedule``; the chosen positions get their predicted tokens in
    ``x``. True when every masked position is committed (the block is clean)."""
    k = plan[step] if step < len(plan) else len(masked)
    x0, chosen = select(logits[masked], max(k, 1), params, rng, masked)
    for j in chosen:
        x[lo + int(masked[j])] = int(x0[j])
    return len(chosen) == len(masked)
