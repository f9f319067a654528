"""The PyTorch model as the reference every check compares a bundle with: one home for its logits, of every kind.

``TorchReference`` wraps the full model under the attention its bundle runs (causal, block-causal, or bidirectional
for masked LMs) and gives what the checks need: teacher-forced ``logits`` of a sequence (the quality report) and
fresh per-run ``provider()``s for the parity harness, which the runtime's own generation loop drives (``prefill``/
``step`` for AR bundles, ``blocks`` for block diffusion, ``full`` for full diffusion). A prompt's forward is run once
per export: the quality report's prompt logits and parity's prefill of the same ids share it.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np

Attention = Literal["causal", "block", "bidirectional"]


def block_causal_mask(n: int, block: int) -> Any:
    """A block-diffusion model's attention over n positions as an additive [1, 1, n, n] torch mask: bidirectional
    inside blocks of ``block`` absolute positions, causal across them."""
    import torch

    pos = torch.arange(n)
    seen = (pos[None, :] // block) <= (pos[:, None] // block)
    return torch.where(seen, 0.0, torch.finfo(torch.float32).min)[None, None]


class TorchReference:
    """The PyTorch ``model`` under ``attention`` (``block_length``: the block of block-causal attention)."""

    def __init__(self, model: Any, attention: Attention = "causal", block_length: int = 0) -> None:
        self.model, self.attention, self.block_length = model, attention, block_length
        self._prefills: dict[tuple[int, ...], tuple[np.ndarray, Any]] = {}  # ids -> (logits, KV cache)

    @classmethod
    def for_manifest(cls, model: Any, manifest: Any) -> TorchReference:
        """The reference for a bundle, under the attention its manifest records."""
        if manifest.block_attention is not None:
            return cls(model, "block", manifest.block_attention.block_length)
        return cls(model, "bidirectional" if manifest.diffusion is not None else "causal")

    def for_bundle(self, manifest: Any) -> TorchReference:
        """This reference under the attention ``manifest`` records: itself (with what it has run) when that is the
        attention it already has."""
        other = TorchReference.for_manifest(self.model, manifest)
        if (other.attention, other.block_length) == (self.attention, self.block_length):
            return self
        return other

    def forget(self) -> None:
        """Drop the kept prompt forwards (the model's weights changed, e.g. pruned in place)."""
        self._prefills.clear()

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [S, V] of every position of ``ids``."""
        if self.attention == "causal":
            return self._kept(ids)[0]
        if self.attention == "block":
            return self.blocks(ids, self.block_length)
        return self.full(np.asarray(ids, np.int64), 0)

    def provider(self) -> TorchLogits:
        """A fresh logits provider for one run of a bundle's generation loop."""
        return TorchLogits(self)

    def _kept(self, ids: list[int]) -> tuple[np.ndarray, Any]:
        """Logits of ``ids`` and the model's KV cache after them, run once (parity prefills the quality prompts)."""
        key = tuple(int(i) for i in ids)
        if key not in self._prefills:
            self._prefills[key] = self.run(list(key), None)
        return self._prefills[key]

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, Any]:
        """``_kept`` with a copy of the cache, which the caller's steps extend."""
        logits, past = self._kept(ids)
        return logits, copy.deepcopy(past)

    def run(self, ids: list[int], past: Any) -> tuple[np.ndarray, Any]:
        """One causal forward of ``ids`` on ``past``: (logits [S, V], the extended cache)."""
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), past_key_values=past, use_cache=True)
        return out.logits[0].float().numpy(), out.past_key_values

    def blocks(self, tokens: list[int], block: int) -> np.ndarray:
        """Logits of every position under a block-diffusion model's attention (block-causal)."""
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([list(tokens)]), attention_mask=block_causal_mask(len(tokens), block))
        return out.logits[0].float().numpy()

    def full(self, tokens: np.ndarray, prompt_len: int) -> np.ndarray:
        """A masked LM's logits [S, V] of a whole sequence, under the attention rule its bundle runs."""
        from edgekit.export.diffusion import reference_logits

        return reference_logits(self.model, tokens, prompt_len)


class TorchLogits:
    """One run's logits provider: ``prefill``/``step`` with its own KV cache (AR), ``blocks`` (block diffusion),
    ``full`` (masked LMs)."""

    def __init__(self, ref: TorchReference) -> None:
        self.ref, self._past = ref, None

    def prefill(self, ids: list[int]) -> np.ndarray:
        logits, self._past = self.ref._prefill(ids)
        return logits

    def step(self, token: int) -> np.ndarray:
        logits, self._past = self.ref.run([token], self._past)
        return logits[-1]

    def blocks(self, tokens: list[int], block: int) -> np.ndarray:
        return self.ref.blocks(tokens, block)

    def full(self, tokens: np.ndarray, prompt_len: int) -> np.ndarray:
        return self.ref.full(tokens, prompt_len)
