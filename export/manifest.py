"""The one manifest builder: what every bundle records (tokenizer, special tokens, device, provenance), plus what a
model-specific export produced (its graphs, KV layout, quantization record and generation defaults)."""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekit.export.plan import Plan
from edgekit.export.source import SourceRef
from edgekit.runtimes import backend, cpu
from edgekit.runtimes import bundle as bdl

# Tokens that end a chat turn in common templates, most specific first.
TURN_END_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Built:
    """What a model-specific export wrote into the staging folder and what its manifest needs."""

    graphs: dict[str, bdl.GraphSpec]
    generation: dict[str, Any]
    add_special_tokens: bool = True  # False for dLLMs: the prompt is followed by mask tokens, not by [SEP]
    mask_id: int | None = None
    kind: str | None = None  # overrides the registry record's kind (an AR family checkpoint trained as a block dLLM)
    kv_cache: bdl.KVCacheLayout | None = None
    quantization: bdl.Quantization | None = None
    block_attention: bdl.BlockAttention | None = None
    diffusion: bdl.DiffusionGraphs | None = None
    disabled_optimizers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # shown to people only (the runtime never reads it)
    # run on the bundle once it loads (e.g. its quality report); returns more ``extra`` fields
    check: Callable[[Any, Path], Mapping[str, Any]] | None = None


def special_tokens(model: Any, tokenizer: Any, mask_id: int | None) -> bdl.SpecialTokens:
    """EOS ids (generation config and tokenizer; [SEP] for encoders), the chat turn-end token, BOS/CLS, mask."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if fallback is not None:
        eos_ids.append(fallback)
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    turn_end = next((vocab[t] for t in TURN_END_TOKENS if t in vocab and t in template), None)
    stop = sorted({*eos_ids, *([turn_end] if turn_end is not None else [])})
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    return bdl.SpecialTokens(bos_id=bos, eos_id=eos_ids[0] if eos_ids else None, pad_id=tokenizer.pad_token_id,
                             turn_end_id=turn_end, mask_id=mask_id, stop_ids=tuple(stop))


def build(plan: Plan, ref: SourceRef, arch: str, model: Any, tokenizer: Any, built: Built) -> bdl.Manifest:
    specials = {k: getattr(tokenizer, k, None) for k in bdl.SPECIAL_TOKEN_NAMES}
    device = plan.device
    return bdl.Manifest(
        kind=built.kind or plan.spec.kind,
        architecture=arch,
        model_type=str(model.config.model_type),
        precision=plan.precision,
        max_context=plan.max_context,
        vocab_size=int(model.config.vocab_size),
        graphs=built.graphs,
        tokens=special_tokens(model, tokenizer, built.mask_id),
        tokenizer=bdl.TokenizerSpec(
            file="tokenizer.json",
            chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
            add_special_tokens=built.add_special_tokens,
            special_token_strings={k: (str(v) if v is not None else None) for k, v in specials.items()},
        ),
        kv_cache=built.kv_cache,
        generation=built.generation,
        runtime=runtime_spec(plan, built),
        quantization=built.quantization,
        block_attention=built.block_attention,
        diffusion=built.diffusion,
        provenance=provenance(ref, plan.spec.family),
        extra={**built.extra, "device": device.name if device else None,
               "fit": plan.fit.to_dict() if plan.fit else None},
    )


def runtime_spec(plan: Plan, built: Built) -> bdl.RuntimeSpec:
    """Providers, their options and session config for the plan's target (its record's, plus the plan's)."""
    target = plan.graph_target
    options = {provider: dict(opts) for provider, opts in target.provider_options.items()}
    config = dict(target.quantized_session_config) if plan.method is not None else {}
    if plan.quant_format == "qdq":  # where onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits (the CPU and
        # CUDA EPs), at the bundle's accuracy level, not its default of 4 (int8 activations TensorRT would not use)
        config["session.qdq_matmulnbits_accuracy_level"] = str(plan.accuracy_level)
    if target.tensorrt_options and built.kv_cache is not None:
        options[backend.TENSORRT] = {"trt_fp16_enable": str(plan.kv_cache == "fp16"), "trt_int8_enable": "False",
                                     **backend.tensorrt_profiles(built.kv_cache, plan.max_context, plan.batch)}
    device = plan.device  # a device profile narrows the target's providers to those the device has
    providers = tuple(p for p in target.providers if device is None or p in device.execution_providers)
    return bdl.RuntimeSpec(providers=providers, disabled_optimizers=built.disabled_optimizers,
                           target=plan.target, provider_options=options, session_config=config)


def provenance(ref: SourceRef, family: str) -> dict[str, Any]:
    versions = {}
    for dist in ("edgekit", "torch", "transformers", "onnx", "onnxruntime", "gguf", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    src = ref.folder / ref.gguf_file if ref.gguf_file else ref.folder
    return {
        "source": ref.spec,
        "source_path": str(src),
        "source_sha256": bdl.sha256_file(src) if src.is_file() else None,
        "description": ref.label,
        "family": family,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": versions,
        "cpu": cpu.describe(),  # int8-activation numerics depend on the CPU's kernels (runtimes/cpu.py)
    }
