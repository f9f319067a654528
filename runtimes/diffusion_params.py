"""The settings of one dLLM generation: one record (``DiffusionParams``), its defaults from the bundle, one ``resolve``.

Both diffusion kinds take these settings, the full-bidirectional denoiser (``denoiser``) and the block-diffusion loop
(``blocks``); what differs between them is data: a block model's graph was trained on certain block lengths
(``block_lengths``) and rounds the answer up to whole blocks, a full model has cache modes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.sampling import check_draw, is_integer, is_number
from edgekit.runtimes.unmasking import CACHE_MODES, POSITION_DECAY_MAX, Remasking


@dataclass(frozen=True)
class DiffusionParams:
    gen_length: int = 64
    block_length: int = 32
    diffusion_steps: int = 64
    remasking: str = Remasking.LOW_CONFIDENCE.value
    threshold: float | None = None  # commit every masked position above this confidence (0, 1]; None: fixed k
    entropy_bound: float | None = None  # EB-sampler: commit the largest prefix whose entropy sum - max <= this
    temperature: float = 0.0  # Gumbel-max sampling of the predicted tokens; 0: argmax
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    cache: str = "none"
    position_decay: float = 0.0  # rank scores x exp(-decay * offset in the block): earlier positions first

    def __post_init__(self) -> None:
        for name in ("gen_length", "block_length", "diffusion_steps"):
            if not is_integer(getattr(self, name), 1, 1 << 30):
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        gen, block, steps = self.gen_length, self.block_length, self.diffusion_steps
        if block > gen or gen % block:
            raise ConfigError(f"block_length must divide gen_length: {block} does not divide {gen}. "
                              f"HINT: use a block_length among {[d for d in range(1, gen + 1) if gen % d == 0][-6:]}.")
        blocks = gen // block
        if steps > gen:
            raise ConfigError(f"diffusion_steps must be between 1 and gen_length ({gen}), got {steps}.")
        if steps % blocks:
            raise ConfigError(f"diffusion_steps ({steps}) must be a multiple of the number of blocks "
                              f"({gen} / {block} = {blocks}) so every block gets the same number of steps.")
        if self.remasking not in {r.value for r in Remasking}:
            raise ConfigError(f"remasking must be one of {', '.join(r.value for r in Remasking)}, "
                              f"got {self.remasking!r}.")
        if self.threshold is not None and not (is_number(self.threshold) and 0 < self.threshold <= 1):
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold!r}.")
        if self.entropy_bound is not None:
            if not is_number(self.entropy_bound) or not 0 <= self.entropy_bound <= 100:
                raise ConfigError(f"entropy_bound must be a number in [0, 100] (nats), got {self.entropy_bound!r}.")
            if self.threshold is not None:
                raise ConfigError("threshold and entropy_bound are two parallel-decoding rules; set only one "
                                  f"(got threshold={self.threshold!r}, entropy_bound={self.entropy_bound!r}).")
        check_draw(self)
        if not is_number(self.position_decay) or not 0 <= self.position_decay <= POSITION_DECAY_MAX:
            raise ConfigError(f"position_decay must be a number in [0, {POSITION_DECAY_MAX:g}], got "
                              f"{self.position_decay!r}.")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}.")

    @property
    def steps_per_block(self) -> int:
        return self.diffusion_steps // (self.gen_length // self.block_length)


FIELDS = frozenset(f.name for f in fields(DiffusionParams))


def defaults(generation: Mapping[str, Any], block_length: int | None = None) -> DiffusionParams:
    """The bundle's default settings (its manifest's ``generation``, fields of this record only). ``block_length``: a
    block model's default block, four blocks long and one token per step unless the bundle says otherwise."""
    known = {k: v for k, v in generation.items() if k in FIELDS and not (block_length and k == "cache")}
    if block_length:
        known = {"gen_length": 4 * block_length, "diffusion_steps": 4 * block_length, **known,
                 "block_length": block_length}
    return DiffusionParams(**known)


def resolve(base: DiffusionParams, options: Mapping[str, Any],
            block_lengths: tuple[int, ...] | None = None) -> DiffusionParams:
    """``base`` with the given ``options`` (``None`` values ignored; ``max_new_tokens`` is an alias of
    ``gen_length``), kept consistent with a new length: one token per step unless told otherwise, and a block that
    divides the answer. ``block_lengths``: the lengths a block model was trained on; its block must be one of them and
    its answer is rounded up to whole blocks."""
    given = {k: v for k, v in options.items() if v is not None}
    alias = given.pop("max_new_tokens", None)
    if alias is not None:
        given.setdefault("gen_length", alias)
    if block_lengths is not None:
        block = given.setdefault("block_length", base.block_length)
        if block not in block_lengths:
            raise ConfigError(f"block_length {block!r} does not match this block-diffusion bundle's trained block "
                              f"length(s) {', '.join(map(str, block_lengths))} (its attention mask follows "
                              f"them). HINT: drop block_length (default {base.block_length}) or use one of those.")
        given.setdefault("gen_length", base.gen_length)
    gen = given.get("gen_length")
    if is_integer(gen, 1, 1 << 30):
        if block_lengths is not None:  # whole blocks
            given["gen_length"] = gen = -(-gen // given["block_length"]) * given["block_length"]
        elif "block_length" not in given:
            given["block_length"] = base.block_length if gen % base.block_length == 0 else gen
        given.setdefault("diffusion_steps", gen)
    return replace(base, **given)
