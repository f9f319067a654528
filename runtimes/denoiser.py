"""The reduced-step denoiser for masked-diffusion LMs (dLLMs): semi-autoregressive blocks, parallel unmasking.

Generation starts from the prompt followed by ``gen_length`` mask tokens. Blocks of ``block_length`` are filled left
to right (LLaDA's semi-AR schedule); each step runs the network and commits some masked positions of the current
block, chosen by the rules in ``unmasking``; a block's text is streamed as soon as the block is complete.

The loop (``denoise``) is the one implementation of the sampler: it runs over any logits provider, this bundle's
graphs or (for parity) the PyTorch model, so the two are compared step by step through the same code.

Cache modes (Fast-dLLM's approximate KV cache): ``none`` runs the whole sequence every step; ``prefix`` encodes the
whole sequence at a block's first step, keeps the keys/values of the prompt and finished blocks, and then runs only
the current block and the masked suffix; ``dual`` keeps the suffix's keys/values too and runs only the block. The
cached entries go stale while the block changes (the approximation Fast-dLLM makes); they are refreshed per block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekit.runtimes import diffusion_params as dp
from edgekit.runtimes import model as mdl
from edgekit.runtimes.backend import BackendOptions, check_dims, create_session, run_graph
from edgekit.runtimes.bundle import Manifest
from edgekit.runtimes.errors import BundleError, ConfigError
from edgekit.runtimes.sequence import Sequence
from edgekit.runtimes.tokenizer import Prompt
from edgekit.runtimes.unmasking import CacheMode, commit, schedule


class Logits(Protocol):
    """A source of whole-sequence logits: ``full(tokens [S], prompt_len) -> [S, V]``. The cached modes also need
    ``encode`` and ``forward_cached`` (only a bundle's graphs have them)."""

    def full(self, tokens: np.ndarray, prompt_len: int) -> np.ndarray: ...


def denoise(net: Any, prompt_ids: Seq[int], params: dp.DiffusionParams, mask_id: int, stats: mdl.Stats,
            rng: np.random.Generator, should_stop: Callable[[], bool] = lambda: False,
            on_step: Callable[[np.ndarray], None] | None = None) -> Iterator[list[int]]:
    """Yield each block's committed ids, in order; returns early (without a block) when ``should_stop()``.
    ``net`` is a ``Logits`` provider; ``stats`` gets the forward passes and positions computed."""
    p0 = len(prompt_ids)
    x = np.array(list(prompt_ids) + [mask_id] * params.gen_length, dtype=np.int64)
    for b in range(params.gen_length // params.block_length):
        lo, hi = p0 + b * params.block_length, p0 + (b + 1) * params.block_length
        plan = schedule(params.block_length, params)
        step = 0
        past: tuple[np.ndarray, list[np.ndarray]] | None = None
        while (x[lo:hi] == mask_id).any():
            if should_stop():
                return
            if params.cache == CacheMode.NONE.value or lo == 0:
                logits = net.full(x, p0)[lo:hi]  # the whole sequence, every step
                stats.positions_computed += len(x)
            elif past is None:  # a block's first step: encode everything once, keep the keys/values
                full, kv = net.encode(x, p0)
                logits = full[lo:hi]
                stats.positions_computed += len(x)
                keep = np.arange(lo) if params.cache == CacheMode.PREFIX.value else np.r_[0:lo, hi:len(x)]
                past = keep, [t[:, :, keep] for t in kv]
            else:
                end = len(x) if params.cache == CacheMode.PREFIX.value else hi
                logits = net.forward_cached(x[lo:end], np.arange(lo, end), *past)[: hi - lo]
                stats.positions_computed += end - lo
            stats.forward_passes += 1
            if on_step is not None:
                on_step(logits)
            commit(x, lo, logits, np.flatnonzero(x[lo:hi] == mask_id), plan, step, params, rng)
            step += 1
        yield [int(t) for t in x[lo:hi]]


class DiffusionModel(mdl.Bundled):
    """A loaded diffusion bundle; ``stream`` yields each block's text once the block is committed."""

    kind = "diffusion"
    objective = "masked"  # logits at a masked position predict the token at that position
    option_names = dp.FIELDS | {"max_new_tokens"}
    parity_prompts = 3  # x 7 settings

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions) -> None:
        info = manifest.diffusion
        if "denoiser" not in manifest.graphs or manifest.tokens.mask_id is None or info is None:
            raise BundleError(f"Diffusion bundle '{bundle_dir}' lacks a denoiser graph, its diffusion record or a mask "
                              "token id. HINT: re-export it.")
        super().__init__(bundle_dir, manifest)
        self._backend = backend
        # prompt-isolated models (prompt positions do not attend to the answer) take the prompt length as input
        self.isolated = info.attention == "prompt_isolated"
        self._full_inputs = ("input_ids", "prompt_length") if self.isolated else ("input_ids", "attention_mask")
        self.session = self._session("denoiser", self._full_inputs, ("logits",))
        check_dims(self.session, manifest.graphs["denoiser"].file, {"logits": {-1: manifest.vocab_size}})
        self._cached: tuple[Any, Any] | None = None  # (encode, block) sessions, created on first use
        self.cache_modes = info.cache_modes
        self.position_offset = info.position_offset
        self.mask_id = int(manifest.tokens.mask_id)
        self.defaults = dp.defaults(manifest.generation)

    def _session(self, name: str, inputs: Seq[str], outputs: Seq[str]) -> Any:
        return create_session(self.path, self.manifest.graphs[name], self._backend, self.manifest.runtime,
                              inputs=inputs, outputs=outputs)

    @property
    def parity_settings(self) -> tuple[mdl.ParitySetting, ...]:
        """The rules and samplers parity runs (16 tokens in blocks of 8); the cached modes are variants of two."""
        base = {"gen_length": 16, "block_length": 8, "diffusion_steps": 16}
        cached = {m: {"cache": m} for m in self.cache_modes if m != CacheMode.NONE.value}
        settings = (("low_confidence", {"remasking": "low_confidence"}, cached),
                    ("threshold_0.9", {"remasking": "low_confidence", "threshold": 0.9}, cached),
                    ("entropy_bound_0.5", {"remasking": "low_confidence", "entropy_bound": 0.5}, {}),
                    ("margin", {"remasking": "margin"}, {}), ("entropy", {"remasking": "entropy"}, {}),
                    ("random_seed3", {"remasking": "random", "seed": 3}, {}),
                    ("sampled_T0.7", {"temperature": 0.7, "top_k": 50, "top_p": 0.95, "seed": 5}, {}))
        return tuple(mdl.ParitySetting(name, {**base, **opts}, variants) for name, opts, variants in settings)

    # --- the graphs (a Logits provider) --------------------------------------------------------------------------
    def logits(self, token_ids: Seq[int]) -> np.ndarray:
        """Logits [S, V] of every position of a whole sequence (quality reports; no prompt: nothing isolated)."""
        return self.full(np.asarray(token_ids, np.int64), 0)

    def full(self, tokens: np.ndarray, prompt_len: int | None = None) -> np.ndarray:
        """tokens [S] -> logits [S, V] for the whole sequence (no cache). ``prompt_len``: required by
        prompt-isolated bundles."""
        ids = tokens[None, :].astype(np.int64)  # [1, S]
        second = self._prompt(prompt_len) if self.isolated else np.ones_like(ids)
        feeds = dict(zip(self._full_inputs, (ids, second)))
        return run_graph(self.session, ["logits"], feeds, self.manifest.graphs["denoiser"].file)[0][0]


    def _prompt(self, prompt_len: int | None) -> np.ndarray:
        if prompt_len is None:
            raise ConfigError("This bundle's attention is prompt-isolated: pass prompt_len (the prompt's token count).")
        return np.asarray([prompt_len], dtype=np.int64)

    def _cache_sessions(self) -> tuple[Any, Any]:
        if self._cached is None:
            g = self.manifest.graphs
            enc, blk = g["denoise_encode"], g["denoise_block"]
            same = enc.file == g["denoiser"].file  # prompt-isolated: one graph for both
            self._cached = (self.session if same else self._session("denoise_encode", enc.inputs, enc.outputs),
                            self._session("denoise_block", blk.inputs, ("logits",)))
        return self._cached

    def encode(self, tokens: np.ndarray, prompt_len: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens [S] -> (logits [S, V], every layer's key and value [1, H, S, D]) for the cached modes."""
        enc, _ = self._cache_sessions()
        spec = self.manifest.graphs["denoise_encode"]
        feeds = {"input_ids": tokens[None, :].astype(np.int64)}
        if self.isolated:
            feeds["prompt_length"] = self._prompt(prompt_len)
        out = run_graph(enc, spec.outputs, feeds, spec.file)
        return out[0][0], out[1:]

    def forward_cached(self, tokens: np.ndarray, positions: np.ndarray, past_positions: np.ndarray,
                       past: Seq[np.ndarray]) -> np.ndarray:
        """tokens [T] at ``positions`` attending to themselves and to cached keys/values -> logits [T, V]."""
        _, blk = self._cache_sessions()
        feeds = {"input_ids": tokens[None, :].astype(np.int64),
                 "position_ids": (positions[None, :] + self.position_offset).astype(np.int64),
                 "past_positions": (past_positions + self.position_offset).astype(np.int64)}
        names = [n for n in self.manifest.graphs["denoise_block"].inputs if n not in feeds]  # the cached K/V
        feeds.update(zip(names, past))
        return run_graph(blk, ["logits"], feeds, self.manifest.graphs["denoise_block"].file)[0][0]

    # --- generation ----------------------------------------------------------------------------------------------
    def params(self, prompt_len: int, **options: Any) -> dp.DiffusionParams:
        """Validated settings; ``max_new_tokens`` is an alias of ``gen_length``."""
        mdl.refuse_unknown(self, options)
        p = dp.resolve(self.defaults, options)
        if p.cache not in self.cache_modes:
            raise ConfigError(f"cache mode {p.cache!r} is not in this bundle (it has: {', '.join(self.cache_modes)}). "
                              "HINT: re-export it with this edgekit version, or use cache='none'.")
        mdl.check_fits(self, prompt_len, "gen_length", p.gen_length)
        return p

    def new_sequence(self, prompt_ids: Seq[int], params: dp.DiffusionParams) -> Sequence:
        return Sequence(prompt_ids, params, self.tokenizer, self.stop_ids, params.gen_length, params.seed)

    def new_batch(self, max_batch: int = 1, prefix_cache_entries: int = 0) -> DenoiseBatch:
        return DenoiseBatch(self, max_batch)

    def blocks(self, seq: Sequence, net: Any = None,
               on_step: Callable[[np.ndarray], None] | None = None) -> Iterator[list[int]]:
        """The denoising loop for one sequence, on this bundle's graphs unless ``net`` is given."""
        assert isinstance(seq.params, dp.DiffusionParams)
        return denoise(self if net is None else net, seq.prompt_ids, seq.params, self.mask_id, seq.stats, seq.rng,
                       seq.should_stop, on_step)

    def stream(self, prompt: Prompt, batch: DenoiseBatch | None = None, **options: Any) -> mdl.TextStream:
        """Stream the answer block by block. Options: gen_length (or max_new_tokens), block_length,
        diffusion_steps, remasking, threshold, entropy_bound, position_decay, temperature, top_k, top_p, seed, cache
        (none | prefix | dual). Close the stream to cancel."""
        return mdl.stream(self, prompt, batch, options)

    def trace(self, prompt_ids: Seq[int], options: Mapping[str, Any], reference: Any = None,
              new_tokens: int = 64) -> mdl.Trace:
        """Run the sampler with ``options`` on ``reference`` (a ``Logits`` provider) or on this bundle's graphs:
        every step's block logits and the ids generated before a stop token."""
        seq = self.new_sequence(prompt_ids, self.params(len(prompt_ids), **options))
        steps: list[np.ndarray] = []
        for block in self.blocks(seq, reference, on_step=steps.append):
            if seq.accept_block(block):
                break
        return mdl.Trace(steps, list(seq.stats.token_ids))


class DenoiseBatch:
    """Sequences of a ``DiffusionModel`` served together: each step commits the next block of every one in turn.
    Cancellation and deadlines take effect between denoising passes."""

    def __init__(self, model: DiffusionModel, capacity: int = 1) -> None:
        self.model = model
        self.capacity = capacity
        self._seqs: list[Sequence] = []

    @property
    def active(self) -> list[Sequence]:
        return list(self._seqs)

    def admit(self, seq: Sequence) -> None:
        seq.state = self.model.blocks(seq)
        self._seqs.append(seq)

    def step(self) -> None:
        for seq in list(self._seqs):
            gen = seq.state
            assert isinstance(gen, Iterator)
            block = next(gen, None)
            if block is None:  # the loop ran out of blocks, or stopped early when asked
                seq.finish("length" if not seq.should_stop() else "cancelled" if seq.cancelled else "timeout")
                self.remove(seq)
            elif seq.accept_block(block):
                self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self._seqs:
            self._seqs.remove(seq)
            close = getattr(seq.state, "close", None)
            if close is not None:
                close()
