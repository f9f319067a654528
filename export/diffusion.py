"""Diffusion LMs on the export side: the denoiser graph (torch.onnx) and a PyTorch reference of the sampler.

The reference re-implements runtimes/denoiser.py's algorithm with torch ops on the full PyTorch model, drawing
random numbers from the same numpy Generator in the same order, so a bundle can be checked step by step.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgekit.runtimes.denoiser import DiffusionParams, Remasking
from edgekit.runtimes.errors import ExportError

DEFAULTS = {"gen_length": 64, "block_length": 32, "diffusion_steps": 64, "remasking": "low_confidence",
            "threshold": None}


def build_denoiser(model: Any) -> onnx.ModelProto:
    """Export the whole masked LM: input_ids [B, S], attention_mask [B, S] -> logits [B, S, V]."""
    import torch

    class Denoiser(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    limit = int(getattr(model.config, "max_position_embeddings", 512))
    seq = torch.export.Dim("sequence", min=2, max=limit)
    ids = ((torch.arange(16) * 7 + 3) % int(model.config.vocab_size))[None, :]  # fixed, not from the global RNG
    # export a copy: tracing can leave the module's non-persistent buffers changed (seen with remote-code models),
    # and the caller still needs the original as the parity reference; and start from clean dynamo caches, so an
    # earlier export in the same process cannot leak into this one
    torch._dynamo.reset()
    try:
        program = torch.onnx.export(
            Denoiser(copy.deepcopy(model)).eval(), (ids, torch.ones_like(ids)),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"], dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}},
            dynamo=True, verbose=False,
        )
    except Exception as e:  # torch.export raises many types for graphs it cannot capture
        raise ExportError(f"torch.onnx could not export {type(model).__name__}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None
    return program.model_proto


class _KVContext:
    """What the edgekit attention function does during one traced forward: ``encode`` records every layer's
    (post-rotary) keys and values; ``block`` prepends cached keys/values to the layer's own and masks by position."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.kv: list[tuple[Any, Any]] = []
        self.past: Sequence[Any] = ()
        self.q_pos: Any = None
        self.k_pos: Any = None
        self.layer = 0
        self.prompt_len: Any = None  # prompt-isolated models: prompt positions do not attend to the answer


_CTX = _KVContext()
ATTN_NAME = "edgekit_kv"


def _kv_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """An attention function for transformers' AttentionInterface (query/key/value [B, H, S, D], after rotary).
    Bidirectional, with the module's sliding window if it has one; the HF mask is not used (batch 1, no padding)."""
    import torch

    s = query.shape[2]
    if _CTX.mode == "block":
        pk, pv = _CTX.past[2 * _CTX.layer], _CTX.past[2 * _CTX.layer + 1]
        _CTX.layer += 1
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        q_pos, k_pos = _CTX.q_pos, _CTX.k_pos
    else:  # "encode" records the keys/values; "full" (training, reference) does not
        if _CTX.mode == "encode":
            _CTX.kv.append((key, value))
        q_pos = k_pos = torch.arange(s)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    window = kwargs.get("sliding_window")
    if window:  # transformers passes flash-attention's inclusive size: |q - k| <= window - 1
        far = (q_pos[:, None] - k_pos[None, :]).abs() > window - 1
        scores = scores.masked_fill(far[None, None], torch.finfo(scores.dtype).min)
    if _CTX.prompt_len is not None and _CTX.mode != "block":  # (block queries are answer positions: no limit)
        hidden = (q_pos[:, None] < _CTX.prompt_len) & (k_pos[None, :] >= _CTX.prompt_len)
        scores = scores.masked_fill(hidden[None, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _use_kv_attention(model: Any) -> Any:
    """A copy of the model whose attention goes through _kv_attention (needs transformers' AttentionInterface)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _kv_attention)
    m = copy.deepcopy(model).eval()
    m.config._attn_implementation = ATTN_NAME
    for sub in m.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not m.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_NAME
    return m


_KV_COPIES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _kv_copy(model: Any) -> Any:
    """_use_kv_attention(model), made once per model (parity calls the reference sampler many times)."""
    if model not in _KV_COPIES:
        _KV_COPIES[model] = _use_kv_attention(model)
    return _KV_COPIES[model]


@dataclass
class CacheGraphs:
    """The two graphs of the cached modes and what the runtime needs to drive them."""

    encode: onnx.ModelProto  # input_ids [1, S] -> logits [1, S, V], present_key_i / present_value_i [1, H, S, D]
    block: onnx.ModelProto  # input_ids [1, T], position_ids [1, T], past_positions [P], past_* -> logits [1, T, V]
    layers: int
    position_offset: int  # position id of the first token (RoBERTa counts from padding_idx + 1)
    max_abs_diff: float  # block graph with a fresh cache vs the full forward, in PyTorch (must be ~0)


def _position_offset(model: Any) -> int:
    if str(getattr(model.config, "model_type", "")) in {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"}:
        return int(model.config.pad_token_id) + 1
    return 0


def prompt_isolated(model: Any) -> bool:
    """Whether the model was trained with prompt positions that do not attend to the answer (config attribute
    ``attention_prompt_isolated``): their keys/values never change, so the prompt's cache is exact."""
    return bool(getattr(model.config, "attention_prompt_isolated", False))


def _encode_torch(m: Any, ids: Any, prompt_len: Any = None, record: bool = True) -> tuple[Any, list[Any]]:
    _CTX.mode, _CTX.kv, _CTX.prompt_len = ("encode" if record else "full"), [], prompt_len
    try:
        logits = m(input_ids=ids, attention_mask=None).logits
        kv = [t for pair in _CTX.kv for t in pair]
    finally:
        _CTX.mode, _CTX.kv, _CTX.prompt_len = None, [], None
    return logits, kv


class PromptIsolation:
    """Train or run a masked LM with prompt-isolated attention through edgekit's attention function: inside the
    ``with`` block, ``model`` (its config switched to the function) hides the answer from prompt positions."""

    def __init__(self, model: Any, prompt_len: int) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, _kv_attention)
        self.model, self.prompt_len = model, prompt_len

    def __enter__(self) -> Any:
        self._saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = ATTN_NAME
        _CTX.mode, _CTX.prompt_len = "full", self.prompt_len
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.config._attn_implementation = self._saved
        _CTX.mode, _CTX.prompt_len = None, None


def _block_torch(m: Any, ids: Any, position_ids: Any, past_positions: Any, past: Sequence[Any]) -> Any:
    import torch

    _CTX.mode, _CTX.past, _CTX.layer = "block", past, 0
    _CTX.q_pos = position_ids[0]
    _CTX.k_pos = torch.cat([past_positions, position_ids[0]])
    try:
        return m(input_ids=ids, position_ids=position_ids, attention_mask=None).logits
    finally:
        _CTX.mode, _CTX.past, _CTX.q_pos, _CTX.k_pos = None, (), None, None


def build_cached_denoisers(model: Any) -> CacheGraphs:
    """Export the encode and block graphs used by the prefix and dual cache modes (Fast-dLLM's approximate KV cache).

    Raises UnsupportedModelError when the model's attention does not go through transformers' AttentionInterface,
    or when its block forward with a fresh cache does not reproduce the full forward (checked in PyTorch first)."""
    import torch

    from edgekit.runtimes.errors import UnsupportedModelError

    m = _use_kv_attention(model)
    offset = _position_offset(model)
    n = 24
    vocab = int(model.config.vocab_size)
    ids = ((torch.arange(n) * 7 + 3) % vocab)[None, :]  # any valid ids: the check compares two forwards of them
    isolated = prompt_isolated(model)
    lo, hi = 10, 18  # dual-cache layout: prefix [0, lo), block [lo, hi), suffix [hi, n); the prompt is [0, lo)
    with torch.no_grad():
        full, kv = _encode_torch(m, ids, torch.tensor(lo) if isolated else None)
        layers = len(kv) // 2
        if layers == 0:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, so edgekit "
                "cannot give it a KV cache. HINT: use cache mode 'none' (the full-sequence denoiser).")
        ref = full if isolated else model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        keep = torch.cat([torch.arange(lo), torch.arange(hi, n)])
        past = [t[:, :, keep] for t in kv]
        pos = torch.arange(lo, hi)[None] + offset
        got = _block_torch(m, ids[:, lo:hi], pos, keep + offset, past)
    diff = max(float((full - ref).abs().max()), float((got - ref[:, lo:hi]).abs().max()))
    if not diff <= 1e-3:
        raise UnsupportedModelError(
            f"{type(model).__name__}: a cached block forward differs from the full forward by {diff:.3g} in PyTorch "
            "(attention or position handling edgekit does not model). HINT: use cache mode 'none'.")

    class Encode(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any) -> Any:
            logits, kv = _encode_torch(self.inner, input_ids)
            return (logits, *kv)

    class EncodeIsolated(Encode):
        def forward(self, input_ids: Any, prompt_length: Any) -> Any:  # type: ignore[override]
            logits, kv = _encode_torch(self.inner, input_ids, prompt_length[0])
            return (logits, *kv)

    class Block(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, position_ids: Any, past_positions: Any, *past: Any) -> Any:
            return _block_torch(self.inner, input_ids, position_ids, past_positions, past)

    limit = int(getattr(model.config, "max_position_embeddings", 512))
    kv_names = [f"{w}_{kind}_{i}" for i in range(layers) for kind in ("key", "value") for w in ("present",)]
    past_names = [n.replace("present", "past") for n in kv_names]
    seq = torch.export.Dim("sequence", min=2, max=limit)
    tok = torch.export.Dim("block", min=1, max=limit)
    cached = torch.export.Dim("cached", min=1, max=limit)
    torch._dynamo.reset()
    try:
        if isolated:
            enc = torch.onnx.export(EncodeIsolated(m), (ids, torch.tensor([lo])),
                                    input_names=["input_ids", "prompt_length"], output_names=["logits", *kv_names],
                                    dynamic_shapes=({1: seq}, None), dynamo=True, verbose=False).model_proto
        else:
            enc = torch.onnx.export(Encode(m), (ids,), input_names=["input_ids"], output_names=["logits", *kv_names],
                                    dynamic_shapes=({1: seq},), dynamo=True, verbose=False).model_proto
        torch._dynamo.reset()
        blk = torch.onnx.export(
            Block(m), (ids[:, lo:hi], pos, keep + offset, *past),
            input_names=["input_ids", "position_ids", "past_positions", *past_names], output_names=["logits"],
            dynamic_shapes=({1: tok}, {1: tok}, {0: cached}, tuple({2: cached} for _ in past)),
            dynamo=True, verbose=False).model_proto
    except Exception as e:  # torch.export raises many types for graphs it cannot capture
        raise ExportError(f"torch.onnx could not export the cached graphs of {type(model).__name__}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    finally:
        _CTX.mode = None
    return CacheGraphs(enc, blk, layers, offset, diff)


def _schedule(masked: int, steps: int) -> list[int]:
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def reference_generate(model: Any, prompt_ids: Sequence[int], params: DiffusionParams, mask_id: int,
                       stop_ids: set[int], on_step: Callable[[int, np.ndarray], None] | None = None) -> list[int]:
    """The sampler in torch on the PyTorch model, no cache: the generated ids (cut before a stop token)."""
    import torch

    rng = np.random.default_rng(params.seed)
    p0 = len(prompt_ids)
    x = torch.tensor(list(prompt_ids) + [mask_id] * params.gen_length)
    isolated = _kv_copy(model) if prompt_isolated(model) else None  # runs the model's attention rule
    out: list[int] = []
    n_step = 0
    for b in range(params.gen_length // params.block_length):
        lo, hi = p0 + b * params.block_length, p0 + (b + 1) * params.block_length
        schedule = _schedule(params.block_length, params.steps_per_block)
        step = 0
        while bool((x[lo:hi] == mask_id).any()):
            with torch.no_grad():
                if isolated is not None:
                    logits = _encode_torch(isolated, x[None], torch.tensor(p0), record=False)[0][0].double()
                else:
                    logits = model(input_ids=x[None], attention_mask=torch.ones_like(x)[None]).logits[0].double()
            if on_step is not None:
                on_step(n_step, logits[lo:hi].float().numpy())
            n_step += 1
            pos = lo + torch.nonzero(x[lo:hi] == mask_id).flatten()
            lg = logits[pos]
            filt = lg.clone()
            if params.top_k and params.top_k < filt.shape[-1]:
                kth = torch.topk(filt, params.top_k, dim=-1).values[:, -1:]
                filt = torch.where(filt < kth, torch.tensor(-torch.inf, dtype=filt.dtype), filt)
            if params.top_p < 1.0:
                sp, si = torch.sort(torch.softmax(filt, -1), dim=-1, descending=True)
                drop_sorted = torch.cumsum(sp, -1) - sp >= params.top_p
                drop = torch.zeros_like(drop_sorted).scatter(-1, si, drop_sorted)
                filt = filt.masked_fill(drop, -torch.inf)
            if params.temperature > 0:
                u = torch.from_numpy(rng.random(tuple(filt.shape)))
                x0 = torch.argmax(filt / params.temperature - torch.log(-torch.log(u)), dim=-1)
            else:
                x0 = torch.argmax(filt, dim=-1)
            p = torch.softmax(lg, -1)
            p_x0 = p.gather(-1, x0[:, None])[:, 0]
            rule = Remasking(params.remasking)
            if rule is Remasking.LOW_CONFIDENCE:
                conf = p_x0
            elif rule is Remasking.RANDOM:
                conf = torch.from_numpy(rng.random(len(pos)))
            elif rule is Remasking.MARGIN:
                top2 = torch.topk(p, 2, dim=-1).values
                conf = top2[:, 0] - top2[:, 1]
            else:
                conf = (p * torch.log(p + 1e-30)).sum(-1)
            order = torch.argsort(-conf, stable=True)
            if params.threshold is not None:
                chosen = torch.nonzero(p_x0 > params.threshold).flatten()
                if len(chosen) == 0:
                    chosen = order[:1]
            elif params.entropy_bound is not None:
                h = -(p * torch.log(p + 1e-30)).sum(-1)[order]
                fits = torch.cumsum(h, 0) - torch.cummax(h, 0).values <= params.entropy_bound
                chosen = order[: max(int(fits.sum()), 1)]
            else:
                k = schedule[step] if step < len(schedule) else len(pos)
                chosen = order[: max(k, 1)]
            x[pos[chosen]] = x0[chosen]
            step += 1
        block = [int(t) for t in x[lo:hi]]
        stop_at = next((i for i, t in enumerate(block) if t in stop_ids), None)
        out.extend(block if stop_at is None else block[:stop_at])
        if stop_at is not None:
            break
    return out
