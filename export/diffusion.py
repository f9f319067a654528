"""Diffusion LMs on the export side: the denoiser graphs (torch.onnx) of a masked LM and their bundle entries.

The cached graphs (prefix/dual modes) and prompt-isolated models run attention through edgekit's own function,
registered in transformers' AttentionInterface with an explicit per-model context (``KVAttention``). Parity runs the
runtime's one sampler over the PyTorch model's logits (``reference_logits``), not a copy of the sampler.
"""

from __future__ import annotations

import copy
import functools
import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgekit.runtimes.errors import ExportError, UnsupportedModelError

if TYPE_CHECKING:
    from pathlib import Path

    from edgekit.export.manifest import Built
    from edgekit.export.plan import Plan
    from edgekit.export.progress import Progress
    from edgekit.export.source import SourceRef

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


_NAMES = itertools.count()


def _kv_attention(ctx: _KVContext, module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                  scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """An attention function for transformers' AttentionInterface (query/key/value [B, H, S, D], after rotary),
    bound to one model's context. Bidirectional, with the module's sliding window if it has one; the HF mask is not
    used (batch 1, no padding)."""
    import torch

    s = query.shape[2]
    if ctx.mode == "block":
        pk, pv = ctx.past[2 * ctx.layer], ctx.past[2 * ctx.layer + 1]
        ctx.layer += 1
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        q_pos, k_pos = ctx.q_pos, ctx.k_pos
    else:  # "encode" records the keys/values; "full" (training, reference) does not
        if ctx.mode == "encode":
            ctx.kv.append((key, value))
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
    if ctx.prompt_len is not None and ctx.mode != "block":  # (block queries are answer positions: no limit)
        hidden = (q_pos[:, None] < ctx.prompt_len) & (k_pos[None, :] >= ctx.prompt_len)
        scores = scores.masked_fill(hidden[None, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register(ctx: _KVContext) -> str:
    """Register the attention function bound to ``ctx`` under a name of its own; return the name."""
    from transformers import AttentionInterface

    name = f"edgekit_kv_{next(_NAMES)}"
    AttentionInterface.register(name, functools.partial(_kv_attention, ctx))
    return name


class KVAttention:
    """A copy of a masked LM whose attention runs through edgekit's function with its own context: ``encode``
    records every layer's keys/values, ``block`` runs tokens against cached ones (needs AttentionInterface)."""

    def __init__(self, model: Any) -> None:
        self.ctx = _KVContext()
        self.model = copy.deepcopy(model).eval()
        self.model.set_attn_implementation(_register(self.ctx))

    def encode(self, ids: Any, prompt_len: Any = None, record: bool = True) -> tuple[Any, list[Any]]:
        ctx = self.ctx
        ctx.mode, ctx.kv, ctx.prompt_len = ("encode" if record else "full"), [], prompt_len
        try:
            logits = self.model(input_ids=ids, attention_mask=None).logits
            kv = [t for pair in ctx.kv for t in pair]
        finally:
            ctx.mode, ctx.kv, ctx.prompt_len = None, [], None
        return logits, kv

    def block(self, ids: Any, position_ids: Any, past_positions: Any, past: Sequence[Any]) -> Any:
        import torch

        ctx = self.ctx
        ctx.mode, ctx.past, ctx.layer = "block", past, 0
        ctx.q_pos = position_ids[0]
        ctx.k_pos = torch.cat([past_positions, position_ids[0]])
        try:
            return self.model(input_ids=ids, position_ids=position_ids, attention_mask=None).logits
        finally:
            ctx.mode, ctx.past, ctx.q_pos, ctx.k_pos = None, (), None, None


_KV_COPIES: weakref.WeakKeyDictionary[Any, KVAttention] = weakref.WeakKeyDictionary()


def reference_logits(model: Any, tokens: np.ndarray, prompt_len: int) -> np.ndarray:
    """The PyTorch model's logits [S, V] for a whole sequence, under the attention rule the bundle runs
    (prompt-isolated models through edgekit's attention function, made once per model)."""
    import torch

    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        if prompt_isolated(model):
            if model not in _KV_COPIES:
                _KV_COPIES[model] = KVAttention(model)
            logits = _KV_COPIES[model].encode(ids, torch.tensor(prompt_len), record=False)[0]
        else:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[0].float().numpy()


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


class PromptIsolation:
    """Train or run a masked LM with prompt-isolated attention through edgekit's attention function: inside the
    ``with`` block, ``model`` hides the answer from prompt positions."""

    def __init__(self, model: Any, prompt_len: int) -> None:
        self.model, self.ctx = model, _KVContext()
        self.ctx.mode, self.ctx.prompt_len = "full", prompt_len
        self._name = _register(self.ctx)

    def __enter__(self) -> Any:
        self._saved = self.model.config._attn_implementation
        self.model.set_attn_implementation(self._name)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.set_attn_implementation(self._saved)


def build_cached_denoisers(model: Any) -> CacheGraphs:
    """Export the encode and block graphs used by the prefix and dual cache modes (Fast-dLLM's approximate KV cache).

    Raises UnsupportedModelError when the model's attention does not go through transformers' AttentionInterface,
    or when its block forward with a fresh cache does not reproduce the full forward (checked in PyTorch first)."""
    import torch

    kva = KVAttention(model)
    offset = _position_offset(model)
    n = 24
    vocab = int(model.config.vocab_size)
    ids = ((torch.arange(n) * 7 + 3) % vocab)[None, :]  # any valid ids: the check compares two forwards of them
    isolated = prompt_isolated(model)
    lo, hi = 10, 18  # dual-cache layout: prefix [0, lo), block [lo, hi), suffix [hi, n); the prompt is [0, lo)
    with torch.no_grad():
        full, kv = kva.encode(ids, torch.tensor(lo) if isolated else None)
        layers = len(kv) // 2
        if layers == 0:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, so edgekit "
                "cannot give it a KV cache. HINT: use cache mode 'none' (the full-sequence denoiser).")
        ref = full if isolated else model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        keep = torch.cat([torch.arange(lo), torch.arange(hi, n)])
        past = [t[:, :, keep] for t in kv]
        pos = torch.arange(lo, hi)[None] + offset
        got = kva.block(ids[:, lo:hi], pos, keep + offset, past)
    diff = max(float((full - ref).abs().max()), float((got - ref[:, lo:hi]).abs().max()))
    if not diff <= 1e-3:
        raise UnsupportedModelError(
            f"{type(model).__name__}: a cached block forward differs from the full forward by {diff:.3g} in PyTorch "
            "(attention or position handling edgekit does not model). HINT: use cache mode 'none'.")

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = kva.model  # (a submodule, so the exporter sees its weights)

    class Encode(Graph):
        def forward(self, input_ids: Any) -> Any:
            logits, kv = kva.encode(input_ids)
            return (logits, *kv)

    class EncodeIsolated(Graph):
        def forward(self, input_ids: Any, prompt_length: Any) -> Any:
            logits, kv = kva.encode(input_ids, prompt_length[0])
            return (logits, *kv)

    class Block(Graph):
        def forward(self, input_ids: Any, position_ids: Any, past_positions: Any, *past: Any) -> Any:
            return kva.block(input_ids, position_ids, past_positions, past)

    limit = int(getattr(model.config, "max_position_embeddings", 512))
    kv_names = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    past_names = [n.replace("present", "past") for n in kv_names]
    seq = torch.export.Dim("sequence", min=2, max=limit)
    tok = torch.export.Dim("block", min=1, max=limit)
    cached = torch.export.Dim("cached", min=1, max=limit)
    torch._dynamo.reset()
    try:
        if isolated:
            enc = torch.onnx.export(EncodeIsolated(), (ids, torch.tensor([lo])),
                                    input_names=["input_ids", "prompt_length"], output_names=["logits", *kv_names],
                                    dynamic_shapes=({1: seq}, None), dynamo=True, verbose=False).model_proto
        else:
            enc = torch.onnx.export(Encode(), (ids,), input_names=["input_ids"], output_names=["logits", *kv_names],
                                    dynamic_shapes=({1: seq},), dynamo=True, verbose=False).model_proto
        torch._dynamo.reset()
        blk = torch.onnx.export(
            Block(), (ids[:, lo:hi], pos, keep + offset, *past),
            input_names=["input_ids", "position_ids", "past_positions", *past_names], output_names=["logits"],
            dynamic_shapes=({1: tok}, {1: tok}, {0: cached}, tuple({2: cached} for _ in past)),
            dynamo=True, verbose=False).model_proto
    except Exception as e:  # torch.export raises many types for graphs it cannot capture
        raise ExportError(f"torch.onnx could not export the cached graphs of {type(model).__name__}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    finally:
        kva.ctx.mode = None
    return CacheGraphs(enc, blk, layers, offset, diff)


STAGES = 2  # progress stages of ``build``


def build(plan: Plan, ref: SourceRef, model: Any, tokenizer: Any, stage: Path, progress: Progress,
          reference: Any = None) -> Built:
    """A masked LM as a diffusion bundle: the whole-sequence denoiser graph and, when the model's attention allows,
    the encode/block graphs of the cached modes; written into ``stage``. Returns its manifest entries."""
    from edgekit.export import onnx_graph
    from edgekit.export.manifest import Built
    from edgekit.runtimes.bundle import DiffusionGraphs, GraphSpec
    from edgekit.runtimes.diffusion_params import DiffusionParams
    from edgekit.runtimes.unmasking import CACHE_MODES

    mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else getattr(
        model.config, "mask_token_id", None)
    if mask_id is None:
        raise UnsupportedModelError(
            f"'{ref.spec}' has no mask token in its tokenizer; a diffusion LM needs one to mark the positions it "
            "generates. HINT: set tokenizer.mask_token and re-save the folder.")
    isolated = prompt_isolated(model)
    graphs = {"denoiser": GraphSpec("model.onnx", ("input_ids", "attention_mask"), ("logits",))}
    with progress.stage(f"Building the ONNX denoiser graph ({plan.spec.architecture}, torch.onnx)"):
        if not isolated:  # (a prompt-isolated model's whole-sequence graph is the encode graph below)
            onnx_graph.save_model(build_denoiser(model), stage / "model.onnx")
    notes: dict[str, Any] = {}
    with progress.stage("Building the cached graphs (prefix / dual cache: encode + block)"):
        try:
            cached: CacheGraphs | None = build_cached_denoisers(model)
        except UnsupportedModelError as e:
            if isolated:
                raise UnsupportedModelError(f"'{ref.spec}' declares prompt-isolated attention "
                                            f"(attention_prompt_isolated), which edgekit runs through its own "
                                            f"attention function, but: {e}") from None
            cached, notes = None, {"cache_modes_unavailable": str(e)}
            progress.note(f"no cache modes: {e}")
    if cached is not None:
        onnx_graph.save_model(cached.encode, stage / "encode.onnx")
        onnx_graph.save_model(cached.block, stage / "block.onnx")
        kv = tuple(f"{k}_{i}" for i in range(cached.layers) for k in ("key", "value"))
        enc_inputs = ("input_ids", "prompt_length") if isolated else ("input_ids",)
        graphs["denoise_encode"] = GraphSpec("encode.onnx", enc_inputs, ("logits", *(f"present_{n}" for n in kv)))
        if isolated:
            graphs["denoiser"] = graphs["denoise_encode"]
        graphs["denoise_block"] = GraphSpec(
            "block.onnx", ("input_ids", "position_ids", "past_positions", *(f"past_{n}" for n in kv)), ("logits",))
        notes = {"torch_block_vs_full_max_abs_diff": cached.max_abs_diff}
    gen_length = min(DiffusionParams.gen_length, plan.max_context // 2)
    defaults = DiffusionParams(gen_length=gen_length, block_length=min(DiffusionParams.block_length, gen_length),
                               diffusion_steps=gen_length)
    generation = {k: getattr(defaults, k) for k in ("gen_length", "block_length", "diffusion_steps", "remasking",
                                                     "threshold")}
    return Built(graphs=graphs, generation=generation, add_special_tokens=False, mask_id=int(mask_id),
                 diffusion=DiffusionGraphs(attention="prompt_isolated" if isolated else "bidirectional",
                                           cache_modes=CACHE_MODES if cached is not None else ("none",),
                                           position_offset=cached.position_offset if cached is not None else 0),
                 extra={"diffusion_cache": notes})
