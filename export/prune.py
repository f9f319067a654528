"""Structured pruning of a PyTorch decoder before export, ranked by importance measured on calibration text.

  depth=N      drop the N decoder layers that change their input least (1 - cosine(input, output), "block influence")
  width=F      remove the fraction F of FFN channels with the lowest activation-aware importance
               (mean |silu(gate) * up| over calibration tokens x the L2 norm of the matching down_proj column)
  sparsity=2:4 zero 2 of every 4 consecutive input weights of each linear (Wanda score |W| x ||x||), the pattern
               Ampere/Orin sparse tensor cores accelerate; recorded in the manifest for the TensorRT path

No healing (fine-tuning) follows: on small models the quality cost is large, and the parity / quality reports
show it against the unpruned model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgekit.export.prompts import read_user_text
from edgekit.runtimes.errors import ConfigError, UnsupportedModelError

CALIBRATION_TEXT = (
    "The history of science is full of surprising turns. Early astronomers tracked the planets by eye, and their "
    "careful tables later let Kepler find the laws of orbital motion. In the kitchen, bread rises because yeast "
    "turns sugar into carbon dioxide. A good night's sleep helps memory, and a short walk can clear the mind.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "User: What is the capital of Japan?\nAssistant: The capital of Japan is Tokyo.\n"
    "光合作用是植物利用阳光把二氧化碳和水转化为糖的过程。"
)


@dataclass(frozen=True)
class PruneSpec:
    method: str  # depth | width | sparsity
    amount: float  # layers to drop (depth), fraction of FFN channels (width), or n of n:m (sparsity)
    m: int = 4

    def label(self) -> str:
        if self.method == "depth":
            return f"depth={int(self.amount)}"
        if self.method == "width":
            return f"width={self.amount:g}"
        return f"sparsity={int(self.amount)}:{self.m}"


def parse(text: str) -> PruneSpec:
    """'depth=4', 'width=0.25' or 'sparsity=2:4'."""
    m = re.fullmatch(r"\s*(depth|width|sparsity)\s*=\s*([0-9.:]+)\s*", text or "")
    if not m:
        raise ConfigError(f"--prune must look like depth=N, width=F or sparsity=2:4, got {text!r}.")
    method, value = m.groups()
    try:
        if method == "depth":
            return PruneSpec("depth", int(value))
        if method == "width":
            f = float(value)
            if not 0 < f < 1:
                raise ValueError
            return PruneSpec("width", f)
        n, mm = (int(v) for v in value.split(":"))
        if (n, mm) != (2, 4):
            raise ValueError
        return PruneSpec("sparsity", 2, 4)
    except ValueError:
        raise ConfigError(f"--prune {method}: bad amount {value!r} (depth: a whole number of layers; width: a fraction "
                          "between 0 and 1; sparsity: 2:4).") from None


def read_calibration(path: str | None) -> str:
    return read_user_text(path, CALIBRATION_TEXT, "calibration file")


def check_amount(spec: PruneSpec, config: Any) -> None:
    """Refuse a prune that would remove everything (before any heavy work)."""
    layers = config.num_hidden_layers
    if spec.method == "depth" and not 1 <= spec.amount <= layers - 1:
        raise ConfigError(f"--prune depth={int(spec.amount)} would leave {layers - int(spec.amount)} of {layers} "
                          f"layers; choose 1..{layers - 1}.")


def _calibration_ids(tokenizer: Any, text: str, max_tokens: int = 512) -> Any:
    import torch

    ids = tokenizer(text)["input_ids"][:max_tokens]
    return torch.tensor([ids])


def apply(model: Any, tokenizer: Any, spec: PruneSpec, calibration: str) -> dict[str, Any]:
    """Prune ``model`` in place; return what was done (for the manifest)."""
    import torch

    ids = _calibration_ids(tokenizer, calibration)
    layers = model.model.layers
    if spec.method == "depth":
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states  # L + 1 tensors [1, S, H]
        influence = []
        for i in range(len(layers)):
            cos = torch.nn.functional.cosine_similarity(hs[i][0].float(), hs[i + 1][0].float(), dim=-1)
            influence.append(float(1 - cos.mean()))
        # the last layer's output passes through the final norm: keep it (dropping it is known to hurt most)
        candidates = sorted(range(len(layers) - 1), key=lambda i: influence[i])[: int(spec.amount)]
        keep = [i for i in range(len(layers)) if i not in set(candidates)]
        model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
        for new_idx, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new_idx
        model.config.num_hidden_layers = len(keep)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in keep]
        return {"method": "depth", "removed_layers": sorted(candidates),
                "block_influence": [round(x, 5) for x in influence], "calibration_tokens": int(ids.shape[1])}

    if spec.method == "width":
        acts: dict[int, torch.Tensor] = {}
        hooks = []
        for i, layer in enumerate(layers):
            def hook(mod: Any, inp: Any, out: Any, i: int = i) -> None:
                acts[i] = inp[0][0].abs().mean(0)  # mean |input of down_proj| per channel: [I]
            hooks.append(layer.mlp.down_proj.register_forward_hook(hook))
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        kept_sizes = []
        if not all(hasattr(layer.mlp, "gate_proj") for layer in layers):
            raise UnsupportedModelError("--prune width needs separate gate/up projections (not Phi-3's fused one).")
        for i, layer in enumerate(layers):
            mlp = layer.mlp
            with torch.no_grad():
                score = acts[i] * mlp.down_proj.weight.norm(dim=0)
            n_keep = max(1, round(score.numel() * (1 - spec.amount)))
            keep = torch.sort(torch.topk(score, n_keep).indices).values
            mlp.gate_proj = _rows(mlp.gate_proj, keep)
            mlp.up_proj = _rows(mlp.up_proj, keep)
            mlp.down_proj = _cols(mlp.down_proj, keep)
            kept_sizes.append(int(n_keep))
        model.config.intermediate_size = kept_sizes[0]
        return {"method": "width", "ffn_fraction_removed": spec.amount, "ffn_channels_kept": kept_sizes,
                "calibration_tokens": int(ids.shape[1])}

    # 2:4 semi-structured sparsity, Wanda-style: score = |W| * ||x_in||, keep the top 2 of every 4 inputs
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    linears = {name: mod for name, mod in model.model.layers.named_modules() if isinstance(mod, torch.nn.Linear)}
    for name, mod in linears.items():
        def hook(m: Any, inp: Any, out: Any, name: str = name) -> None:
            norms[name] = inp[0][0].float().norm(dim=0)  # [in]
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    zeroed = total = 0
    with torch.no_grad():
        for name, mod in linears.items():
            w = mod.weight  # [out, in]
            score = (w.abs() * norms[name][None, :]).reshape(w.shape[0], -1, 4)
            drop = torch.topk(score, 2, dim=-1, largest=False).indices
            mask = torch.ones_like(score, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
            w.mul_(mask)
            zeroed += int((~mask).sum())
            total += mask.numel()
    return {"method": "sparsity", "pattern": "2:4", "axis": "input", "zeroed_fraction": zeroed / total,
            "calibration_tokens": int(ids.shape[1])}


def _rows(linear: Any, keep: Any) -> Any:
    import torch

    new = torch.nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


def _cols(linear: Any, keep: Any) -> Any:
    import torch

    new = torch.nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new
