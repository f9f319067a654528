"""Continuous batching for any ``Model``: a bounded waiting queue and a worker thread driving the model's ``Batch``.

New requests are admitted while the batch has room (an AR model prefills them, reusing a cached prompt prefix) and
join at the next step; finished, cancelled or timed-out ones leave it. The engine never asks what kind of model it
runs: a step is whatever the model's batch does (one token per AR sequence, one block per dLLM sequence).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgekit.runtimes.errors import ConfigError, QueueFullError
from edgekit.runtimes.model import FinishReason, Model, Stats
from edgekit.runtimes.sequence import Sequence as Seq

EventType = Literal["token", "done", "error"]


@dataclass(frozen=True)
class Event:
    """What a request's listener receives, from the engine thread. ``token`` events carry newly committed text
    ('' while a multi-byte character is incomplete); the last event is ``done`` (with the final stats) or
    ``error``."""

    type: EventType
    text: str = ""
    at: float = 0.0  # time.perf_counter() when it happened
    finish_reason: FinishReason | None = None
    stats: Stats | None = None
    error: str | None = None
    tokens: int = 0  # tokens committed with ``text`` (one for AR steps, a block's worth for dLLMs)
    logprobs: tuple[Any, ...] = ()  # the ``sampling.TokenLogprob`` of each token committed with ``text``, if asked


@dataclass
class Request:
    """One generation job: prompt ids and the model's validated params. ``on_event`` is called from the engine
    thread; it must not block."""

    prompt_ids: list[int]
    params: Any
    on_event: Callable[[Event], None]
    timeout_s: float | None = None
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    seq: Seq | None = None  # made when the request is submitted
    sent_tokens: int = 0  # generated tokens already reported in events
    sent_logprobs: int = 0


class Engine:
    """Runs requests on one model with up to ``max_batch`` generating together; ``max_queue`` more may wait."""

    def __init__(self, model: Model, max_batch: int = 8, max_queue: int = 32, prefix_cache_entries: int = 8) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}.")
        if max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {max_queue}.")
        self.model = model
        self.max_queue = max_queue
        self.batch = model.new_batch(max_batch, prefix_cache_entries)
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- public API (any thread) ---------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, req: Request, *siblings: Request) -> None:
        """Queue a request; ``siblings``: more choices of the same prompt (n > 1), queued with it (all or none), which
        copy its prompt KV instead of prefilling it again where the model's batch can (``fork_of``) and draw from
        their own random streams (seed, then [seed, i])."""
        group = (req, *siblings)
        for i, r in enumerate(group):
            r.seq = self.model.new_sequence(r.prompt_ids, r.params)
            r.seq.started = r.enqueued_at  # TTFT counts the time spent waiting
            if r.timeout_s is not None:
                r.seq.deadline = r.enqueued_at + r.timeout_s
            if i:
                r.seq.fork_of = req.seq
                seed = getattr(r.params, "seed", None)
                r.seq.rng = np.random.default_rng(None if seed is None else [seed, i])
        if siblings:
            self._seq(req).keep_first_logits = True
        with self._cond:
            if len(self._waiting) >= self.max_queue:  # (a group counts as the one request it came in)
                raise QueueFullError(
                    f"The waiting queue is full ({self.max_queue} requests). HINT: retry later or raise --max-queue.")
            self._waiting.extend(group)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        if req.seq is not None:
            req.seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="edgekit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail the requests involved
                self._fail_all(f"{type(e).__name__}: {e}")

    def step(self) -> None:
        """End cancelled/expired requests, admit waiting ones, then one step of the batch."""
        self._reap()
        while len(self._active) < self.batch.capacity:
            with self._cond:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            if req.cancelled:
                continue
            req.admitted_at = time.perf_counter()
            self._active.append(req)
            self.batch.admit(self._seq(req))
            self._emit(req)
        if self.batch.active:
            self.batch.step()
        for req in list(self._active):
            self._emit(req)

    @staticmethod
    def _seq(req: Request) -> Seq:
        assert req.seq is not None, "submit() makes the request's sequence"
        return req.seq

    def _emit(self, req: Request) -> None:
        """Send what the request's sequence committed since the last look; the final event once it is done."""
        seq = self._seq(req)
        text = seq.take_text()
        now = time.perf_counter()
        if text is not None:
            made = len(seq.stats.token_ids)
            entries: tuple[Any, ...] = ()
            if seq.logprobs is not None:
                entries = tuple(seq.logprobs[req.sent_logprobs:])
                req.sent_logprobs = len(seq.logprobs)
            req.on_event(Event("token", text, at=now, tokens=max(made - req.sent_tokens, 0), logprobs=entries))
            req.sent_tokens = made
        if seq.done and req in self._active:
            self._active.remove(req)
            req.on_event(Event("done", at=now, finish_reason=seq.stats.finish_reason, stats=seq.stats))

    def _end(self, req: Request, reason: FinishReason) -> None:
        seq = self._seq(req)
        self.batch.remove(seq)
        seq.finish(reason)
        self._emit(req)

    def _reap(self) -> None:
        now = time.perf_counter()
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            for req in waiting:
                if req.cancelled:
                    continue
                if self._expired(req, now):
                    req.on_event(Event("done", at=now, finish_reason="timeout",
                                       stats=Stats(prompt_tokens=len(req.prompt_ids))))
                else:
                    self._waiting.append(req)
        for req in list(self._active):
            if req.cancelled:
                self._end(req, "cancelled")
            elif self._expired(req, now):
                self._end(req, "timeout")

    @staticmethod
    def _expired(req: Request, now: float) -> bool:
        return req.timeout_s is not None and now - req.enqueued_at > req.timeout_s

    def _fail_all(self, message: str) -> None:
        now = time.perf_counter()
        with self._cond:
            reqs: Sequence[Request] = [*self._active, *self._waiting]
            self._active, self._waiting = [], deque()
        for req in reqs:
            if req.seq is not None:
                self.batch.remove(req.seq)
            req.on_event(Event("error", at=now, error=message))
