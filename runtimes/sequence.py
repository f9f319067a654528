"""One request being generated: its history, random generator, detokenizer, stop rules, stats and pending text.

Every model's loop (the AR decoder one token at a time, a dLLM one block at a time) commits tokens through
``accept``; the single-stream API and the batch engine read the text back with ``take_text``. Times are measured
from the sequence's creation (a request's arrival), so TTFT means the same thing everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from edgekit.runtimes.model import FinishReason, Stats
from edgekit.runtimes.sampling import TokenLogprob
from edgekit.runtimes.tokenizer import StopStrings, StreamingDetokenizer, Tokenizer

if TYPE_CHECKING:
    from edgekit.runtimes.constraints import Guide


class Sequence:
    """Per-request state. ``params`` are the model's validated settings (kept for the model's own use)."""

    def __init__(self, prompt_ids: Seq[int], params: object, tokenizer: Tokenizer, stop_ids: frozenset[int],
                 max_tokens: int, seed: int | None = None, stop: Iterable[str] = ()) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = stop_ids
        self.max_tokens = max_tokens
        self.rng = np.random.default_rng(seed)
        self.history = list(prompt_ids)  # prompt + committed tokens (repetition penalty)
        self.stats = Stats(prompt_tokens=len(self.prompt_ids))
        self.started = time.perf_counter()
        self.deadline: float | None = None
        self.cancelled = False
        self.state: object = None  # the model's own per-sequence state (a dLLM's block generator)
        self.guide: Guide | None = None  # the output constraint's state (constraints.Guide), if any
        self.logprobs: list[TokenLogprob] | None = None  # one entry per committed token when asked for
        self.pending: list[int] = []  # committed tokens the model has not yet been fed (AR: the next forward's input)
        self.fork_of: Sequence | None = None  # a sibling choice (n > 1) whose prompt KV this one may copy
        self.keep_first_logits = False  # keep ``first_logits`` (the prompt's last position) for siblings
        self.first_logits: object = None
        self.drafter: object = None  # speculative decoding: a drafter (speculative.LookupDrafter) ...
        self.draft_len: object = None  # ... its adaptive length (speculative.DraftLength)
        self.drafts: list[int] = []  # drafted tokens at the end of ``pending`` (not committed: verified on feeding)
        self._detok = StreamingDetokenizer(tokenizer)
        self._stops = StopStrings(tuple(stop))
        self._pieces: list[str] = []
        self._fresh = False  # tokens committed since the last take_text()

    @property
    def done(self) -> bool:
        return self.stats.finish_reason is not None

    def should_stop(self) -> bool:
        """Cancelled, or past its deadline (checked by loops that run many passes per step)."""
        return self.cancelled or (self.deadline is not None and time.perf_counter() > self.deadline)

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Commit one chosen token (and its log-probability entry, when asked for); return True when the sequence
        has finished (stop token, stop string, length)."""
        now = time.perf_counter()
        if self.guide is not None:
            self.guide.consume(token)
        st = self.stats
        st.generated_tokens += 1
        if st.generated_tokens == 1:
            st.ttft_s = now - self.started
        st.latency_s = now - self.started
        self._fresh = True
        if token in self.stop_ids:
            self.finish("stop")
            return True
        st.token_ids.append(token)
        self.history.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        out, hit = self._stops.feed(self._detok.put(token))
        self._pieces.append(out)
        if hit:
            self.finish("stop", flush=False)
            return True
        if st.generated_tokens >= self.max_tokens:
            self.finish("length")
            return True
        return False

    def accept_block(self, tokens: Iterable[int]) -> bool:
        """Commit a block of tokens at once (a dLLM's finished block); stops at a stop token like ``accept``."""
        self.stats.blocks += 1
        return any(self.accept(t) for t in tokens)

    def finish(self, reason: FinishReason, flush: bool = True) -> None:
        """End the sequence; a normal end ("stop", "length") releases the text held back for UTF-8 or stop strings."""
        if self.done:
            return
        if flush and reason in ("stop", "length"):
            out, hit = self._stops.feed(self._detok.flush())
            self._pieces.append(out + ("" if hit else self._stops.flush()))
        self.stats.finish_reason = reason

    def take_text(self) -> str | None:
        """The text committed since the last call ('' while a character is incomplete); None if nothing happened."""
        if not self._fresh and not self._pieces:
            return None
        text, self._pieces, self._fresh = "".join(self._pieces), [], False
        return text
