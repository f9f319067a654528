"""Speculative decoding for AR bundles: a drafter proposes the next few tokens, one multi-token forward scores them
all, and the target keeps the longest prefix its own rule accepts (plus one token of its own), so a forward can
commit several tokens without changing what is generated.

Greedy: a drafted token is kept when it is the target's argmax, so the output is token-identical to plain decoding.
Sampling: the standard speculative-sampling rule for a deterministic drafter (its proposal is a point mass q on d):
keep d with probability min(1, p(d) / q(d)) = p(d), else draw from the residual max(0, p - q), i.e. p without d,
renormalised; the output distribution is exactly the target's (tests/test_speculative.py checks it with a
chi-square test that fails for a wrong rule). ``p`` is the distribution a plain draw would use (bias, penalties,
temperature, top-k, top-p).

Drafters: ``lookup`` (prompt lookup: the tokens that followed the most recent earlier occurrence of the last n-gram
of prompt + answer; no second model). The draft length adapts per sequence (``DraftLength``): it grows while drafts
are accepted and shrinks when they are not, and nothing is drafted while the expected tokens per verification are
below what the verifying forward costs in plain steps (the batch measures both), with a probe now and then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgekit.runtimes.errors import ConfigError

MODES = ("off", "lookup")
MAX_DRAFT = 8


def check_mode(value: object) -> str:
    """The ``speculate`` option: "off" or "lookup" (a draft bundle and self-speculation are not built yet)."""
    if value in MODES:
        return str(value)
    if isinstance(value, str) and (value.startswith("draft=") or value.startswith("self=")):
        raise ConfigError(f"speculate={value!r}: draft bundles and self-speculation are not implemented yet. "
                          "HINT: use speculate='lookup' (prompt lookup) or 'off'.")
    raise ConfigError(f"speculate must be one of {', '.join(MODES)}, got {value!r}.")


class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``history`` (prompt + answer so far); deterministic in its input."""

    def propose(self, history: Sequence[int], k: int) -> list[int]: ...


class LookupDrafter:
    """Prompt lookup: match the last ``n`` tokens (n from ``max_ngram`` down to ``min_ngram``) at their most recent
    earlier position in the history and propose what followed there."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, window: int = 4096) -> None:
        self.max_ngram, self.min_ngram, self.window = max_ngram, min_ngram, window

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(history) < self.min_ngram + 1:
            return []
        h = np.asarray(history[-self.window:], np.int64)
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)  # every earlier n-gram with a successor
            hits = np.flatnonzero((windows == h[-n:]).all(axis=1))
            if len(hits):
                s = int(hits[-1]) + n  # the most recent occurrence's continuation
                return [int(t) for t in h[s:s + k]]
        return []


@dataclass
class DraftLength:
    """Per-sequence draft length from recent acceptance, gated by what a verification costs.

    ``k`` grows by one after a fully accepted draft (up to ``MAX_DRAFT``) and halves when under half is accepted;
    ``alpha`` is a running estimate of the chance a drafted token is kept. A draft of k tokens is expected to commit
    E(k) = 1 + alpha + ... + alpha^k tokens in one verifying forward, which costs ``cost`` plain steps (measured by
    the batch: a multi-token forward is not free on a CPU, and a row verified beside a batch costs a forward of its
    own); below that break-even nothing is drafted but a probe every ``probe_every`` steps, an interval that doubles
    after each failed probe (up to 256 steps) and resets when one pays."""

    k: int = 4
    alpha: float = 0.6
    probe_every: int = 16
    _idle: int = 0
    _probing: bool = False

    def expected(self, k: int) -> float:
        return sum(self.alpha ** i for i in range(k + 1))

    def next(self, cost: float = 1.0) -> int:
        if self.k > 0 and self.expected(self.k) >= cost:
            self._probing = False
            return self.k
        self._idle += 1
        self._probing = self._idle % self.probe_every == 0
        return max(self.k, 1) if self._probing else 0

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.alpha = 0.7 * self.alpha + 0.3 * (accepted / drafted)
        if self._probing:
            self.probe_every = 16 if accepted * 2 >= drafted else min(self.probe_every * 2, 256)
            self._probing = False
        if accepted == drafted:
            self.k = min(max(self.k, drafted) + 1, MAX_DRAFT)
        elif accepted * 2 < drafted:
            self.k = max(self.k // 2, 1)
        self._idle = 0


def accept_draft(probs: np.ndarray, cand: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
    """The sampling rule for one drafted token under the target's distribution (``cand`` ids, ``probs``): keep it
    with probability p(draft); else a token drawn from p with the draft removed. Returns (kept, token)."""
    where = np.flatnonzero(cand == draft)
    p_draft = float(probs[where[0]]) / float(probs.sum()) if len(where) else 0.0
    if rng.random() < p_draft:
        return True, draft
    rest = probs.astype(np.float64, copy=True)
    if len(where):
        rest[where[0]] = 0.0
    total = rest.sum()
    if total <= 0:  # (p was a point mass on the draft: always kept above)
        return True, draft
    idx = int(np.searchsorted(np.cumsum(rest), rng.random() * total, side="right"))
    return False, int(cand[min(idx, len(cand) - 1)])
