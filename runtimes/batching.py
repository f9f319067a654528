"""Continuous batching of AR decoding across requests.

Each request keeps its own KV rows, sampling settings, seed and stop rules; one graph run advances every active
request by one token. New requests are prefilled on their own (reusing a cached prompt prefix when one matches)
and join the batch at the next step; finished, cancelled or timed-out ones leave it. The KV cache of the batch is
right-padded: row i holds ``length_i`` valid positions, and ``attention_mask`` row i has ``length_i + 1`` ones, so
GroupQueryAttention writes and reads each row at its own length.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgekit.runtimes.decoder import ARModel, GenerationStats
from edgekit.runtimes.denoiser import DenoiseStats
from edgekit.runtimes.errors import EdgekitError
from edgekit.runtimes.kv_cache import KVCache, PrefixCache
from edgekit.runtimes.sampling import SamplingParams, sample_next
from edgekit.runtimes.tokenizer import StopStrings, StreamingDetokenizer

EventKind = Literal["token", "done", "error"]
FinishReason = Literal["stop", "length", "cancelled", "timeout"]


class QueueFullError(EdgekitError):
    """The waiting queue is full; retry later."""


@dataclass(frozen=True)
class Event:
    """What a request's listener receives, from the engine thread. ``token`` events carry the new text ('' while a
    multi-byte character is incomplete); the last event is ``done`` (with the final stats) or ``error``."""

    kind: EventKind
    text: str = ""
    at: float = 0.0  # time.perf_counter() when it happened
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    error: str | None = None


@dataclass
class Request:
    """One generation job. ``on_event`` is called from the engine thread; it must not block."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    timeout_s: float | None = None
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None


class _Slot:
    """Engine-side state of an admitted request."""

    def __init__(self, req: Request, model: ARModel) -> None:
        self.req = req
        self.rng = np.random.default_rng(req.params.seed)
        self.history = list(req.prompt_ids)
        self.detok = StreamingDetokenizer(model.tokenizer)
        self.stops = StopStrings(req.params.stop)
        self.stats = GenerationStats(prompt_tokens=len(req.prompt_ids))
        self.tokens: list[int] = []  # tokens whose KV is held (prompt + fed generated tokens)
        self.cache: KVCache | None = None  # own cache until merged into the batch
        self.row = -1
        self.last_token = -1
        self.started = 0.0
        self.first_at = 0.0


class _Engine:
    """A bounded waiting queue and a worker thread that calls ``step()`` while there is work."""

    def __init__(self, model: Any, max_queue: int) -> None:
        if max_queue < 0:
            raise EdgekitError(f"max_queue must be >= 0, got {max_queue}.")
        self.model = model
        self.max_queue = max_queue
        self._waiting: deque[Request] = deque()
        self._active: list[Any] = []
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

    def submit(self, req: Request) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"The waiting queue is full ({self.max_queue} requests). HINT: retry later or raise --max-queue."
                )
            self._waiting.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    def start(self) -> Any:
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
        raise NotImplementedError

    def _expired(self, req: Request, now: float) -> bool:
        return req.timeout_s is not None and now - req.enqueued_at > req.timeout_s

    def _reap_waiting(self) -> None:
        """Drop cancelled requests from the queue; end expired ones with a timeout."""
        now = time.perf_counter()
        with self._cond:
            kept: deque[Request] = deque()
            for req in self._waiting:
                if req.cancelled:
                    continue
                if self._expired(req, now):
                    req.on_event(Event("done", at=now, finish_reason="timeout", stats=GenerationStats(
                        prompt_tokens=len(req.prompt_ids), finish_reason=None)))
                else:
                    kept.append(req)
            self._waiting = kept

    def _fail_all(self, message: str) -> None:
        now = time.perf_counter()
        with self._cond:
            reqs = [getattr(a, "req", a) for a in self._active] + list(self._waiting)
            self._active, self._waiting = [], deque()
        for req in reqs:
            req.on_event(Event("error", at=now, error=message))


class BatchEngine(_Engine):
    """Runs requests on one ``ARModel`` with up to ``max_batch`` decoding together; ``max_queue`` may wait."""

    def __init__(self, model: ARModel, max_batch: int = 8, max_queue: int = 32, prefix_cache_entries: int = 8) -> None:
        if max_batch < 1:
            raise EdgekitError(f"max_batch must be >= 1, got {max_batch}.")
        super().__init__(model, max_queue)
        assert model.manifest.kv_cache is not None
        self.max_batch = max_batch
        self.prefix_cache = PrefixCache(model.manifest.kv_cache, prefix_cache_entries)
        self._past: list[np.ndarray] = []  # batch KV, each [B, kv_heads, T, head_dim]
        self._dirty = False
        self._names = self.model.new_cache().past_names
        self._outputs = ["logits", *self.model.new_cache().present_names]

    def step(self) -> None:
        """Drop cancelled/expired requests, admit waiting ones (prefill), then one batched decode step."""
        self._reap()
        while len(self._active) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            if req.cancelled:
                continue
            self._admit(req)
        if self._active:
            self._decode()

    def _reap(self) -> None:
        self._reap_waiting()
        now = time.perf_counter()
        for slot in list(self._active):
            if slot.req.cancelled:
                self._finish(slot, "cancelled")
            elif self._expired(slot.req, now):
                self._finish(slot, "timeout")

    def _admit(self, req: Request) -> None:
        slot = _Slot(req, self.model)
        slot.started = req.admitted_at = time.perf_counter()
        cache = self.prefix_cache.lookup(req.prompt_ids)
        slot.stats.reused_prompt_tokens = len(cache)
        logits = self.model.prefill(req.prompt_ids[len(cache):], cache)
        slot.cache, slot.tokens = cache, list(req.prompt_ids)
        if not self._take(slot, sample_next(logits, req.params, slot.rng, self._hist(slot))):
            self._active.append(slot)
            self._dirty = True

    def _decode(self) -> None:
        if self._dirty:
            self._rebuild()
        slots = self._active
        lengths = np.array([len(s.tokens) for s in slots])
        total = int(lengths.max()) + 1
        feeds: dict[str, np.ndarray] = dict(zip(self._names, self._past))
        feeds["input_ids"] = np.array([[s.last_token] for s in slots], dtype=np.int64)  # [B, 1]
        feeds["attention_mask"] = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)  # [B, T + 1]
        feeds["logits_to_keep"] = np.array([1], dtype=np.int64)
        logits, *self._past = self.model.session.run(self._outputs, feeds)  # logits: [B, 1, V]
        for slot in slots:
            slot.tokens.append(slot.last_token)
        for i, slot in enumerate(list(slots)):
            self._take(slot, sample_next(logits[i, -1], slot.req.params, slot.rng, self._hist(slot)))

    def _rebuild(self) -> None:
        """Re-pack the batch KV after requests joined or left: each row keeps its own valid length."""
        parts: list[list[np.ndarray]] = []
        for slot in self._active:
            n = len(slot.tokens)
            if slot.cache is not None:
                parts.append(slot.cache.arrays)
                slot.cache = None
            else:
                parts.append([a[slot.row : slot.row + 1, :, :n, :] for a in self._past])
        width = max(len(s.tokens) for s in self._active)
        self._past = [
            np.concatenate([np.pad(p[j], ((0, 0), (0, 0), (0, width - p[j].shape[2]), (0, 0))) for p in parts])
            for j in range(len(self._names))
        ]
        for row, slot in enumerate(self._active):
            slot.row = row
        self._dirty = False

    def _hist(self, slot: _Slot) -> list[int]:
        return slot.history if slot.req.params.repetition_penalty != 1.0 else []

    def _take(self, slot: _Slot, token: int) -> bool:
        """Account for a sampled token, emit its text; return True when the request finished."""
        now = time.perf_counter()
        st = slot.stats
        st.generated_tokens += 1
        if st.generated_tokens == 1:
            st.ttft_s, slot.first_at = now - slot.req.enqueued_at, now
        else:
            st.decode_s = now - slot.first_at
        if token in self.model.stop_ids:
            self._finish(slot, "stop")
            return True
        st.token_ids.append(token)
        slot.history.append(token)
        slot.last_token = token
        out, hit = slot.stops.feed(slot.detok.put(token))
        slot.req.on_event(Event("token", out, at=now))
        if hit:
            self._finish(slot, "stop", flush=False)
            return True
        if st.generated_tokens >= slot.req.params.max_new_tokens:
            self._finish(slot, "length")
            return True
        return False

    def _finish(self, slot: _Slot, reason: FinishReason, flush: bool = True) -> None:
        now = time.perf_counter()
        if flush and reason in ("stop", "length"):
            out, hit = slot.stops.feed(slot.detok.flush())
            tail = out + ("" if hit else slot.stops.flush())
            if tail:
                slot.req.on_event(Event("token", tail, at=now))
        if slot in self._active:
            if reason in ("stop", "length") and slot.cache is None:
                n = len(slot.tokens)
                self.prefix_cache.put(slot.tokens, [a[slot.row : slot.row + 1, :, :n, :].copy() for a in self._past])
            self._active.remove(slot)
            self._dirty = True
        elif slot.cache is not None and reason in ("stop", "length"):
            self.prefix_cache.put(slot.tokens, slot.cache.arrays)
        slot.stats.finish_reason = reason if reason in ("stop", "length", "cancelled") else None
        slot.req.on_event(Event("done", at=now, finish_reason=reason, stats=slot.stats))

    def _fail_all(self, message: str) -> None:
        self._dirty = False
        super()._fail_all(message)


class SerialEngine(_Engine):
    """Serves a ``DiffusionModel``: one request at a time (each is many whole-sequence passes), others queue.
    Each committed block is one ``token`` event; cancellation and timeouts take effect before the next pass."""

    def step(self) -> None:
        self._reap_waiting()
        with self._cond:
            if not self._waiting:
                return
            req = self._waiting.popleft()
        if req.cancelled:
            return
        req.admitted_at = time.perf_counter()
        self._active = [req]
        try:
            stats = DenoiseStats()
            detok = StreamingDetokenizer(self.model.tokenizer)

            def should_stop() -> bool:
                return req.cancelled or self._expired(req, time.perf_counter())

            for block in self.model.generate_blocks(req.prompt_ids, req.params, stats, should_stop=should_stop):
                req.on_event(Event("token", "".join(detok.put(t) for t in block), at=time.perf_counter()))
            reason: FinishReason = stats.finish_reason or "length"  # type: ignore[assignment]
            if reason == "cancelled" and not req.cancelled:
                reason = "timeout"
            elif reason in ("stop", "length"):
                tail = detok.flush()
                if tail:
                    req.on_event(Event("token", tail, at=time.perf_counter()))
            req.on_event(Event("done", at=time.perf_counter(), finish_reason=reason, stats=stats))  # type: ignore[arg-type]
        finally:
            self._active = []
