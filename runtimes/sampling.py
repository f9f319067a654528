"""Next-token selection: greedy, temperature, top-k, top-p and repetition penalty, seeded for reproducibility.

Order of operations follows Hugging Face ``generate``: repetition penalty, temperature, top-k, top-p, then a draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgekit.runtimes.errors import ConfigError

_NUCLEUS_PROBE = 1024  # candidates examined before falling back to a full sort for top-p
TEMPERATURE_MAX = 2.0  # the OpenAI API's bound, and the one every model and the server validate against


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one generation. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        validate(self)

    def with_overrides(self, **kw: Any) -> SamplingParams:
        """Return a copy with the non-None values of ``kw`` applied (and validated)."""
        changes = {k: v for k, v in kw.items() if v is not None}
        if "stop" in changes:
            stop = changes["stop"]
            changes["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return replace(self, **changes)

    @classmethod
    def from_defaults(cls, defaults: Mapping[str, Any]) -> SamplingParams:
        known = {k: v for k, v in defaults.items() if k in cls.__dataclass_fields__}
        return cls().with_overrides(**known)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(p: SamplingParams) -> None:
    if not isinstance(p.max_new_tokens, int) or isinstance(p.max_new_tokens, bool) or p.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {p.max_new_tokens!r}.")
    if p.max_new_tokens > 1_000_000:
        raise ConfigError(f"max_new_tokens must be <= 1000000, got {p.max_new_tokens}.")
    if not _is_number(p.temperature) or not 0 <= p.temperature <= TEMPERATURE_MAX:
        raise ConfigError(f"temperature must be between 0 and {TEMPERATURE_MAX:g} (0 = greedy), got {p.temperature!r}.")
    if not _is_number(p.top_p) or not 0 < p.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {p.top_p!r}.")
    if not isinstance(p.top_k, int) or isinstance(p.top_k, bool) or p.top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {p.top_k!r}.")
    if not _is_number(p.repetition_penalty) or not 0 < p.repetition_penalty <= 10:
        raise ConfigError(f"repetition_penalty must be in (0, 10] (1 = off), got {p.repetition_penalty!r}.")
    if p.seed is not None and (not isinstance(p.seed, int) or isinstance(p.seed, bool) or p.seed < 0):
        raise ConfigError(f"seed must be a non-negative integer or None, got {p.seed!r}.")
    if not all(isinstance(s, str) and s for s in p.stop):
        raise ConfigError(f"stop must be non-empty strings, got {p.stop!r}.")


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty on every token seen so far: divide positive logits, multiply negative ones."""
    if penalty == 1.0 or not history:
        return logits
    ids = np.unique(np.asarray(history, dtype=np.int64))
    out = logits.copy()
    picked = out[ids]
    out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sample_next(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: Sequence[int] = ()
) -> int:
    """Pick the next token from ``logits`` ([V], float32)."""
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.shape[0]:
        cand = np.argpartition(-scaled, params.top_k - 1)[: params.top_k]
    else:
        cand = np.arange(scaled.shape[0])
    probs = _softmax(scaled[cand])
    if params.top_p < 1.0:
        cand, probs = _nucleus(cand, probs, params.top_p)
    u = rng.random()
    idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    return int(cand[min(idx, len(cand) - 1)])


def _nucleus(cand: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Smallest set of most likely candidates whose mass reaches ``top_p`` (exact; avoids a full sort if it can)."""
    if len(probs) > _NUCLEUS_PROBE:
        head = np.argpartition(-probs, _NUCLEUS_PROBE - 1)[:_NUCLEUS_PROBE]
        if probs[head].sum() >= top_p:  # the nucleus lies inside the probed head
            cand, probs = cand[head], probs[head]
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    keep = int(np.searchsorted(np.cumsum(sorted_p), top_p, side="left")) + 1
    keep = min(keep, len(order))
    chosen = order[:keep]
    return cand[chosen], probs[chosen]
