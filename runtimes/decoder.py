"""The KV-cached decoder for AR bundles: prefill once, then one graph run per new token for every sequence of a batch.

``ARModel`` holds the decoder graph's runner (``graph.GraphRunner``) and the sampling settings; ``ARBatch`` is the loop
both the single-stream API and the serving engine run: admit (prefill, reusing a cached prefix), then steps of one
token per sequence, one graph run over the rows of a shared KV buffer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes import model as mdl
from edgekit.runtimes.backend import BackendOptions
from edgekit.runtimes.bundle import Manifest
from edgekit.runtimes.constraints import MaskJob
from edgekit.runtimes.errors import ConfigError, ContextLengthError
from edgekit.runtimes.graph import GraphRunner
from edgekit.runtimes.kv_cache import KVCache, PrefixCache
from edgekit.runtimes.sampling import SamplingParams, TokenLogprob, choose, verify_draft
from edgekit.runtimes.sequence import Sequence
from edgekit.runtimes.speculative import DraftLength, LookupDrafter
from edgekit.runtimes.tokenizer import Prompt


class ARModel(mdl.Bundled):
    """A loaded AR bundle. ``stream``/``generate`` take a prompt string or a list of chat messages. ``graph`` is its
    decoder graph's runner (``GraphRunner``: forward, run_rows, KV slots)."""

    kind = "ar"
    objective = "next_token"  # logits at position i predict token i + 1 (what quality reports score)
    option_names = frozenset(SamplingParams.__dataclass_fields__)
    parity_settings = (mdl.ParitySetting("greedy", {"temperature": 0.0}),)
    parity_prompts = 9  # how many of the built-in prompts parity runs (each setting on each)

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions) -> None:
        super().__init__(bundle_dir, manifest)
        self.graph = GraphRunner(bundle_dir, manifest, backend)
        self.defaults = SamplingParams.from_defaults(manifest.generation)

    def logits(self, token_ids: Seq[int]) -> np.ndarray:
        """Teacher-forced logits [S, V] of every position (quality reports)."""
        return self.graph.logits(token_ids)

    # --- generation ----------------------------------------------------------------------------------------------
    def params(self, prompt_len: int, **options: Any) -> SamplingParams:
        """Validated settings for a prompt of ``prompt_len`` tokens (the bundle's defaults for what is not given)."""
        mdl.refuse_unknown(self, options)
        params = self.defaults.with_overrides(**options)
        if params.logit_bias and params.logit_bias[-1][0] >= self.manifest.vocab_size:
            raise ConfigError(f"logit_bias names token {params.logit_bias[-1][0]}, beyond this bundle's vocabulary "
                              f"of {self.manifest.vocab_size} (ids 0..{self.manifest.vocab_size - 1}).")
        room = self.max_context - prompt_len
        if options.get("max_new_tokens") is None and params.max_new_tokens > room > 0:
            params = params.with_overrides(max_new_tokens=room)  # default length: fill the context, no more
        if room < 1:
            raise ContextLengthError(
                f"Prompt of {prompt_len} tokens does not fit the bundle's max context of {self.max_context} tokens "
                f"(room is needed for at least one new token). HINT: shorten the prompt by {1 - room} tokens or "
                "re-export with a larger --max-context.")
        mdl.check_fits(self, prompt_len, "max_new_tokens", params.max_new_tokens)
        return params

    def new_sequence(self, prompt_ids: Seq[int], params: SamplingParams) -> Sequence:
        seq = Sequence(prompt_ids, params, self.tokenizer, self.stop_ids, params.max_new_tokens, params.seed,
                       params.stop)
        constraint = params.constraint
        if constraint is not None:
            seq.guide = self.vocab.guide(constraint)
            seq.stats.compile_s = seq.guide.compile_s
        if params.logprobs is not None:
            seq.logprobs = []
        if params.speculate == "lookup" and seq.guide is None:  # (constrained rows do not speculate)
            seq.drafter, seq.draft_len = LookupDrafter(), DraftLength()
        return seq

    def new_batch(self, max_batch: int = 1, prefix_cache_entries: int = 0) -> ARBatch:
        return ARBatch(self, max_batch, prefix_cache_entries)

    def stream(self, prompt: Prompt, batch: ARBatch | None = None, **options: Any) -> mdl.TextStream:
        """Stream the answer as text pieces. Options: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, presence_penalty, frequency_penalty, logit_bias ({token id: bias}), seed, stop; an output
        constraint (one of json_schema (a schema), json_object=True, regex, grammar (Lark)) with jump_forward (default
        True: append the tokens it forces without a draw, fed in one forward); logprobs=k (the stream's
        ``stats``-holding sequence keeps one ``TokenLogprob`` per token: ``model.stream(...).logprobs``).
        ``batch``: reuse one across calls to keep a chat's KV prefix (made with ``new_batch(1,
        prefix_cache_entries=N)``). Close the returned stream to cancel."""
        return mdl.stream(self, prompt, batch, options)

    def trace(self, prompt_ids: Seq[int], options: Mapping[str, Any], reference: Any = None,
              new_tokens: int = 64) -> mdl.Trace:
        """Exactly ``new_tokens`` tokens chosen by the runtime's sampler (stop tokens ignored) on the logits of
        ``reference`` (``prefill(ids) -> [S, V]``, ``step(token) -> [V]``) or, by default, of this bundle's graph."""
        provider = reference if reference is not None else _GraphLogits(self)
        seq = self.new_sequence(prompt_ids, self.params(len(prompt_ids), **{**options, "max_new_tokens": new_tokens}))
        logits = np.asarray(provider.prefill(list(prompt_ids)))
        steps, tokens = [logits], []
        for i in range(new_tokens):
            tokens.append(self._choose(seq, logits[-1])[0])
            seq.history.append(tokens[-1])
            if i + 1 < new_tokens:
                logits = np.asarray(provider.step(tokens[-1]))[None]
                steps.append(logits[0])
        return mdl.Trace(steps, tokens)

    @staticmethod
    def _choose(seq: Sequence, logits: np.ndarray, allowed: np.ndarray | None = None) -> tuple[int, Any]:
        p = seq.params
        assert isinstance(p, SamplingParams)
        return choose(logits, p, seq.rng, seq.history if p.needs_history else (), len(seq.prompt_ids), allowed)

    @staticmethod
    def commit(seq: Sequence, logits: np.ndarray, allowed: np.ndarray | None = None) -> bool:
        """Draw the next token on ``logits`` [V] (under the constraint's mask ``allowed``), commit it and the tokens
        the constraint forces after it (jump-forward), and queue them all in ``seq.pending`` for the next forward;
        True when the sequence has finished."""
        guide, p = seq.guide, seq.params
        assert isinstance(p, SamplingParams)
        if guide is not None and guide.finished:  # the grammar is complete: only an end is left
            seq.finish("stop")
            return True
        if guide is not None:
            seq.stats.mask_s = guide.mask_s
        token, entry = ARModel._choose(seq, logits, allowed)
        if seq.accept(token, entry):
            return True
        seq.pending = [token]
        if guide is not None and p.jump_forward:
            for forced in guide.forced():
                seq.stats.forced_tokens += 1
                if seq.accept(forced, TokenLogprob(forced, 0.0, ((forced, 0.0),)) if entry is not None else None):
                    return True
                seq.pending.append(forced)
        if guide is not None and guide.finished:
            seq.finish("stop")
            return True
        return False


class _GraphLogits:
    """The bundle's graph as a logits provider for ``trace``: every prompt position, then one token at a time."""

    def __init__(self, model: ARModel) -> None:
        self.graph, self.cache = model.graph, model.graph.new_cache()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.graph.forward(ids, self.cache, logits_to_keep=len(ids))

    def step(self, token: int) -> np.ndarray:
        return self.graph.forward([token], self.cache)[-1]


class ARBatch:
    """Sequences decoding together on one ``ARModel``: each keeps its own row of one shared KV buffer, settings, seed
    and stop rules; one graph run per step advances them all by one token. A finished sequence's row stays in the
    prefix cache (no copy) until a request sharing its prefix takes it over or it is evicted."""

    def __init__(self, model: ARModel, capacity: int = 1, prefix_cache_entries: int = 0) -> None:
        self.model = model
        self.capacity = capacity
        self.slots = model.graph.new_slots(capacity + max(prefix_cache_entries, 0))
        self.prefix = PrefixCache(prefix_cache_entries)
        self._seqs: list[Sequence] = []
        self._costs: dict[str, float] = {}  # running means of forward times (speculation's break-even)

    @property
    def active(self) -> list[Sequence]:
        return list(self._seqs)

    def _cache_for(self, prompt: Seq[int]) -> KVCache:
        cache = self.prefix.take(prompt)
        if cache is not None:
            return cache
        while not self.slots.free and self.prefix.evict_oldest():
            pass
        return KVCache(self.slots)

    def admit(self, seq: Sequence) -> None:
        """Prefill the part of the prompt no cached prefix covers and commit the first token."""
        forked, job = self._fork(seq), None
        if forked is not None:
            cache, logits = forked
        else:
            cache = self._cache_for(seq.prompt_ids)
            seq.stats.reused_prompt_tokens = len(cache)
            job = MaskJob(self.model.vocab, [(seq.guide, 0)], 1) if seq.guide is not None else None
            try:
                logits = self.model.graph.forward(seq.prompt_ids[len(cache):], cache)[-1]
            except BaseException:
                cache.release()
                raise
            self._count(seq, len(seq.prompt_ids) - seq.stats.reused_prompt_tokens)
        if seq.keep_first_logits:
            seq.first_logits = logits
        seq.state = cache
        allowed = job.result()[0] if job is not None else seq.guide.allowed() if seq.guide is not None else None
        if ARModel.commit(seq, logits, allowed):
            self._retire(seq)
        else:
            self._seqs.append(seq)

    def _draft(self, seq: Sequence) -> None:
        """Append a speculative draft to the row's pending token (prompt lookup), within the room left."""
        if seq.drafter is None or len(seq.pending) != 1:
            return
        assert isinstance(seq.draft_len, DraftLength)
        room = min(seq.max_tokens - seq.stats.generated_tokens - 1,
                   self.model.max_context - len(self._cache(seq)) - 1)
        k = min(seq.draft_len.next(self._verify_cost()), room)
        seq.drafts = seq.drafter.propose(seq.history, k) if k > 0 else []  # type: ignore[attr-defined]
        seq.pending = seq.pending + seq.drafts

    def _timed(self, key: str, seconds: float) -> None:
        """A running mean of what a kind of forward takes ("plain": a step of one token a row, per row; "verify": a
        forward of several tokens)."""
        old = self._costs.get(key)
        self._costs[key] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def _verify_cost(self) -> float:
        """What verifying a draft costs in plain per-row steps: a lone row's multi-token forward against one row's
        share of a batched step (until both were measured: 2.0, about the exact int4 kernels' ratio, times the rows
        decoding)."""
        plain, verify = self._costs.get("plain"), self._costs.get("verify")
        return verify / plain if plain and verify else 2.0 * max(len(self._seqs), 1)

    def _verify(self, seq: Sequence, logits: np.ndarray) -> bool:
        """Check the row's drafted tokens on the logits of [last token, drafts...] ([n, V]): commit the kept prefix
        and the target's own next token, rewind the KV cache past the rejected ones; True when finished."""
        drafts, seq.drafts = seq.drafts, []
        cache = self._cache(seq)
        base = len(cache) - len(drafts)  # valid positions: up to the last committed token
        p = seq.params
        assert isinstance(p, SamplingParams)
        seq.stats.drafted_tokens += len(drafts)
        kept, finished = 0, False
        for j, d in enumerate(drafts):
            ok, token, entry = verify_draft(logits[j], p, seq.rng, d, seq.history if p.needs_history else (),
                                            len(seq.prompt_ids))
            kept += ok
            finished = seq.accept(token, entry)
            if finished or not ok:
                break
        else:
            token, entry = ARModel._choose(seq, logits[len(drafts)])
            finished = seq.accept(token, entry)
        seq.stats.accepted_tokens += kept
        assert isinstance(seq.draft_len, DraftLength)
        seq.draft_len.update(len(drafts), kept)
        cache.rewind_to(base + kept)
        seq.pending = [seq.stats.token_ids[-1]] if seq.stats.token_ids else []
        return finished

    def _fork(self, seq: Sequence) -> tuple[KVCache, np.ndarray] | None:
        """A sibling choice of an admitted sequence with the same prompt (n > 1): its prompt KV copied into a row
        of its own, and the logits of the prompt's last position; None when that cannot be (the sibling has left,
        or the buffers live in device memory, where a row copy is not implemented)."""
        parent = seq.fork_of
        if (parent is None or parent not in self._seqs or parent.first_logits is None or self.slots.ortvalues
                or parent.prompt_ids != seq.prompt_ids):
            return None
        while not self.slots.free and self.prefix.evict_oldest():
            pass
        if not self.slots.free:
            return None
        cache = KVCache(self.slots)
        n = len(seq.prompt_ids)
        self.slots.copy_row(self._cache(parent).slot, cache.slot, n)
        cache.tokens = list(seq.prompt_ids)
        seq.stats.reused_prompt_tokens, seq.stats.shared_prompt = n, True
        return cache, parent.first_logits

    def step(self) -> None:
        """One token for every active sequence: one graph run over rows 0..highest active row (rows in between
        that hold no active sequence compute a throw-away token at their own length, leaving their contents)."""
        if not self._seqs:
            return
        seqs = list(self._seqs)
        by_slot = {self._cache(s).slot: s for s in seqs}
        rows = max(by_slot) + 1
        for s in seqs:
            self._draft(s)
        if rows > 1:  # a drafted row is verified in a forward of its own (several new tokens need batch size 1)
            for s in [s for s in seqs if s.drafts]:
                n = len(s.pending)
                t0 = time.perf_counter()
                out = self.model.graph.forward(s.pending, self._cache(s), logits_to_keep=n)
                self._timed("verify", time.perf_counter() - t0)
                self._count(s, n)
                del by_slot[self._cache(s).slot]
                seqs.remove(s)
                if self._verify(s, out):
                    self._retire(s)
            if not seqs:
                return
            rows = max(by_slot) + 1
        held = self.prefix.held()
        # rows outside this run (kept prefixes, rows verified alone above) take a throw-away token at their own length
        alone = {self._cache(s).slot: len(self._cache(s)) for s in self._seqs if s not in seqs}
        # Tokens a constraint forced (jump-forward) are fed in one forward where the graph can: a lone row takes them
        # all in this step. Several rows take one token each (onnxruntime's GroupQueryAttention takes several new
        # tokens only at batch size 1): a row's forced tokens then ride along one a step without draws, and a run of
        # at least as many forced tokens as rows goes first in a forward of its own, which pays for itself.
        if rows > 1:
            for s in seqs:
                if len(s.pending) - 1 >= len(seqs):
                    self.model.graph.forward(s.pending[:-1], self._cache(s))
                    self._count(s, len(s.pending) - 1)
                    s.pending = s.pending[-1:]
        width = max(len(s.pending) for s in seqs) if rows == 1 else 1
        fed = np.zeros((rows, width), np.int64)
        for r, s in by_slot.items():
            fed[r, :] = s.pending[min(width, len(s.pending)) - 1]  # (fewer tokens: pad with the last, throw-away)
            fed[r, :len(s.pending)] = s.pending[:width]
        lengths = [len(self._cache(by_slot[r])) if r in by_slot else alone.get(r, held.get(r, 0)) for r in range(rows)]
        if max(lengths) + width > self.model.max_context:  # a held row at the context end: keep it out of the write
            lengths = [n if r in by_slot or r in alone else 0 for r, n in enumerate(lengths)]
            for r in range(rows):
                if r not in by_slot and r in held:
                    self.prefix.evict(r)
        drawing = {r for r, s in by_slot.items() if len(s.pending) <= width}  # rows whose fed tokens all go in now
        guided = [(s.guide, r) for r, s in by_slot.items()
                  if r in drawing and s.guide is not None and not s.guide.finished]
        job = MaskJob(self.model.vocab, guided, rows) if guided else None  # (computed while the graph runs)
        t0 = time.perf_counter()
        logits = self.model.graph.run_rows(fed, self.slots, 0, lengths)  # [B, width, V]
        self._timed("plain" if width == 1 else "verify", (time.perf_counter() - t0) / (len(seqs) if width == 1 else 1))
        masks = job.result() if job is not None else None
        for r, seq in sorted(by_slot.items()):
            n = min(len(seq.pending), width)
            self._cache(seq).tokens.extend(seq.pending[:n])
            self._count(seq, n)
            seq.pending = seq.pending[n:]
            if r not in drawing:  # more forced tokens to feed: no draw this step
                continue
            if seq.drafts:
                if self._verify(seq, logits[r, :n]):
                    self._retire(seq)
            elif ARModel.commit(seq, logits[r, n - 1], masks[r] if masks is not None and seq.guide else None):
                self._retire(seq)

    def remove(self, seq: Sequence) -> None:
        """A cancelled or failed sequence leaves; its row is freed."""
        if seq in self._seqs:
            self._seqs.remove(seq)
            self._cache(seq).release()

    @staticmethod
    def _cache(seq: Sequence) -> KVCache:
        assert isinstance(seq.state, KVCache)
        return seq.state

    @staticmethod
    def _count(seq: Sequence, positions: int) -> None:
        seq.stats.forward_passes += 1
        seq.stats.positions_computed += positions

    def _retire(self, seq: Sequence) -> None:
        """A finished sequence leaves; its row (prompt + fed tokens) is kept for prefix reuse."""
        if seq in self._seqs:
            self._seqs.remove(seq)
        cache = self._cache(seq)
        if seq.stats.finish_reason in ("stop", "length"):
            self.prefix.put(cache)
        else:
            cache.release()
