"""The export plan: the user's ``ExportConfig`` merged with the device profile and the source, every option
validated against the tables in ``methods`` (and the memory fit checked) before any heavy work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.export import fit, floors, gguf, prune, quality
from edgekit.export.device import DeviceProfile, load_profile
from edgekit.export.methods import (
    ACCURACY_LEVELS,
    BLOCK_SIZES,
    KV_DTYPES,
    LM_HEADS,
    METHODS,
    PRECISIONS,
    QUANT_FORMATS,
    W8A8_MEASURED,
    QuantMethod,
)
from edgekit.export.registry import GGUF_FAMILIES, ArchSpec
from edgekit.export.source import SourceRef
from edgekit.export.targets import TARGETS, Target
from edgekit.runtimes.errors import ConfigError, did_you_mean

DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how. ``None`` means: the device profile's default if a device is given, else the
    built-in default (fp32; gguf carry-over when the source's blocks fit the precision, else rtn; the method's
    accuracy level; the model's context up to 8192)."""

    source: str
    output: Path
    precision: str | None = None
    algo: str | None = None
    block_size: int = 32
    accuracy_level: int | None = None
    lm_head: str | None = None  # gguf: "fp32" (exact) or "int8" (Q8_0 blocks, int8 activations)
    quant_format: str | None = None  # "nbits" (MatMulNBits, default) or "qdq" (DequantizeLinear + MatMul)
    kv_cache: str | None = None  # int8/int4: "fp32" (default) or "fp16" (fp16 activations and KV cache)
    target: str | None = None  # cpu | cuda | tensorrt (the graph's flavour) [cuda for GPU device profiles, else cpu]
    max_context: int | None = None
    batch: int = 1
    device: str | None = None
    prune: str | None = None  # depth=N | width=F | sparsity=2:4
    calibration: str | None = None  # a text file for pruning importance / calibration (a built-in text otherwise)
    eval_text: str | None = None  # a text file for the perplexity in the quality report (a built-in text otherwise)
    force: bool = False
    trust_remote_code: bool = False
    onnxruntime: str | None = None  # the oldest onnxruntime the bundle must run on [the device's, else any >= 1.20]


@dataclass(frozen=True)
class Plan:
    """Every choice made, nothing left to default. ``method`` is None for float precisions."""

    spec: ArchSpec
    precision: str
    method: QuantMethod | None
    block_size: int
    accuracy_level: int
    max_context: int
    device: DeviceProfile | None
    fit: fit.FitReport | None
    prune: prune.PruneSpec | None = None
    calibration_text: str = ""
    eval_text: str = ""
    lm_head: str = "fp32"
    quant_format: str = "nbits"
    kv_cache: str = "fp32"
    target: str = "cpu"
    batch: int = 1
    onnxruntime: floors.Release | None = None  # the oldest onnxruntime it must run on (None: any >= 1.20)

    def runs(self, release: floors.Release) -> bool:
        """Whether an op that needs onnxruntime >= ``release`` may be written (the bundle's floor allows it)."""
        return self.onnxruntime is None or self.onnxruntime >= release

    @property
    def bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.precision)

    @property
    def calibrated(self) -> bool:
        """Whether quantization runs the float graph on calibration text (GPTQ)."""
        return self.method is not None and self.method.calibrated

    @property
    def graph_target(self) -> Target:
        """The record of the graph's target."""
        return TARGETS[self.target]

    @property
    def tolerance(self) -> str:
        if self.method is None:
            return self.precision
        return self.method.tolerance(self.precision, self.accuracy_level, self.kv_cache)

    def label(self) -> str:
        target = "" if self.graph_target.baseline else f", {self.target} target"
        return self.precision + (f" {self.method.name}, accuracy level {self.accuracy_level}" if self.method
                                 else "") + target


def choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        near = did_you_mean(str(value), [str(a) for a in allowed])
        raise ConfigError(f"Unknown {name} {value!r}. Choose one of: {', '.join(map(str, allowed))}.{near}")


def max_context(config: Any, requested: int | None, default: int = DEFAULT_MAX_CONTEXT) -> int:
    limit = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_CONTEXT) or DEFAULT_MAX_CONTEXT)
    if requested is None:
        return min(limit, default)
    if not 16 <= requested <= limit:
        raise ConfigError(f"max_context must be between 16 and the model's limit {limit}, got {requested}.")
    return requested


def make_plan(cfg: ExportConfig, ref: SourceRef, config: Any, spec: ArchSpec) -> Plan:
    """Merge the options with the device profile and the source; validate them; check the memory fit."""
    profile = load_profile(cfg.device) if cfg.device else None
    precision = cfg.precision or (profile.default_precision if profile else "fp32")
    choice("precision", precision, PRECISIONS)
    target = cfg.target or ("cuda" if profile is not None and profile.kind in ("jetson", "gpu") else "cpu")
    choice("target", target, tuple(TARGETS))
    tgt = TARGETS[target]
    if profile is not None and tgt.providers[0] not in profile.execution_providers:
        raise ConfigError(f"--target {target} runs on {tgt.providers[0]}, which device {profile.name} does not have "
                          f"(it lists {', '.join(profile.execution_providers)}). HINT: drop --target (the device's "
                          "default), or pick the target of that provider.")
    choice("block size", cfg.block_size, BLOCK_SIZES)
    if cfg.batch < 1:
        raise ConfigError(f"batch must be >= 1, got {cfg.batch}.")
    if cfg.accuracy_level is not None:
        choice("accuracy level", cfg.accuracy_level, ACCURACY_LEVELS)
    if not spec.compressible and (precision != "fp32" or cfg.algo or cfg.prune or cfg.device or not tgt.baseline):
        raise ConfigError(f"{spec.architecture} bundles ({spec.kind}) are fp32 only for now: --precision/--algo/"
                          "--prune/--device/--target are not supported with this source yet.")
    pruning = prune.parse(cfg.prune) if cfg.prune else None
    if pruning is not None:
        prune.check_amount(pruning, config)
    inspection = gguf.inspect(ref.folder / ref.gguf_file) if ref.gguf_file else None
    method = _method(cfg, precision, ref, spec, inspection, pruning)
    fmt = _format(cfg, precision, method, tgt)
    kv_cache = _kv_cache(cfg, precision, method, tgt)
    if kv_cache == "fp32" and not tgt.fp32_attention and not getattr(config, "block_diffusion_length", 0):
        raise ConfigError(f"--target {target} computes attention with GroupQueryAttention, whose CUDA kernel takes "
                          "fp16/bf16 only: an fp32 graph would fall back to the CPU and copy its KV buffers every "
                          "layer and step. HINT: use --precision fp16, or int4/int8 without --kv-cache fp32 (fp16 "
                          "activations), or --target cpu.")
    ort = cfg.onnxruntime or (profile.onnxruntime if profile else None)
    ort_floor = floors.parse(ort, "--onnxruntime") if ort else None
    if ort_floor is not None and ort_floor < floors.OLDEST:
        raise ConfigError(f"--onnxruntime {ort}: edgekit's runtime needs onnxruntime >= {floors.show(floors.OLDEST)}. "
                          "HINT: upgrade the device's onnxruntime.")
    if ort_floor is not None and ort_floor < floors.NBITS_8BIT and method is not None and not method.gguf_source \
            and precision == "int8":
        raise ConfigError(f"--precision int8 --algo {method.name} writes 8-bit MatMulNBits, which onnxruntime "
                          f"{ort} cannot run (it needs >= {floors.show(floors.NBITS_8BIT)}). HINT: use --precision "
                          "int4 or fp16 for this onnxruntime.")
    lm_head = _lm_head(cfg, precision, method, ref, inspection, ort_floor)
    if not tgt.accuracy_levels and cfg.accuracy_level not in (None, 0):
        raise ConfigError(f"--accuracy-level {cfg.accuracy_level} picks onnxruntime's int8-activation CPU kernels; "
                          f"the {target} target's kernels ignore it. HINT: drop --accuracy-level, or use --target cpu.")
    accuracy = cfg.accuracy_level if cfg.accuracy_level is not None else (
        method.accuracy_level if method and tgt.accuracy_levels else 0)
    context = max_context(config, cfg.max_context, profile.default_max_context if profile else DEFAULT_MAX_CONTEXT)
    kv_bytes = 2 if kv_cache == "fp16" else 4
    report = fit.check(config, precision, context, cfg.batch, profile, cfg.block_size, kv_bytes) if profile else None
    return Plan(spec, precision, method, cfg.block_size, accuracy, context, profile, report, pruning,
                prune.read_calibration(cfg.calibration), quality.read_text(cfg.eval_text), lm_head, fmt, kv_cache,
                target, cfg.batch, ort_floor)


def _method(cfg: ExportConfig, precision: str, ref: SourceRef, spec: ArchSpec, inspection: gguf.Inspection | None,
            pruning: prune.PruneSpec | None) -> QuantMethod | None:
    if precision in ("fp32", "fp16"):
        if cfg.algo is not None:
            raise ConfigError(f"--algo {cfg.algo} applies to int8/int4 exports; this export is {precision}. "
                              "HINT: add --precision int4 (or int8).")
        return None
    if cfg.algo is not None:
        choice("quantization algorithm", cfg.algo, tuple(METHODS))
    bits = 4 if precision == "int4" else 8
    carries = (inspection is not None and spec.gguf_layout is not None and pruning is None
               and inspection.carries(bits))
    if pruning is not None and cfg.algo == "gguf":
        raise ConfigError("--prune changes the weights, so GGUF blocks cannot be carried over unchanged. "
                          "HINT: use --algo rtn or --algo hqq with --prune.")
    if cfg.algo == "gguf" and not carries:
        raise ConfigError(
            f"--algo gguf carries GGUF blocks over unchanged, which needs a GGUF source of a {'/'.join(GGUF_FAMILIES)} "
            f"layout whose linear weights are {'block-quantized' if bits == 4 else '8-bit types'}; '{ref.spec}' is "
            "not. "
            "HINT: use --algo rtn or --algo hqq.")
    method = METHODS[cfg.algo or ("gguf" if carries else "rtn")]
    if bits not in method.bits:
        raise ConfigError(f"{method.name.upper()} writes {'/'.join(map(str, method.bits))}-bit weights only; use "
                          f"--precision int{method.bits[0]} with --algo {method.name} (or --algo rtn for {precision}).")
    if cfg.block_size not in method.block_sizes:
        raise ConfigError(f"--algo {method.name} uses blocks of {'/'.join(map(str, method.block_sizes))}; "
                          f"--block-size {cfg.block_size} cannot apply.")
    return method


def _format(cfg: ExportConfig, precision: str, method: QuantMethod | None, tgt: Target) -> str:
    if cfg.quant_format is None and (method is None or tgt.quant_formats[0] == "nbits"):
        return "nbits"  # (float weights, or the form every method writes)
    fmt = cfg.quant_format or tgt.quant_formats[0]
    choice("quantization format", fmt, QUANT_FORMATS)
    if fmt not in tgt.quant_formats:  # (only nbits is ever refused: TensorRT's parser has no MatMulNBits)
        raise ConfigError(f"--quant-format {fmt} writes onnxruntime's MatMulNBits, which TensorRT cannot parse. "
                          f"HINT: drop --quant-format with --target {tgt.name} (it writes {tgt.quant_formats[0]}).")
    if fmt == "qdq" and precision == "int8":  # (also what --target tensorrt --precision int8 would be)
        raise ConfigError(f"--precision int8 --quant-format qdq (static W8A8) is refused: it measured {W8A8_MEASURED}. "
                          "HINT: use --precision int4 --quant-format qdq (weight-only), --precision fp16, or int8 in "
                          "the nbits format.")
    if method is not None and method.gguf_source and fmt == tgt.block_format:
        return fmt  # (qdq: the GGUF's 4-bit blocks as signed int4 behind DequantizeLinear)
    if method is None or fmt not in method.formats:
        writers = ", ".join(f"--algo {m.name}" for m in METHODS.values() if fmt in m.formats)
        raise ConfigError(f"--quant-format {fmt} (the graph form of the weights) is written by {writers}; this export "
                          f"is {precision}{' ' + method.name if method else ''}. "
                          "HINT: add --precision int4 --algo rtn.")
    return fmt


def _kv_cache(cfg: ExportConfig, precision: str, method: QuantMethod | None, tgt: Target) -> str:
    if cfg.kv_cache is None:  # GPU targets compute in fp16 unless the bundle is fp32
        return "fp16" if precision == "fp16" or (method is not None and tgt.fp16_quantized) else "fp32"
    choice("KV cache dtype", cfg.kv_cache, KV_DTYPES)
    if method is None and cfg.kv_cache != precision:
        raise ConfigError(f"--kv-cache {cfg.kv_cache} applies to int8/int4 exports; a {precision} bundle keeps its "
                          f"KV cache in {precision}. HINT: use --precision fp16 for an fp16 cache.")
    if cfg.kv_cache == "fp16" and method is not None and method.gguf_source and not tgt.fp16_quantized:
        raise ConfigError("--kv-cache fp16 with GGUF blocks is the CUDA flavour of the graph (mins as float zero "
                          "points). HINT: add --target cuda.")
    return cfg.kv_cache


def _lm_head(cfg: ExportConfig, precision: str, method: QuantMethod | None, ref: SourceRef,
             inspection: gguf.Inspection | None, ort: floors.Release | None) -> str:
    carried = method is not None and method.gguf_source
    if cfg.lm_head is not None:
        choice("lm_head precision", cfg.lm_head, LM_HEADS)
        if not carried:
            raise ConfigError(f"--lm-head {cfg.lm_head} chooses how a GGUF's output layer is carried over; this "
                              f"export is {precision}{' ' + method.name if method else ''}. HINT: drop --lm-head, or "
                              "use --algo gguf.")
    head_q8 = carried and inspection is not None and inspection.head_is_q8
    old = ort is not None and ort < floors.NBITS_8BIT  # (8-bit MatMulNBits and GatherBlockQuantized)
    if cfg.lm_head == "int8" and old:
        raise ConfigError(f"--lm-head int8 writes 8-bit MatMulNBits and GatherBlockQuantized, which onnxruntime "
                          f"{floors.show(ort)} cannot run (they need >= {floors.show(floors.NBITS_8BIT)}). HINT: use "
                          "--lm-head fp32 (exact) for this onnxruntime.")
    lm_head = cfg.lm_head or ("int8" if head_q8 and not old else "fp32")
    if lm_head == "int8" and not head_q8:
        raise ConfigError(f"--lm-head int8 carries the GGUF's Q8_0 output/embedding blocks over, but '{ref.spec}' has "
                          "none. HINT: use --lm-head fp32.")
    return lm_head
