"""Diffusion LMs on the export side: the denoiser graph (torch.onnx) and a PyTorch reference of the sampler.

The reference re-implements runtimes/denoiser.py's algorithm with torch ops on the full PyTorch model, drawing
random numbers from the same numpy Generator in the same order, so a bundle can be checked step by step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
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
    ids = (torch.arange(16) % 40 + 5)[None, :]  # a fixed example: the export must not depend on global RNG state
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
    out: list[int] = []
    n_step = 0
    for b in range(params.gen_length // params.block_length):
        lo, hi = p0 + b * params.block_length, p0 + (b + 1) * params.block_length
        schedule = _schedule(params.block_length, params.steps_per_block)
        step = 0
        while bool((x[lo:hi] == mask_id).any()):
            with torch.no_grad():
                logits = model(input_ids=x[None], attention_mask=torch.ones_like(x)[None]).logits[0].double()
            if on_step is not None:
                on_step(n_step, logits.float().numpy())
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
