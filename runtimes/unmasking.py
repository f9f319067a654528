"""dLLM unmasking rules: which masked positions a denoising step commits, and the settings that drive them.

Remasking rules are a named enum (LLaDA's low-confidence and random orders, margin, entropy); with a ``threshold``
every position whose predicted token is that confident is committed at once (Fast-dLLM's parallel decoding, at least
one per step); with an ``entropy_bound`` the longest prefix of the ranking whose summed entropy minus its largest
entropy stays within the bound is committed (the EB-sampler's rule). ``position_decay`` (PC-Sampler's positional
prior) scales each position's ranking score by exp(-decay x its offset in the block), so that, between similarly
confident positions, the earlier goes first: the order an AR-adapted block model (which knows its left-to-right
dependencies best) decodes correctly in. Pure numpy functions, unit-tested on hand-worked cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.sampling import TEMPERATURE_MAX


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
        def whole(name: str, lo: int) -> int:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}.")
            return v

        gen, block, steps = whole("gen_length", 1), whole("block_length", 1), whole("diffusion_steps", 1)
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
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold!r}.")
        if self.entropy_bound is not None:
            if not isinstance(self.entropy_bound, (int, float)) or isinstance(self.entropy_bound, bool) \
                    or not 0 <= self.entropy_bound <= 100:
                raise ConfigError(f"entropy_bound must be a number in [0, 100] (nats), got {self.entropy_bound!r}.")
            if self.threshold is not None:
                raise ConfigError("threshold and entropy_bound are two parallel-decoding rules; set only one "
                                  f"(got threshold={self.threshold!r}, entropy_bound={self.entropy_bound!r}).")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= TEMPERATURE_MAX:
            raise ConfigError(f"temperature must be between 0 and {TEMPERATURE_MAX:g}, got {self.temperature!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.position_decay, (int, float)) or isinstance(self.position_decay, bool) \
                or not 0 <= self.position_decay <= POSITION_DECAY_MAX:
            raise ConfigError(f"position_decay must be a number in [0, {POSITION_DECAY_MAX:g}], got "
                              f"{self.position_decay!r}.")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}.")

    @property
    def steps_per_block(self) -> int:
        return self.diffusion_steps // (self.gen_length // self.block_length)


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many positions each step commits: ``masked`` spread as evenly as possible, the remainder first."""
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Top-k / top-p filtering per position of logits [N, V] (filtered entries become -inf)."""
    out = logits.astype(np.float64)
    if top_k and top_k < out.shape[-1]:
        kth = np.partition(out, -top_k, axis=-1)[:, -top_k][:, None]
        out = np.where(out < kth, -np.inf, out)
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1)
        sorted_p = np.take_along_axis(_softmax(out), order, -1)
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= top_p  # keep until the mass reaches top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        out = np.where(drop, -np.inf, out)
    return out


def select(logits: np.ndarray, k: int, params: DiffusionParams, rng: np.random.Generator,
           offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One denoising decision for N masked positions (logits [N, V]; ``offsets``: their offsets in the block, for
    ``position_decay``): the predicted token of each, and the indices (into those N) to commit now."""
    filtered = _filter(logits, params.top_k, params.top_p)
    if params.temperature > 0:  # Gumbel-max: a sample from softmax(logits / T) per position
        gumbel = -np.log(-np.log(rng.random(filtered.shape)))
        x0 = np.argmax(filtered / params.temperature + gumbel, axis=-1)
    else:
        x0 = np.argmax(filtered, axis=-1)
    p = _softmax(logits.astype(np.float64))
    p_x0 = p[np.arange(len(x0)), x0]
    rule = Remasking(params.remasking)
    if rule is Remasking.LOW_CONFIDENCE:
        conf = p_x0
    elif rule is Remasking.RANDOM:
        conf = rng.random(len(x0))
    elif rule is Remasking.MARGIN:
        top2 = np.sort(p, axis=-1)[:, -2:]
        conf = top2[:, 1] - top2[:, 0]
    else:
        conf = np.sum(p * np.log(p + 1e-30), axis=-1)  # -entropy
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
