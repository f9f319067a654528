"""The KV-cached decoder for AR bundles: prefill once, then one graph run per new token for every sequence of a batch.

``ARModel`` owns the graph's feeds (names from the manifest): ``forward`` runs one sequence's new tokens on its cache
(prefill), ``decode_batch`` one token for every row of a ``BatchKV``. ``ARBatch`` is the loop both the single-stream
API and the serving engine run: admit (prefill, reusing a cached prefix), then steps of one token per sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.runtimes import model as mdl
from edgekit.runtimes.backend import BackendOptions, check_dims, create_session, run_graph
from edgekit.runtimes.bundle import Manifest, bundle_file
from edgekit.runtimes.errors import BundleError, ContextLengthError
from edgekit.runtimes.kv_cache import BatchKV, KVCache, PrefixCache
from edgekit.runtimes.sampling import SamplingParams, sample_next
from edgekit.runtimes.sequence import Sequence
from edgekit.runtimes.tokenizer import Prompt, Tokenizer

GRAPH = "decoder"
FEEDS = ("input_ids", "attention_mask", "logits_to_keep")  # besides the KV cache, named by the manifest's layout


class ARModel:
    """A loaded AR bundle. ``stream``/``generate`` take a prompt string or a list of chat messages."""

    kind = "ar"
    option_names = frozenset(SamplingParams.__dataclass_fields__)
    parity_settings = (mdl.ParitySetting("greedy", {"temperature": 0.0}),)
    parity_prompts = 9  # how many of the built-in prompts parity runs (each setting on each)

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions) -> None:
        if manifest.kv_cache is None or GRAPH not in manifest.graphs:
            raise BundleError(f"AR bundle '{bundle_dir}' lacks a decoder graph or KV-cache layout in its manifest.")
        self.path = bundle_dir
        self.manifest = manifest
        self.layout = manifest.kv_cache
        names = KVCache(self.layout)
        self.graph = manifest.graphs[GRAPH]
        inputs, outputs = (*FEEDS, *names.past_names), ("logits", *names.present_names)
        if (tuple(self.graph.inputs), tuple(self.graph.outputs)) != (inputs, outputs):
            raise BundleError(f"Bundle '{bundle_dir}': the KV-cache layout ({self.layout.num_layers} layers) does not "
                              f"match the decoder graph's I/O ({len(self.graph.inputs) - len(FEEDS)} past tensors). "
                              "HINT: the manifest was altered; re-export the bundle.")
        self.session = create_session(bundle_dir, self.graph, backend, manifest.runtime, inputs, outputs)
        kv_axes = {1: self.layout.num_kv_heads, 3: self.layout.head_dim}
        check_dims(self.session, self.graph.file, {"logits": {-1: manifest.vocab_size},
                                                   **{n: kv_axes for n in (*names.past_names, *names.present_names)}},
                   {n: self.layout.dtype for n in names.past_names})
        rotary = self.session.get_modelmeta().custom_metadata_map.get("edgekit.rotary_positions", "")
        if rotary.isdigit() and int(rotary) < manifest.max_context:
            raise BundleError(f"Bundle '{bundle_dir}': max_context {manifest.max_context} is beyond the decoder "
                              f"graph's rotary cache of {rotary} positions. HINT: the manifest was altered; re-export "
                              "the bundle (with --max-context).")
        self.tokenizer = Tokenizer(bundle_file(bundle_dir, manifest.tokenizer.file, "tokenizer"), manifest.tokenizer)
        self.stop_ids = frozenset(manifest.tokens.stop_ids)
        self.defaults = SamplingParams.from_defaults(manifest.generation)
        self._outputs = ["logits", *names.present_names]

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    def new_cache(self) -> KVCache:
        return KVCache(self.layout)

    # --- the graph -----------------------------------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_graph(self.session, self._outputs, feeds, self.graph.file)

    def forward(self, token_ids: Seq[int], cache: KVCache, logits_to_keep: int = 1) -> np.ndarray:
        """Run new tokens through the graph on top of ``cache`` (updated in place); return logits [K, V]."""
        past = len(cache)
        if past + len(token_ids) > self.max_context:
            raise ContextLengthError(
                f"Sequence of {past + len(token_ids)} tokens exceeds the bundle's max context {self.max_context}.")
        feeds = cache.feeds()
        feeds["input_ids"] = np.asarray([token_ids], dtype=np.int64)  # [1, S]
        feeds["attention_mask"] = np.ones((1, past + len(token_ids)), dtype=np.int64)  # [1, P + S]
        feeds["logits_to_keep"] = np.asarray([logits_to_keep], dtype=np.int64)
        logits, *presents = self._run(feeds)
        cache.update(presents, token_ids)
        return logits[0]  # [K, V]

    def decode_batch(self, tokens: Seq[int], kv: BatchKV) -> np.ndarray:
        """One new token per row of ``kv`` (updated in place); return logits [B, V]."""
        lengths = np.asarray(kv.lengths)
        feeds = dict(zip(kv.names, kv.arrays))
        feeds["input_ids"] = np.asarray(tokens, dtype=np.int64)[:, None]  # [B, 1]
        mask = np.arange(int(lengths.max()) + 1)[None, :] <= lengths[:, None]
        feeds["attention_mask"] = mask.astype(np.int64)  # [B, T + 1]: row i has lengths[i] + 1 ones
        feeds["logits_to_keep"] = np.asarray([1], dtype=np.int64)
        logits, *kv.arrays = self._run(feeds)  # logits: [B, 1, V]
        kv.lengths = [n + 1 for n in kv.lengths]
        return logits[:, -1]

    # --- generation ----------------------------------------------------------------------------------------------
    def params(self, prompt_len: int, **options: Any) -> SamplingParams:
        """Validated settings for a prompt of ``prompt_len`` tokens (the bundle's defaults for what is not given)."""
        mdl.refuse_unknown(self, options)
        params = self.defaults.with_overrides(**options)
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
        return Sequence(prompt_ids, params, self.tokenizer, self.stop_ids, params.max_new_tokens, params.seed,
                        params.stop)

    def new_batch(self, max_batch: int = 1, prefix_cache_entries: int = 0) -> ARBatch:
        return ARBatch(self, max_batch, prefix_cache_entries)

    def stream(self, prompt: Prompt, batch: ARBatch | None = None, **options: Any) -> mdl.TextStream:
        """Stream the answer as text pieces. Options: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop. ``batch``: reuse one across calls to keep a chat's KV prefix (made with
        ``new_batch(1, prefix_cache_entries=N)``). Close the returned stream to cancel."""
        return mdl.stream(self, prompt, batch, options)

    def generate(self, prompt: Prompt, **options: Any) -> str:
        """Return the whole answer as one string (same options as ``stream``)."""
        return "".join(self.stream(prompt, **options))

    def greedy_ids(self, prompt_ids: Seq[int], n: int) -> list[int]:
        """Exactly ``n`` greedy tokens, ignoring stop tokens (for checks)."""
        return self.trace(prompt_ids, {"temperature": 0.0}, new_tokens=n).tokens

    def trace(self, prompt_ids: Seq[int], options: Mapping[str, Any], reference: Any = None,
              new_tokens: int = 64) -> mdl.Trace:
        """Exactly ``new_tokens`` tokens chosen by the runtime's sampler (stop tokens ignored) on the logits of
        ``reference`` (``prefill(ids) -> [S, V]``, ``step(token) -> [V]``) or, by default, of this bundle's graph."""
        provider = reference if reference is not None else _GraphLogits(self)
        seq = self.new_sequence(prompt_ids, self.params(len(prompt_ids), **{**options, "max_new_tokens": new_tokens}))
        logits = np.asarray(provider.prefill(list(prompt_ids)))
        steps, tokens = [logits], []
        for i in range(new_tokens):
            tokens.append(self._sample(seq, logits[-1]))
            seq.history.append(tokens[-1])
            if i + 1 < new_tokens:
                logits = np.asarray(provider.step(tokens[-1]))[None]
                steps.append(logits[0])
        return mdl.Trace(steps, tokens)

    @staticmethod
    def _sample(seq: Sequence, logits: np.ndarray) -> int:
        p = seq.params
        assert isinstance(p, SamplingParams)
        return sample_next(logits, p, seq.rng, seq.history if p.repetition_penalty != 1.0 else ())


class _GraphLogits:
    """The bundle's graph as a logits provider for ``trace``: every prompt position, then one token at a time."""

    def __init__(self, model: ARModel) -> None:
        self.model, self.cache = model, model.new_cache()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.model.forward(ids, self.cache, logits_to_keep=len(ids))

    def step(self, token: int) -> np.ndarray:
        return self.model.forward([token], self.cache)[-1]


class _Row:
    """A sequence's place in the batch: the tokens whose KV is held, and its own cache until it is packed in."""

    def __init__(self, tokens: list[int], cache: KVCache | None) -> None:
        self.tokens, self.cache = tokens, cache
        self.index = -1  # row in the batch KV once packed


class ARBatch:
    """Sequences decoding together on one ``ARModel``: each keeps its own KV row, settings, seed and stop rules; one
    graph run per step advances them all by one token. Finished sequences' KV goes to the prefix cache."""

    def __init__(self, model: ARModel, capacity: int = 1, prefix_cache_entries: int = 0) -> None:
        self.model = model
        self.capacity = capacity
        self.prefix = PrefixCache(model.layout, prefix_cache_entries)
        self.kv = BatchKV(model.layout)
        self._seqs: list[Sequence] = []  # in row order once packed
        self._dirty = False

    @property
    def active(self) -> list[Sequence]:
        return list(self._seqs)

    def admit(self, seq: Sequence) -> None:
        """Prefill the part of the prompt no cached prefix covers and commit the first token."""
        cache = self.prefix.lookup(seq.prompt_ids)
        seq.stats.reused_prompt_tokens = len(cache)
        logits = self.model.forward(seq.prompt_ids[len(cache):], cache)[-1]
        self._count(seq, len(seq.prompt_ids) - seq.stats.reused_prompt_tokens)
        row = _Row(list(seq.prompt_ids), cache)
        seq.state = row
        if seq.accept(ARModel._sample(seq, logits)):
            self._retire(seq, row)
        else:
            self._seqs.append(seq)
            self._dirty = True

    def step(self) -> None:
        """One token for every active sequence."""
        if not self._seqs:
            return
        if self._dirty:
            self._repack()
        seqs = list(self._seqs)
        fed = [s.stats.token_ids[-1] for s in seqs]
        logits = self.model.decode_batch(fed, self.kv)
        for seq, token, row_logits in zip(seqs, fed, logits):
            self._row(seq).tokens.append(token)
            self._count(seq, 1)
            if seq.accept(ARModel._sample(seq, row_logits)):
                self._retire(seq, self._row(seq))

    def remove(self, seq: Sequence) -> None:
        if seq in self._seqs:
            self._seqs.remove(seq)
            self._dirty = True

    @staticmethod
    def _row(seq: Sequence) -> _Row:
        assert isinstance(seq.state, _Row)
        return seq.state

    @staticmethod
    def _count(seq: Sequence, positions: int) -> None:
        seq.stats.forward_passes += 1
        seq.stats.positions_computed += positions

    def _retire(self, seq: Sequence, row: _Row) -> None:
        """A finished sequence leaves; its KV (prompt + fed tokens) is kept for prefix reuse."""
        if seq.stats.finish_reason in ("stop", "length") and self.prefix.capacity > 0:
            self.prefix.put(row.cache if row.cache is not None else self.kv.row(row.index, row.tokens))
        self.remove(seq)

    def _repack(self) -> None:
        """Rebuild the batch KV after sequences joined or left: each row keeps its own valid length."""
        sources: list[KVCache | tuple[int, int]] = []
        for seq in self._seqs:
            row = self._row(seq)
            if row.cache is not None:
                sources.append(row.cache)
                row.cache = None
            else:
                sources.append((row.index, len(row.tokens)))
        self.kv.pack(sources)
        for i, seq in enumerate(self._seqs):
            self._row(seq).index = i
        self._dirty = False
