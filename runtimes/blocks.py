"""Block-diffusion dLLMs (BD3-LM / SDAR style) on the AR decoder's KV cache.

Such a model is an AR-family backbone trained so that attention is bidirectional inside a block of ``L`` absolute
positions and causal across blocks; the graph applies that mask (``edgekit.export.onnx_graph``, ``block_length``).
Finished blocks are then never affected by later ones, so their K/V are exact, and decoding is: per block, a few
denoising steps of the block's ``L`` tokens (masked ones as the mask token) against the committed cache, the
existing unmasking rules choosing what to commit each step; once the block is clean, one forward of the clean block
writes its exact K/V, fused with the next block's first step. A rewind to the block start (a length change of the
``KVCache``) is all a step needs. No cache approximation applies: ``cached=False`` recomputes everything each step
and gives the same tokens (the exactness check).

Families that keep the AR token shift (Fast-dLLM v2; config ``block_diffusion_token_shift``) predict token ``i`` at
position ``i - 1``: a block's first token comes from the previous block's last position, which the commit forward
computes once the previous block is clean (exact, so it is kept for the block's later steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes import diffusion_params as dp
from edgekit.runtimes import model as mdl
from edgekit.runtimes.backend import BackendOptions
from edgekit.runtimes.bundle import Manifest
from edgekit.runtimes.errors import BundleError
from edgekit.runtimes.graph import GraphRunner
from edgekit.runtimes.kv_cache import KVCache
from edgekit.runtimes.sequence import Sequence
from edgekit.runtimes.tokenizer import Prompt
from edgekit.runtimes.unmasking import commit, schedule


@dataclass
class _State:
    """One sequence's place in a ``BlockBatch``: its row, its block length, the ids so far (prompt, committed
    blocks, the current block with mask tokens), the current block's start and step schedule, and whether the
    previous block's exact K/V are still to be written (fused with this block's next step)."""

    seq: Sequence
    cache: KVCache
    block: int
    x: list[int]
    lo: int
    schedule: list[int]
    step: int = 0
    commit: bool = False
    on_step: Callable[[np.ndarray], None] | None = None
    first: np.ndarray | None = None  # token-shift models: the logits of position lo - 1 (predicting x[lo])

    @property
    def params(self) -> dp.DiffusionParams:
        assert isinstance(self.seq.params, dp.DiffusionParams)
        return self.seq.params

    def feeds(self) -> dict[str, np.ndarray]:
        return block_feed(self.block)

    @property
    def begin(self) -> int:
        """Where this step's tokens start: the previous block's start when it is committed with this step."""
        return self.lo - self.block if self.commit else self.lo


def block_feed(block: int) -> dict[str, np.ndarray]:
    """The graph's ``block_length`` input for a run."""
    return {"block_length": np.asarray([block], np.int64)}


class BlockBatch:
    """Block-diffusion sequences decoding together on one ``BlockDiffusionModel``: each holds a row of one KV buffer;
    a step runs every sequence's current block in one graph run per block length (a row that also commits its
    previous block runs 2L tokens; ``_logits`` says how the others share that run), then applies each sequence's
    unmasking rule. Blocks are aligned
    to absolute positions, so a sequence's first block also holds the prompt's tail. ``cached=False`` recomputes each
    sequence from scratch every step instead (one at a time; the exactness reference); ``reference`` (a provider of
    ``blocks(tokens, block) -> logits``, e.g. PyTorch for parity) recomputes on it."""

    def __init__(self, model: BlockDiffusionModel, capacity: int = 1, cached: bool = True,
                 reference: Any = None) -> None:
        self.model, self.capacity, self.reference = model, capacity, reference
        self.cached = cached and reference is None
        self.slots = model.graph.new_slots(capacity)
        self._states: list[_State] = []

    @property
    def active(self) -> list[Sequence]:
        return [st.seq for st in self._states]

    def admit(self, seq: Sequence, on_step: Callable[[np.ndarray], None] | None = None) -> None:
        """Prefill the prompt's whole blocks; the first block to decode starts at the last block boundary."""
        assert isinstance(seq.params, dp.DiffusionParams)
        m, L = self.model, seq.params.block_length
        p0 = len(seq.prompt_ids)
        start = (p0 // L) * L
        cache = KVCache(self.slots)
        st = _State(seq, cache, L, list(seq.prompt_ids) + [m.mask_id] * (start + L - p0), start, [],
                    on_step=on_step)
        try:
            if self.cached and start:
                st.first = m.graph.forward(st.x[:start], cache, feeds=st.feeds())[-1]
                seq.stats.forward_passes += 1
                seq.stats.positions_computed += start
        except BaseException:
            cache.release()
            raise
        st.schedule = self._schedule(st)
        self._states.append(st)

    def _schedule(self, st: _State) -> list[int]:
        end = len(st.seq.prompt_ids) + st.params.gen_length
        return schedule(sum(t == self.model.mask_id for t in st.x[st.lo:end]), st.params)

    def step(self) -> None:
        """One denoising step of every active sequence's current block."""
        for st in [st for st in self._states if st.seq.should_stop()]:
            st.seq.finish("cancelled" if st.seq.cancelled else "timeout")
            self.remove(st.seq)
        if not self._states:
            return
        logits = self._logits() if self.cached else {id(st): self._recomputed(st) for st in self._states}
        for st in list(self._states):
            self._advance(st, logits[id(st)])

    def _logits(self) -> dict[int, np.ndarray]:
        """The current block's logits [L, V] of every sequence: one graph run per block length. Rows that also
        commit their previous block run 2L tokens; the others run their block then L throw-away mask tokens (a later
        block, which the block cannot attend to; its K/V land past the row's length), so that both share the run
        (unless that padding would pass the context, then they run apart)."""
        out: dict[int, np.ndarray] = {}
        by_slot = {st.cache.slot: st for st in self._states}
        m = self.model
        groups: dict[tuple[int, bool], list[_State]] = {}
        for st in self._states:
            groups.setdefault((st.block, st.commit), []).append(st)
        for L in sorted({st.block for st in self._states}):
            fused, alone = groups.get((L, True), []), groups.get((L, False), [])
            if fused and alone and all(st.lo + 2 * L <= m.max_context for st in alone):
                runs = [fused + alone]
            else:
                runs = [g for g in (fused, alone) if g]
            for run in runs:
                out.update(self._run_group(L, run, by_slot))
        return out

    def _run_group(self, L: int, group: list[_State], by_slot: dict[int, _State]) -> dict[int, np.ndarray]:
        """One graph run over the rows of ``group`` (block length ``L``); each one's block logits [L, V]."""
        m = self.model
        rows_of = {st.cache.slot: st for st in group}
        lo, hi = min(rows_of), max(rows_of) + 1
        commits = {st.commit for st in group}
        width = 2 * L if True in commits else L
        keep = width if len(commits) == 2 else L + int(m.token_shift and True in commits)
        rows, lengths = np.full((hi - lo, width), m.mask_id, np.int64), []
        for r in range(lo, hi):
            st = rows_of.get(r)
            if st is None:  # another sequence's row, or a free one: throw-away tokens after what it holds
                other = by_slot.get(r)
                lengths.append(len(other.cache) if other is not None else 0)
                continue
            tokens = st.x[st.begin:st.lo + L]
            rows[r - lo, :len(tokens)] = tokens
            st.cache.rewind_to(st.begin)  # a step rewrites the block's rows: a length change, not a copy
            lengths.append(st.begin)
        result = m.graph.run_rows(rows, self.slots, lo, lengths, keep=keep, feeds=block_feed(L))
        out: dict[int, np.ndarray] = {}
        for r, st in rows_of.items():
            st.cache.tokens.extend(st.x[st.begin:st.lo + L])
            st.seq.stats.forward_passes += 1
            st.seq.stats.positions_computed += width
            shift = int(m.token_shift and st.commit)  # a commit also yields the previous block's last logit
            j = st.lo - shift - st.begin - (width - keep)  # where position lo - shift sits among the kept logits
            got = result[r - lo, j:j + L + shift]
            if shift:  # positions lo-1..lo+L-1: the first is the previous (now clean) block's last
                st.first, got = got[0], got[:L]
            elif m.token_shift:  # positions lo..lo+L-1
                got = self._after_first(st, got)
            st.commit = False
            out[id(st)] = got
        return out

    @staticmethod
    def _after_first(st: _State, logits: np.ndarray) -> np.ndarray:
        """Token shift: the block's logits (row i predicting token lo + i) from those of positions lo..lo+L-1 and the
        kept logits of position lo - 1 (none when lo == 0: position 0 is a prompt token, never predicted)."""
        first = st.first if st.first is not None else np.zeros_like(logits[0])
        return np.concatenate([first[None], logits[:-1]])

    def _recomputed(self, st: _State) -> np.ndarray:
        L, end = st.block, st.lo + st.block
        shift = int(self.model.token_shift and st.lo > 0)  # also position lo - 1 (the last of the previous block)
        st.seq.stats.forward_passes += 1
        if self.reference is not None:
            got = np.asarray(self.reference.blocks(st.x[:end], L))[-L - shift:]
        else:
            fresh = self.model.graph.new_cache()
            try:
                st.seq.stats.positions_computed += end
                got = self.model.graph.forward(st.x[:end], fresh, logits_to_keep=L + shift, feeds=st.feeds())
            finally:
                fresh.release()
        if not self.model.token_shift:
            return got
        st.first = got[0] if shift else None
        return self._after_first(st, got[shift:])

    def _advance(self, st: _State, logits: np.ndarray) -> None:
        """Commit this step's choices in the block; when it is clean, hand its tokens to the sequence and open the
        next block."""
        m, L, p0 = self.model, st.block, len(st.seq.prompt_ids)
        end = p0 + st.params.gen_length  # positions past the answer's length stay masks (never decoded)
        if st.on_step is not None:
            st.on_step(logits)
        masked = np.asarray([i for i in range(L) if st.x[st.lo + i] == m.mask_id and p0 <= st.lo + i < end],
                            np.int64)
        clean = commit(st.x, st.lo, logits, masked, st.schedule, st.step, st.params, st.seq.rng)
        st.step += 1
        if not clean:  # the block still has masked positions
            return
        take = st.x[max(st.lo, p0):min(st.lo + L, end)]
        if st.seq.accept_block(take) or st.lo + L >= end:
            if not st.seq.done:
                st.seq.finish("length")
            self.remove(st.seq)
            return
        st.lo += L
        st.x += [m.mask_id] * L
        st.schedule, st.step, st.commit = self._schedule(st), 0, self.cached

    def remove(self, seq: Sequence) -> None:
        for st in [st for st in self._states if st.seq is seq]:
            self._states.remove(st)
            st.cache.release()


class BlockDiffusionModel(mdl.Bundled):
    """A block-diffusion bundle: an AR-family decoder graph under block attention (its ``graph`` runner, fed the run's
    block length) decoded a block at a time on the KV cache. ``stream`` yields each committed block's text. Options:
    gen_length (or max_new_tokens), diffusion_steps, remasking, threshold, entropy_bound, position_decay,
    temperature, top_k, top_p, seed; block_length must be one of the trained ones."""

    kind = "block_diffusion"
    objective = "next_token"  # teacher-forced with in-block lookahead: comparable between bundles of one model
    option_names = (dp.FIELDS - {"cache"}) | {"max_new_tokens"}
    parity_prompts = 3

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions) -> None:
        blocks = manifest.block_attention
        if blocks is None or manifest.tokens.mask_id is None:
            raise BundleError(f"Block-diffusion bundle '{bundle_dir}' lacks its block attention record or mask token "
                              "id. HINT: re-export it.")
        super().__init__(bundle_dir, manifest)
        self.block, self.trained_blocks, self.token_shift = blocks.block_length, blocks.block_lengths, \
            blocks.token_shift  # token_shift: token i predicted at position i - 1
        self.graph = GraphRunner(bundle_dir, manifest, backend, defaults=block_feed(self.block))
        self.mask_id = int(manifest.tokens.mask_id)
        self.defaults = dp.defaults(manifest.generation, block_length=self.block)

    def logits(self, token_ids: Seq[int]) -> np.ndarray:
        """Teacher-forced logits [S, V] under block attention of the default block length (quality reports)."""
        return self.graph.logits(token_ids)

    @property
    def parity_settings(self) -> tuple[mdl.ParitySetting, ...]:
        base = {"gen_length": 4 * self.block, "diffusion_steps": 4 * self.block}
        return (mdl.ParitySetting("low_confidence", {**base, "remasking": "low_confidence"}),
                mdl.ParitySetting("threshold_0.9", {**base, "threshold": 0.9}),
                mdl.ParitySetting("entropy_bound_0.5", {**base, "entropy_bound": 0.5}))

    def params(self, prompt_len: int, **options: Any) -> dp.DiffusionParams:
        mdl.refuse_unknown(self, options)
        p = dp.resolve(self.defaults, options, block_lengths=self.trained_blocks)
        mdl.check_fits(self, prompt_len + p.block_length, "gen_length", p.gen_length)
        return p

    def new_sequence(self, prompt_ids: Seq[int], params: dp.DiffusionParams) -> Sequence:
        return Sequence(prompt_ids, params, self.tokenizer, self.stop_ids, params.gen_length, params.seed)

    def new_batch(self, max_batch: int = 1, prefix_cache_entries: int = 0) -> BlockBatch:
        return BlockBatch(self, max_batch)

    def stream(self, prompt: Prompt, batch: BlockBatch | None = None, **options: Any) -> mdl.TextStream:
        return mdl.stream(self, prompt, batch, options)

    def trace(self, prompt_ids: Seq[int], options: Mapping[str, Any], reference: Any = None,
              new_tokens: int = 64, cached: bool = True) -> mdl.Trace:
        """Every step's block logits and the ids generated before a stop token, on this bundle's graph (cached, or
        recomputed each step) or on ``reference`` (``blocks(tokens, block) -> logits``, e.g. PyTorch)."""
        seq = self.new_sequence(prompt_ids, self.params(len(prompt_ids), **options))
        steps: list[np.ndarray] = []
        batch = BlockBatch(self, 1, cached, reference)
        batch.admit(seq, on_step=steps.append)
        while batch.active:
            batch.step()
        return mdl.Trace(steps, list(seq.stats.token_ids))
