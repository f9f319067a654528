"""Memory-fit check, run before any heavy work: weights + KV cache + workspace + runtime overhead vs a device budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.export.device import DeviceProfile
from edgekit.runtimes.errors import ConfigError


class FitError(ConfigError):
    """The model, at the chosen precision/context/batch, does not fit the device's memory budget."""


def bytes_per_weight(precision: str, block_size: int = 32) -> float:
    """Storage per transformer weight: integers plus one fp32 scale per block (and a block offset for int4)."""
    return {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + 4.0 / block_size, "int4": 0.5 + 8.0 / block_size}[precision]


@dataclass(frozen=True)
class FitReport:
    device: str
    precision: str
    max_context: int
    batch: int
    weights_mb: float
    kv_cache_mb: float
    workspace_mb: float
    overhead_mb: float
    budget_mb: float

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.kv_cache_mb + self.workspace_mb + self.overhead_mb

    @property
    def fits(self) -> bool:
        return self.total_mb <= self.budget_mb

    def line(self) -> str:
        return (f"{self.total_mb / 1024:.2f} GB = weights {self.weights_mb:.0f} MB + KV cache "
                f"{self.kv_cache_mb:.0f} MB "
                f"(context {self.max_context}, batch {self.batch}) + workspace {self.workspace_mb:.0f} MB + runtime "
                f"{self.overhead_mb:.0f} MB")

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "max_context": self.max_context,
                "batch": self.batch, "weights_mb": round(self.weights_mb, 1), "kv_cache_mb": round(self.kv_cache_mb, 1),
                "workspace_mb": round(self.workspace_mb, 1), "overhead_mb": self.overhead_mb,
                "total_mb": round(self.total_mb, 1), "budget_mb": self.budget_mb, "fits": self.fits}


def estimate(config: Any, precision: str, max_context: int, batch: int, device: DeviceProfile,
             block_size: int = 32, kv_bytes: int = 4) -> FitReport:
    """Estimate the memory a bundle needs on ``device`` from the model config alone (no weights loaded)."""
    h, n_layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    body = n_layers * (h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h + 3 * h * inter)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed_bytes = vocab * h * (1.0 + 4.0 / block_size if precision in ("int4", "int8") else bytes_per_weight(precision))
    head_bytes = 0.0 if tied and precision in ("fp32", "fp16") else vocab * h * bytes_per_weight(
        "int8" if precision == "int4" else precision, block_size)
    weights = body * bytes_per_weight(precision, block_size) + embed_bytes + head_bytes
    kv = 2 * n_layers * kv_heads * head_dim * max_context * batch * kv_bytes
    # a full-context prefill: MLP and attention activations for max_context tokens; on CPUs onnxruntime's attention
    # also materialises the [heads, S, T] probabilities, where GPU kernels (flash attention) do not
    act_bytes = 4 if precision != "fp16" else 2
    workspace = batch * max_context * (3 * inter + 6 * h) * act_bytes
    if device.compute_capability is None:  # (a CPU device: no GPU kernels)
        workspace += batch * heads * max_context * max_context * 4
    mb = 1024 * 1024
    return FitReport(device.name, precision, max_context, batch, weights / mb, kv / mb, workspace / mb,
                     float(device.runtime_overhead_mb), device.memory_budget_gb * 1024)


def check(config: Any, precision: str, max_context: int, batch: int, device: DeviceProfile,
          block_size: int = 32, kv_bytes: int = 4) -> FitReport:
    """Return the fit report, or raise FitError saying by how much it misses and what would make it fit."""
    report = estimate(config, precision, max_context, batch, device, block_size, kv_bytes)
    if report.fits:
        return report
    options = []
    for p in device.precisions:
        alt = estimate(config, p, max_context, batch, device, block_size)
        if alt.fits and alt.total_mb < report.total_mb:
            options.append(f"--precision {p} (needs {alt.total_mb / 1024:.2f} GB)")
    ctx = max_context // 2
    while ctx >= 256:
        alt = estimate(config, precision, ctx, batch, device, block_size)
        if alt.fits:
            options.append(f"--max-context {ctx} (needs {alt.total_mb / 1024:.2f} GB)")
            break
        ctx //= 2
    if batch > 1:
        options.append("a smaller --batch")
    options.append("--prune depth=N or width=F to remove layers or channels")
    over = report.total_mb - report.budget_mb
    raise FitError(
        f"The model does not fit device '{device.name}': it needs {report.line()}, but the budget is "
        f"{device.memory_budget_gb:.2f} GB ({over / 1024:.2f} GB over). To fit, try: " + "; ".join(options) + "."
    )
