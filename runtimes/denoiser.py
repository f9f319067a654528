"""The reduced-step denoiser for masked-diffusion LMs (dLLMs): semi-autoregressive blocks, parallel unmasking.

Generation starts from the prompt followed by ``gen_length`` mask tokens. Blocks of ``block_length`` are filled left
to right (LLaDA's semi-AR schedule); each step runs the denoiser on the whole sequence and commits some masked
positions of the current block, chosen by a remasking rule; with a ``threshold`` every position whose predicted
token is that confident is committed at once (Fast-dLLM's parallel decoding, at least one per step); with an
``entropy_bound`` the longest prefix of the ranking whose summed entropy minus its largest entropy stays within the
bound is committed (the EB-sampler's rule). A block's text
is streamed as soon as the block is complete.

Cache modes (Fast-dLLM's approximate KV cache): ``none`` runs the whole sequence every step; ``prefix`` encodes the
whole sequence at a block's first step, keeps the keys/values of the prompt and finished blocks, and then runs only
the current block and the masked suffix; ``dual`` keeps the suffix's keys/values too and runs only the block. The
cached entries go stale while the block changes (the approximation Fast-dLLM makes); they are refreshed per block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes.backend import BackendOptions, create_session
from edgekit.runtimes.bundle import Manifest
from edgekit.runtimes.decoder import TextStream
from edgekit.runtimes.errors import BundleError, ConfigError, ContextLengthError
from edgekit.runtimes.tokenizer import Prompt, StreamingDetokenizer, Tokenizer


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
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be between 0 and 100, got {self.temperature!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}.")

    @property
    def steps_per_block(self) -> int:
        return self.diffusion_steps // (self.gen_length // self.block_length)


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many positions each step commits: ``masked`` spread as evenly as possible, the remainder first."""
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@dataclass
class DenoiseStats:
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # kept for the serving stats interface (no cross-request cache for diffusion)
    generated_tokens: int = 0
    forward_passes: int = 0
    positions_computed: int = 0  # query rows run through the network, summed over forward passes (the work done)
    blocks: int = 0
    latency_s: float = 0.0
    first_block_s: float = 0.0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forward_passes if self.forward_passes else 0.0


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


def select(logits: np.ndarray, k: int, params: DiffusionParams,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One denoising decision for N masked positions (logits [N, V]): the predicted token of each, and the
    indices (into those N) to commit now."""
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


class DiffusionModel:
    """A loaded diffusion bundle; ``stream`` yields each block's text once the block is committed."""

    kind = "diffusion"

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions) -> None:
        if "denoiser" not in manifest.graphs or manifest.tokens.mask_id is None:
            raise BundleError(f"Diffusion bundle '{bundle_dir}' lacks a denoiser graph or a mask token id.")
        self.path = bundle_dir
        self.manifest = manifest
        self.session = create_session(bundle_dir / manifest.graphs["denoiser"].file, backend)
        self._backend = backend
        self._cached: tuple[Any, Any] | None = None  # (encode, block) sessions, created on first use
        info = manifest.extra.get("diffusion", {})
        self.cache_modes = tuple(info.get("cache_modes", ["none"]))
        self.position_offset = int(info.get("cache", {}).get("position_offset", 0))
        # prompt-isolated models (prompt positions do not attend to the answer) take the prompt length as input
        self.isolated = info.get("attention") == "prompt_isolated"
        self.tokenizer = Tokenizer(bundle_dir / manifest.tokenizer.file, manifest.tokenizer)
        self.mask_id = int(manifest.tokens.mask_id)
        self.stop_ids = frozenset(manifest.tokens.stop_ids)
        defaults = dict(manifest.extra.get("diffusion", {}).get("defaults", {}))
        known = DiffusionParams.__dataclass_fields__
        self.defaults = DiffusionParams(**{k: v for k, v in defaults.items() if k in known})

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    def forward(self, tokens: np.ndarray, prompt_len: int | None = None) -> np.ndarray:
        """tokens [S] -> logits [S, V] for the whole sequence (no cache). ``prompt_len``: required by
        prompt-isolated bundles."""
        ids = tokens[None, :].astype(np.int64)  # [1, S]
        if self.isolated:
            return self.session.run(["logits"], {"input_ids": ids, "prompt_length": self._prompt(prompt_len)})[0][0]
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]

    def _prompt(self, prompt_len: int | None) -> np.ndarray:
        if prompt_len is None:
            raise ConfigError("This bundle's attention is prompt-isolated: pass prompt_len (the prompt's token count).")
        return np.asarray([prompt_len], dtype=np.int64)

    def _cache_sessions(self) -> tuple[Any, Any]:
        if self._cached is None:
            g = self.manifest.graphs
            same = g["denoise_encode"].file == g["denoiser"].file  # prompt-isolated: one graph for both
            self._cached = (self.session if same else create_session(self.path / g["denoise_encode"].file,
                                                                     self._backend),
                            create_session(self.path / g["denoise_block"].file, self._backend))
            self._past_names = [i.name for i in self._cached[1].get_inputs()][3:]
        return self._cached

    def encode(self, tokens: np.ndarray, prompt_len: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens [S] -> (logits [S, V], every layer's key and value [1, H, S, D]) for the cached modes."""
        enc, _ = self._cache_sessions()
        feeds = {"input_ids": tokens[None, :].astype(np.int64)}
        if self.isolated:
            feeds["prompt_length"] = self._prompt(prompt_len)
        out = enc.run(None, feeds)
        return out[0][0], out[1:]

    def forward_cached(self, tokens: np.ndarray, positions: np.ndarray, past_positions: np.ndarray,
                       past: Sequence[np.ndarray]) -> np.ndarray:
        """tokens [T] at ``positions`` attending to themselves and to cached keys/values -> logits [T, V]."""
        _, blk = self._cache_sessions()
        feeds = {"input_ids": tokens[None, :].astype(np.int64),
                 "position_ids": (positions[None, :] + self.position_offset).astype(np.int64),
                 "past_positions": (past_positions + self.position_offset).astype(np.int64)}
        feeds.update(zip(self._past_names, past))
        return blk.run(["logits"], feeds)[0][0]

    def params(self, prompt_len: int, **overrides: Any) -> DiffusionParams:
        known = set(DiffusionParams.__dataclass_fields__)
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"Unknown option(s) for a diffusion bundle: {', '.join(sorted(unknown))}. "
                              f"Known: {', '.join(sorted(known))}.")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "gen_length" in given and isinstance(given["gen_length"], int) and given["gen_length"] > 0:
            gen = given["gen_length"]  # keep the defaults consistent with a new length: one token per step
            if "block_length" not in given:
                given["block_length"] = self.defaults.block_length if gen % self.defaults.block_length == 0 else gen
            given.setdefault("diffusion_steps", gen)
        p = replace(self.defaults, **given)
        if p.cache not in self.cache_modes:
            raise ConfigError(f"cache mode {p.cache!r} is not in this bundle (it has: {', '.join(self.cache_modes)}). "
                              "HINT: re-export it with this edgekit version, or use cache='none'.")
        if prompt_len + p.gen_length > self.max_context:
            raise ContextLengthError(
                f"Prompt of {prompt_len} tokens + gen_length {p.gen_length} = {prompt_len + p.gen_length} exceeds the "
                f"bundle's max context of {self.max_context} tokens. HINT: set gen_length <= "
                f"{self.max_context - prompt_len}.")
        return p

    def generate_blocks(self, prompt_ids: Sequence[int], params: DiffusionParams, stats: DenoiseStats,
                        on_step: Callable[[int, np.ndarray], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> Iterator[list[int]]:
        """Yield each block's committed token ids (up to and excluding a stop token, which ends generation)."""
        start = time.perf_counter()
        rng = np.random.default_rng(params.seed)
        p0 = len(prompt_ids)
        x = np.array(list(prompt_ids) + [self.mask_id] * params.gen_length, dtype=np.int64)
        stats.prompt_tokens = p0
        for b in range(params.gen_length // params.block_length):
            lo, hi = p0 + b * params.block_length, p0 + (b + 1) * params.block_length
            schedule = transfer_schedule(params.block_length, params.steps_per_block)
            step = 0
            past: tuple[np.ndarray, list[np.ndarray]] | None = None
            while (x[lo:hi] == self.mask_id).any():
                if should_stop is not None and should_stop():
                    stats.finish_reason = "cancelled"
                    return
                if params.cache == CacheMode.NONE.value or lo == 0:
                    logits = self.forward(x, p0)[lo:hi]  # the whole sequence, every step
                    stats.positions_computed += len(x)
                elif past is None:  # a block's first step: encode everything once, keep the keys/values
                    full, kv = self.encode(x, p0)
                    logits = full[lo:hi]
                    stats.positions_computed += len(x)
                    keep = np.arange(lo) if params.cache == CacheMode.PREFIX.value else np.r_[0:lo, hi:len(x)]
                    past = keep, [t[:, :, keep] for t in kv]
                else:
                    end = len(x) if params.cache == CacheMode.PREFIX.value else hi
                    logits = self.forward_cached(x[lo:end], np.arange(lo, end), *past)[: hi - lo]
                    stats.positions_computed += end - lo
                stats.forward_passes += 1
                if on_step is not None:
                    on_step(stats.forward_passes - 1, logits)
                masked = np.flatnonzero(x[lo:hi] == self.mask_id)
                k = schedule[step] if step < len(schedule) else len(masked)
                x0, chosen = select(logits[masked], max(k, 1), params, rng)
                x[lo + masked[chosen]] = x0[chosen]
                step += 1
            block = [int(t) for t in x[lo:hi]]
            stats.blocks += 1
            if stats.blocks == 1:
                stats.first_block_s = time.perf_counter() - start
            stop_at = next((i for i, t in enumerate(block) if t in self.stop_ids), None)
            kept = block if stop_at is None else block[:stop_at]
            stats.generated_tokens += len(kept)
            stats.token_ids.extend(kept)
            stats.latency_s = time.perf_counter() - start
            yield kept
            if stop_at is not None:
                stats.finish_reason = "stop"
                return
        stats.finish_reason = "length"

    def stream(self, prompt: Prompt, **options: Any) -> TextStream:
        """Stream the answer block by block. Options: gen_length, block_length, diffusion_steps, remasking,
        threshold, entropy_bound, temperature, top_k, top_p, seed, cache (none | prefix | dual). Close the stream to
        cancel."""
        ids = self.tokenizer.encode_prompt(prompt)
        params = self.params(len(ids), **options)
        stats = DenoiseStats()
        return TextStream(self._text(ids, params, stats), stats)

    def _text(self, ids: list[int], params: DiffusionParams, stats: DenoiseStats) -> Iterator[str]:
        detok = StreamingDetokenizer(self.tokenizer)
        blocks = self.generate_blocks(ids, params, stats)
        try:
            for block in blocks:
                text = "".join(detok.put(t) for t in block)
                if text:
                    yield text
            tail = detok.flush()
            if tail:
                yield tail
        finally:
            blocks.close()

    def generate(self, prompt: Prompt, **options: Any) -> str:
        return "".join(self.stream(prompt, **options))
