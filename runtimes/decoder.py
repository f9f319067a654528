"""The KV-cached streaming decoder for AR bundles: prefill once, then one graph run per new token."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgekit.runtimes.backend import BackendOptions, create_session
from edgekit.runtimes.bundle import Manifest
from edgekit.runtimes.errors import BundleError, ConfigError, ContextLengthError
from edgekit.runtimes.kv_cache import KVCache
from edgekit.runtimes.sampling import SamplingParams, sample_next
from edgekit.runtimes.tokenizer import Prompt, StopStrings, StreamingDetokenizer, Tokenizer

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationStats:
    """Filled in as a stream runs; final once the stream is exhausted or closed."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt positions taken from a cache instead of prefilled
    generated_tokens: int = 0
    ttft_s: float = 0.0  # start -> first token chosen
    decode_s: float = 0.0  # first token -> last token
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class TextStream:
    """Iterator over text pieces (complete UTF-8) with ``stats`` (GenerationStats, or DenoiseStats for diffusion
    bundles); ``close()`` cancels generation."""

    def __init__(self, gen: Iterator[str], stats: Any) -> None:
        self._gen = gen
        self.stats = stats

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]
        if self.stats.finish_reason is None:
            self.stats.finish_reason = "cancelled"


class ARModel:
    """A loaded AR bundle. ``stream``/``generate`` take a prompt string or a list of chat messages."""

    kind = "ar"

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions) -> None:
        if manifest.kv_cache is None or "decoder" not in manifest.graphs:
            raise BundleError(f"AR bundle '{bundle_dir}' lacks a decoder graph or KV-cache layout in its manifest.")
        self.path = bundle_dir
        self.manifest = manifest
        self.graph = manifest.graphs["decoder"]
        self.session = create_session(bundle_dir / self.graph.file, backend,
                                      manifest.extra.get("runtime", {}).get("disabled_optimizers", ()))
        self.tokenizer = Tokenizer(bundle_dir / manifest.tokenizer.file, manifest.tokenizer)
        self.stop_ids = frozenset(manifest.tokens.stop_ids)
        self.defaults = SamplingParams.from_defaults(manifest.generation)
        self._present_names = KVCache(manifest.kv_cache).present_names
        self._outputs = ["logits", *self._present_names]

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    def new_cache(self) -> KVCache:
        assert self.manifest.kv_cache is not None
        return KVCache(self.manifest.kv_cache)

    # --- the algorithm -------------------------------------------------------------------------------------------
    def forward(self, token_ids: Sequence[int], cache: KVCache, logits_to_keep: int = 1) -> np.ndarray:
        """Run new tokens through the graph on top of ``cache`` (updated in place); return logits [K, V]."""
        past = len(cache)
        if past + len(token_ids) > self.max_context:
            raise ContextLengthError(
                f"Sequence of {past + len(token_ids)} tokens exceeds the bundle's max context {self.max_context}."
            )
        feeds: dict[str, Any] = cache.feeds()
        feeds["input_ids"] = np.asarray([token_ids], dtype=np.int64)  # [1, S]
        feeds["attention_mask"] = np.ones((1, past + len(token_ids)), dtype=np.int64)  # [1, P + S]
        feeds["logits_to_keep"] = np.asarray([logits_to_keep], dtype=np.int64)
        logits, *presents = self.session.run(self._outputs, feeds)
        cache.update(presents, list(token_ids))
        return logits[0]  # [K, V]

    def prefill(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Encode the prompt (or the part of it the cache lacks); return the last position's logits [V]."""
        return self.forward(token_ids, cache, logits_to_keep=1)[-1]

    def decode_step(self, token_id: int, cache: KVCache) -> np.ndarray:
        return self.forward([token_id], cache, logits_to_keep=1)[-1]

    # --- generation ----------------------------------------------------------------------------------------------
    def sampling_params(self, prompt_len: int, **overrides: Any) -> SamplingParams:
        unknown = set(overrides) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"Unknown generation option(s) for an AR bundle: {', '.join(sorted(unknown))}. "
                f"Known: {', '.join(SamplingParams.__dataclass_fields__)}."
            )
        params = self.defaults.with_overrides(**overrides)
        room = self.max_context - prompt_len
        if overrides.get("max_new_tokens") is None and params.max_new_tokens > room > 0:
            params = params.with_overrides(max_new_tokens=room)  # default length: fill the context, no more
        if room < 1:
            raise ContextLengthError(
                f"Prompt of {prompt_len} tokens does not fit the bundle's max context of {self.max_context} tokens "
                f"(room is needed for at least one new token). HINT: shorten the prompt by {1 - room} tokens or "
                "re-export with a larger --max-context."
            )
        if prompt_len + params.max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"Prompt of {prompt_len} tokens + max_new_tokens {params.max_new_tokens} = "
                f"{prompt_len + params.max_new_tokens} exceeds the bundle's max context of {self.max_context} tokens. "
                f"HINT: shorten the prompt or set max_new_tokens <= {room}."
            )
        return params

    def generate_ids(
        self, prompt_ids: Sequence[int], params: SamplingParams, stats: GenerationStats, cache: KVCache | None = None
    ) -> Iterator[int]:
        """Yield new token ids until a stop token (not yielded) or ``max_new_tokens``. Reuses ``cache``'s prefix."""
        start = time.perf_counter()
        cache = cache if cache is not None else self.new_cache()
        keep = min(cache.common_prefix(list(prompt_ids)), len(prompt_ids) - 1)  # prefill at least one token
        cache.rewind_to(keep)
        stats.prompt_tokens, stats.reused_prompt_tokens = len(prompt_ids), keep
        rng = np.random.default_rng(params.seed)
        history = list(prompt_ids)
        logits = self.prefill(prompt_ids[keep:], cache)
        first_at = 0.0
        for step in range(params.max_new_tokens):
            token = sample_next(logits, params, rng, history if params.repetition_penalty != 1.0 else ())
            now = time.perf_counter()
            if step == 0:
                stats.ttft_s = now - start
                first_at = now
            else:
                stats.decode_s = now - first_at
            stats.generated_tokens += 1
            if token in self.stop_ids:
                stats.finish_reason = "stop"
                return
            stats.token_ids.append(token)
            history.append(token)
            yield token
            if step + 1 < params.max_new_tokens:
                logits = self.decode_step(token, cache)
        stats.finish_reason = "length"

    def stream(self, prompt: Prompt, cache: KVCache | None = None, **options: Any) -> TextStream:
        """Stream the answer as text pieces. Options: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop. Close the returned stream to cancel."""
        prompt_ids = self.tokenizer.encode_prompt(prompt)
        params = self.sampling_params(len(prompt_ids), **options)
        stats = GenerationStats()
        return TextStream(self._text(prompt_ids, params, stats, cache), stats)

    def _text(
        self, prompt_ids: list[int], params: SamplingParams, stats: GenerationStats, cache: KVCache | None
    ) -> Iterator[str]:
        detok = StreamingDetokenizer(self.tokenizer)
        stops = StopStrings(params.stop)
        ids = self.generate_ids(prompt_ids, params, stats, cache)
        try:
            for token in ids:
                out, hit = stops.feed(detok.put(token))
                if out:
                    yield out
                if hit:
                    stats.finish_reason = "stop"
                    return
            out, hit = stops.feed(detok.flush())
            if hit:
                stats.finish_reason = "stop"
            tail = out + ("" if hit else stops.flush())
            if tail:
                yield tail
        finally:
            ids.close()

    def generate(self, prompt: Prompt, **options: Any) -> str:
        """Return the whole answer as one string (same options as ``stream``)."""
        return "".join(self.stream(prompt, **options))

    def greedy_ids(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """Exactly ``n`` greedy tokens, ignoring stop tokens (for parity checks)."""
        cache = self.new_cache()
        logits = self.prefill(prompt_ids, cache)
        out: list[int] = []
        for i in range(n):
            out.append(int(np.argmax(logits)))
            if i + 1 < n:
                logits = self.decode_step(out[-1], cache)
        return out
