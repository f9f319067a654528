"""The graph runner: one KV-cached decoder graph of a bundle, its session and feeds, run over rows of KV slots.

``GraphRunner`` is a component, not a model: the AR decoder (``decoder.ARModel``) and the block-diffusion model
(``blocks.BlockDiffusionModel``) each hold one, and neither inherits the other. It checks the graph against the
manifest at load (I/O names from the KV layout, dims, dtypes, the rotary cache), then runs it: ``forward`` puts one
sequence's new tokens on its cache, ``run_rows`` S new tokens on each of several rows of one shared buffer.
Shared-buffer bundles bind the rows as past and present (onnxruntime IO binding: only ids, mask and logits move);
copying-layout bundles (tensorrt flavour, block attention) feed the valid past and store the presents back.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from edgekit.runtimes.backend import (
    BackendOptions,
    check_dims,
    check_rows,
    create_session,
    device_of,
    run_bound,
    run_graph,
)
from edgekit.runtimes.bundle import Manifest
from edgekit.runtimes.errors import BundleError, ContextLengthError
from edgekit.runtimes.kv_cache import KVCache, KVSlots, past_names, present_names

DECODER = "decoder"  # the manifest's name of the KV-cached graph
FEEDS = ("input_ids", "attention_mask", "logits_to_keep")  # besides the KV cache, named by the manifest's layout


class GraphRunner:
    """The bundle's ``decoder`` graph on an onnxruntime session. ``defaults``: the inputs the holding model feeds on
    every run besides ids, mask and cache (a block-diffusion graph's ``block_length``) and their default values."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: BackendOptions,
                 defaults: Mapping[str, np.ndarray] | None = None) -> None:
        if manifest.kv_cache is None or DECODER not in manifest.graphs:
            raise BundleError(f"Bundle '{bundle_dir}' lacks a decoder graph or KV-cache layout in its manifest. "
                              "HINT: re-export it.")
        self.manifest = manifest
        self.layout = manifest.kv_cache
        self.spec = manifest.graphs[DECODER]
        self.defaults = dict(defaults or {})
        pasts, presents = past_names(self.layout), present_names(self.layout)
        inputs, outputs = (*FEEDS, *self.defaults, *pasts), ("logits", *presents)
        if (tuple(self.spec.inputs), tuple(self.spec.outputs)) != (inputs, outputs):
            raise BundleError(f"Bundle '{bundle_dir}': the KV-cache layout ({self.layout.num_layers} layers) does not "
                              f"match the decoder graph's I/O ({len(self.spec.inputs) - len(FEEDS)} past tensors). "
                              "HINT: the manifest was altered; re-export the bundle.")
        self.session = create_session(bundle_dir, self.spec, backend, manifest.runtime, inputs, outputs)
        kv_axes = {1: self.layout.num_kv_heads, 3: self.layout.head_dim}
        check_dims(self.session, self.spec.file, {"logits": {-1: manifest.vocab_size},
                                                  **{n: kv_axes for n in (*pasts, *presents)}},
                   {n: self.layout.dtype for n in pasts})
        rotary = self.session.get_modelmeta().custom_metadata_map.get("edgekit.rotary_positions", "")
        if rotary.isdigit() and int(rotary) < manifest.max_context:
            raise BundleError(f"Bundle '{bundle_dir}': max_context {manifest.max_context} is beyond the decoder "
                              f"graph's rotary cache of {rotary} positions. HINT: the manifest was altered; re-export "
                              "the bundle (with --max-context).")
        self.device = device_of(self.session)
        self.device_buffers = backend.device_buffers
        self._outputs = ["logits", *presents]

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    def new_slots(self, capacity: int) -> KVSlots:
        """KV buffers for ``capacity`` rows: device OrtValues for a shared-buffer graph on a GPU (bound by pointer),
        host numpy for the CPU and for copying-layout graphs, which take their past as inputs wherever they run
        (onnxruntime copies it to the device)."""
        check_rows(self.manifest.runtime, capacity, self.session.get_providers())
        ortvalues = self.layout.shared_buffer and (self.device != "cpu" if self.device_buffers is None
                                                   else self.device_buffers)
        return KVSlots(self.layout, capacity, self.max_context, self.device, ortvalues)

    def new_cache(self) -> KVCache:
        """A one-sequence cache in its own buffer (batches share one buffer between sequences)."""
        return KVCache(self.new_slots(1))

    def _run(self, slots: KVSlots, lo: int, hi: int, input_ids: np.ndarray, mask: np.ndarray, keep: int,
             past_width: int, feeds: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """One graph run over rows [lo, hi) of ``slots``: new K/V land in the rows; return logits [rows, K, V]."""
        small = {"input_ids": input_ids, "attention_mask": mask, "logits_to_keep": np.asarray([keep], np.int64),
                 **self.defaults, **(feeds or {})}
        if not self.layout.shared_buffer:
            logits, *presents = run_graph(self.session, self._outputs, {**small, **slots.pasts(lo, hi, past_width)},
                                          self.spec.file)
            slots.store(lo, presents)
            return logits
        io = self.session.io_binding()
        for name, value in small.items():
            io.bind_cpu_input(name, value)
        logits = np.empty((hi - lo, keep, self.manifest.vocab_size), np.float32)  # preallocated, on the host
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        slots.bind(io, lo, hi)
        run_bound(self.session, io, self.spec.file)
        return logits

    def forward(self, token_ids: Seq[int], cache: KVCache, logits_to_keep: int = 1,
                feeds: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Run new tokens through the graph on top of ``cache`` (updated in place); return logits [K, V]."""
        past = len(cache)
        total = past + len(token_ids)
        if total > self.max_context:
            raise ContextLengthError(
                f"Sequence of {total} tokens exceeds the bundle's max context {self.max_context}.")
        cache.slots.ensure(total)
        logits = self._run(cache.slots, cache.slot, cache.slot + 1, np.asarray([token_ids], dtype=np.int64),
                           np.ones((1, total), dtype=np.int64), logits_to_keep, past, feeds)
        cache.tokens.extend(token_ids)
        return logits[0]  # [K, V]

    def logits(self, token_ids: Seq[int], feeds: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits [S, V] of every position of ``token_ids`` on a fresh cache (teacher forcing)."""
        cache = self.new_cache()
        try:
            return self.forward(token_ids, cache, logits_to_keep=len(token_ids), feeds=feeds)
        finally:
            cache.release()

    def run_rows(self, tokens: np.ndarray, slots: KVSlots, lo: int, lengths: Seq[int], keep: int | None = None,
                 feeds: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """``tokens`` [R, S]: S new tokens for each of rows lo..lo+R-1 of ``slots`` (row i holds ``lengths[i]``
        valid positions; its new ones land right after them); logits [R, keep, V] of the last ``keep`` (default S).
        Rows that hold no sequence take throw-away tokens at their own length: nothing valid is overwritten."""
        lens = np.asarray(lengths)
        width, new = int(lens.max()), tokens.shape[1]
        if width + new > slots.length:  # (rare: the buffer doubles)
            slots.ensure(width + new)
        mask = (np.arange(width + new)[None, :] < lens[:, None] + new).astype(np.int64)  # row i: its length + S
        return self._run(slots, lo, lo + len(lens), tokens.astype(np.int64, copy=False), mask, keep or new, width,
                         feeds)
