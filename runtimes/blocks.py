"""Block-diffusion dLLMs (BD3-LM / SDAR style) on the AR decoder's KV cache.

Such a model is an AR-family backbone trained so that attention is bidirectional inside a block of ``L`` absolute
positions and causal across blocks; the graph applies that mask (``edgekit.export.onnx_graph``, ``block_length``).
Finished blocks are then never affected by later ones, so their K/V are exact, and decoding is: per block, a few
denoising steps of the block's ``L`` tokens (masked ones as the mask token) against the committed cache, the
existing unmasking rules choosing what to commit each step; once the block is clean, one forward of the clean block
writes its exact K/V, fused with the next block's first step. A rewind to the block start (a length change of the
``KVCache``) is all a step needs. No cache approximation applies: ``cached=False`` recomputes everything each step
and gives the same tokens (the exactness check).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes import model as mdl
from edgekit.runtimes.backend import BackendOptions
from edgekit.runtimes.bundle import Manifest
from edgekit.runtimes.decoder import ARModel
from edgekit.runtimes.denoiser import DenoiseBatch
from edgekit.runtimes.errors import BundleError, ConfigError
from edgekit.runtimes.sequence import Sequence
from edgekit.runtimes.tokenizer import Prompt
from edgekit.runtimes.unmasking import DiffusionParams, select, transfer_schedule


def decode_blocks(model: ARModel, prompt_ids: Seq[int], params: DiffusionParams, block: int, mask_id: int,
                  stats: mdl.Stats, rng: np.random.Generator, cached: bool = True,
                  should_stop: Callable[[], bool] = lambda: False,
                  on_step: Callable[[np.ndarray], None] | None = None) -> Iterator[list[int]]:
    """Yield the generated ids of each block in turn (``params.gen_length`` in all; blocks are aligned to absolute
    positions, so the first one also holds the prompt's tail). ``cached=False`` recomputes the whole sequence every
    step instead of running the block on the committed cache."""
    p0 = len(prompt_ids)
    start = (p0 // block) * block  # the first block to decode begins here
    n_blocks = -(-(p0 - start + params.gen_length) // block)
    steps = max(1, params.diffusion_steps // max(1, params.gen_length // block))
    x = list(prompt_ids) + [mask_id] * (start + n_blocks * block - p0)
    cache = model.new_cache()
    try:
        if cached and start:
            model.forward(x[:start], cache)
            stats.positions_computed += start
            stats.forward_passes += 1
        pending: np.ndarray | None = None  # the next block's first-step logits, from the fused commit forward
        produced = 0
        for b in range(n_blocks):
            lo, hi = start + b * block, start + (b + 1) * block
            schedule = transfer_schedule(sum(t == mask_id for t in x[lo:hi]), steps)
            step = 0
            while True:
                masked = [i for i in range(block) if x[lo + i] == mask_id and lo + i >= p0]
                if not masked:
                    break
                if should_stop():
                    return
                if pending is not None:
                    logits, pending = pending, None
                else:
                    logits = _block_logits(model, x, lo, hi, block, cache, cached, stats)
                if on_step is not None:
                    on_step(logits)
                k = schedule[step] if step < len(schedule) else len(masked)
                x0, chosen = select(logits[masked], max(k, 1), params, rng)
                for j in chosen:
                    x[lo + masked[j]] = int(x0[j])
                step += 1
            take = x[max(lo, p0):hi][: params.gen_length - produced]
            produced += len(take)
            if cached and b + 1 < n_blocks:  # commit the clean block, fused with the next block's first step
                cache.rewind_to(lo)
                pending = model.forward(x[lo:hi + block], cache, logits_to_keep=block)
                stats.positions_computed += 2 * block
                stats.forward_passes += 1
            yield take
            if produced >= params.gen_length:
                return
    finally:
        cache.release()


def _block_logits(model: ARModel, x: list[int], lo: int, hi: int, block: int, cache: Any, cached: bool,
                  stats: mdl.Stats) -> np.ndarray:
    """Logits [block, V] of positions lo..hi-1: the block on the committed cache, or everything from scratch."""
    stats.forward_passes += 1
    if cached:
        cache.rewind_to(lo)  # a step rewrites the block's rows: a length change, not a copy
        stats.positions_computed += hi - lo
        return model.forward(x[lo:hi], cache, logits_to_keep=block)
    fresh = model.new_cache()
    try:
        stats.positions_computed += hi
        return model.forward(x[:hi], fresh, logits_to_keep=block)
    finally:
        fresh.release()


class BlockDiffusionModel(ARModel):
    """A block-diffusion bundle: the AR decoder's graph and KV cache, decoded a block at a time. ``stream`` yields
    each committed block's text. Options: gen_length (or max_new_tokens), diffusion_steps, remasking, threshold,
    entropy_bound, temperature, top_k, top_p, seed; block_length must be the trained one."""

    kind = "block_diffusion"
    option_names = (frozenset(DiffusionParams.__dataclass_fields__) - {"cache"}) | {"max_new_tokens"}
    parity_prompts = 3

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions) -> None:
        super().__init__(bundle_dir, manifest, backend)
        self.block = int((manifest.extra.get("attention") or {}).get("block_length") or 0)
        if self.block < 1 or manifest.tokens.mask_id is None:
            raise BundleError(f"Block-diffusion bundle '{bundle_dir}' lacks its block length or mask token id. "
                              "HINT: re-export it.")
        self.mask_id = int(manifest.tokens.mask_id)
        known = DiffusionParams.__dataclass_fields__
        steps = {k: v for k, v in manifest.generation.items() if k in known and k != "cache"}
        self.diffusion_defaults = DiffusionParams(**{"block_length": self.block, "gen_length": 4 * self.block,
                                                     "diffusion_steps": 4 * self.block, **steps})

    @property
    def parity_settings(self) -> tuple[mdl.ParitySetting, ...]:
        base = {"gen_length": 4 * self.block, "diffusion_steps": 4 * self.block}
        return (mdl.ParitySetting("low_confidence", {**base, "remasking": "low_confidence"}),
                mdl.ParitySetting("threshold_0.9", {**base, "threshold": 0.9}),
                mdl.ParitySetting("entropy_bound_0.5", {**base, "entropy_bound": 0.5}))

    def params(self, prompt_len: int, **options: Any) -> DiffusionParams:  # type: ignore[override]
        mdl.refuse_unknown(self, options)
        given = {k: v for k, v in options.items() if v is not None}
        alias = given.pop("max_new_tokens", None)
        if alias is not None:
            given.setdefault("gen_length", alias)
        if given.get("block_length", self.block) != self.block:
            raise ConfigError(f"block_length {given['block_length']!r} does not match this block-diffusion bundle's "
                              f"trained block of {self.block} (its attention mask is built for it). HINT: drop "
                              "block_length.")
        given["block_length"] = self.block
        gen = given.get("gen_length", self.diffusion_defaults.gen_length)
        if isinstance(gen, int) and gen > 0:  # whole blocks; one token per step unless told otherwise
            given["gen_length"] = gen = -(-gen // self.block) * self.block
            given.setdefault("diffusion_steps", gen)
        p = replace(self.diffusion_defaults, **given)
        mdl.check_fits(self, prompt_len + self.block, "gen_length", p.gen_length)
        return p

    def new_sequence(self, prompt_ids: Seq[int], params: DiffusionParams) -> Sequence:  # type: ignore[override]
        return Sequence(prompt_ids, params, self.tokenizer, self.stop_ids, params.gen_length, params.seed)

    def new_batch(self, max_batch: int = 1, prefix_cache_entries: int = 0) -> DenoiseBatch:  # type: ignore
        return DenoiseBatch(self, max_batch)  # type: ignore[arg-type]

    def blocks(self, seq: Sequence, net: Any = None, on_step: Callable[[np.ndarray], None] | None = None,
               cached: bool = True) -> Iterator[list[int]]:
        assert isinstance(seq.params, DiffusionParams)
        return decode_blocks(self, seq.prompt_ids, seq.params, self.block, self.mask_id, seq.stats, seq.rng,
                             cached, seq.should_stop, on_step)

    def stream(self, prompt: Prompt, batch: Any = None, **options: Any) -> mdl.TextStream:
        return mdl.stream(self, prompt, batch, options)

    def trace(self, prompt_ids: Seq[int], options: Mapping[str, Any], reference: Any = None,
              new_tokens: int = 64, cached: bool = True) -> mdl.Trace:
        """Every step's block logits and the ids generated before a stop token (this bundle's graph)."""
        seq = self.new_sequence(prompt_ids, self.params(len(prompt_ids), **options))
        steps: list[np.ndarray] = []
        for block in self.blocks(seq, on_step=steps.append, cached=cached):
            if seq.accept_block(block):
                break
        return mdl.Trace(steps, list(seq.stats.token_ids))
