"""The AR decoder export: weights from the PyTorch model (or carried from its GGUF) into the fused-op graph,
quantized as the plan says, with the quality report measured on the written bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export import gguf, onnx_graph, prompts, prune, quality, quantize
from edgekit.export.manifest import Built
from edgekit.export.plan import Plan
from edgekit.export.progress import Progress
from edgekit.export.registry import ArchSpec
from edgekit.export.source import SourceRef
from edgekit.runtimes import bundle as bdl
from edgekit.runtimes.errors import UnsupportedModelError

STAGES = 1  # progress stages of ``build`` (plus one when pruning)


def build(plan: Plan, ref: SourceRef, model: Any, tokenizer: Any, stage: Path, progress: Progress) -> Built:
    """Write ``model.onnx`` into ``stage``; return its manifest entries."""
    spec = plan.spec
    # the uncompressed model's outputs, taken before pruning so the quality report shows its cost
    baseline = quality.reference(model, prompts.prompt_ids(tokenizer, bool(tokenizer.chat_template)),
                                 tokenizer(plan.eval_text)["input_ids"], max_tokens=plan.max_context)
    pruning = None
    if plan.prune is not None:
        with progress.stage(f"Pruning ({plan.prune.label()}, importance from calibration text)"):
            pruning = prune.apply(model, tokenizer, plan.prune, plan.calibration_text)
            progress.note(", ".join(f"{k}: {v}" for k, v in pruning.items() if k != "block_influence"))
    with progress.stage(f"Building the ONNX graph ({spec.architecture}, {plan.label()})"):
        dims, weights = decoder_parts(model, spec, plan.max_context)
        graph, quant = _graph(plan, ref, model, tokenizer, dims, weights, progress)
        onnx_graph.save_model(graph, stage / "model.onnx")
        del graph

    def check(runtime: Any, bundle_dir: Path) -> dict[str, Any]:
        report = quality.evaluate(runtime, baseline, bundle_dir)
        progress.note(f"perplexity {report.perplexity:.3f} (reference {report.reference_perplexity:.3f}), "
                      f"top-1 {report.top1:.2%}, KL {report.kl:.2e}, {report.decode_tok_s:.1f} tok/s")
        return {"quality": report.to_dict()}

    return Built(
        graphs={"decoder": bdl.GraphSpec("model.onnx", onnx_graph.input_names(dims.num_layers),
                                         onnx_graph.output_names(dims.num_layers))},
        generation=generation_defaults(model),
        kv_cache=bdl.KVCacheLayout(dims.num_layers, dims.num_kv_heads, dims.head_dim,
                                   dtype="float16" if plan.kv_cache == "fp16" else "float32"),
        quantization=quant,
        # onnxruntime 1.31's QDQ propagation gives an int8-activation graph a uint8 zero point it then refuses
        disabled_optimizers=("QDQPropagationTransformer",) if quant and quant.activations == "int8" else (),
        extra={"attention": {"num_heads": dims.num_heads, "local_window": dims.local_window}, "pruning": pruning,
               "sparse_2_4": bool(pruning and pruning.get("pattern") == "2:4")},
        check=check,
    )


def _graph(plan: Plan, ref: SourceRef, model: Any, tokenizer: Any, dims: onnx_graph.DecoderDims,
           weights: onnx_graph.DecoderWeights, progress: Progress) -> tuple[Any, bdl.Quantization | None]:
    """The graph for the plan's precision, and the manifest's record of its quantization."""
    tick = lambda i: progress.tick(i + 1, dims.num_layers)  # noqa: E731
    method, bits = plan.method, plan.bits
    if method is None or bits is None:
        opts = onnx_graph.BuildOptions(dtype="float16" if plan.precision == "fp16" else "float32")
        return onnx_graph.build_decoder(dims, weights, on_layer=tick, options=opts), None
    record = dict(method=method.name, bits=bits, block_size=plan.block_size, accuracy_level=plan.accuracy_level,
                  tolerance=plan.tolerance, format=plan.quant_format, kv_cache=plan.kv_cache)
    if method.gguf_source:
        assert ref.gguf_file is not None, "the plan chose gguf for a GGUF source only"
        spec = plan.spec
        carried = gguf.read(ref.folder / ref.gguf_file, model.config)
        sd = model.state_dict()
        reference = [{k: getattr(spec.layer_weights(sd, i), k) for k in ("qkv", "o", "gate_up", "down")}
                     for i in range(dims.num_layers)]
        worst = gguf.verify_against(carried, reference)
        progress.note(f"GGUF blocks carried over unchanged ({carried.types}); dequantized max |Δ| vs "
                      f"transformers' weights: {worst:.1e}")
        layers = lambda i: replace(spec.layer_weights(sd, i), **carried.layers[i])  # noqa: E731
        fast_head = plan.lm_head == "int8"
        opts = onnx_graph.BuildOptions(
            accuracy_level=plan.accuracy_level,
            embed_quant=carried.embed if fast_head else None,
            lm_head_quant=(carried.lm_head or carried.embed) if fast_head else None,
            lm_head_accuracy_level=4,  # 8-bit MatMulNBits with float activations is a slow kernel path
        )
        graph = onnx_graph.build_decoder(dims, replace(weights, layers=layers), on_layer=tick, options=opts)
        head = "8-bit blocks (GGUF Q8_0), int8 activations" if fast_head else "float32 (dequantized exactly)"
        return graph, bdl.Quantization(**record, source_types=carried.types, lm_head=head,
                                       embedding="8-bit blocks (GGUF Q8_0)" if fast_head else "float32")
    dtype = "float16" if plan.kv_cache == "fp16" else "float32"
    graph = onnx_graph.build_decoder(dims, weights, on_layer=tick,
                                     options=onnx_graph.BuildOptions(lm_head_matmul=True, dtype=dtype))
    feeds = calibration_feeds(dims, tokenizer, plan.calibration_text) if plan.calibrated else []
    graph = quantize.quantize_weights(graph, bits, method.name, plan.block_size, plan.accuracy_level,
                                      on_step=progress.note, calibration=feeds, quant_format=plan.quant_format)
    int8_act = plan.calibrated and bits == 8
    return graph, bdl.Quantization(**record, activations="int8" if int8_act else "float",
                                   lm_head="float32" if plan.quant_format == "qdq" and bits == 4 else "8-bit")


def calibration_feeds(dims: onnx_graph.DecoderDims, tokenizer: Any, text: str, length: int = 128,
                      samples: int = 8) -> list[dict[str, Any]]:
    """Prefill feeds of the decoder graph (empty KV cache) over consecutive chunks of the calibration text."""
    ids = [int(t) for t in tokenizer(text)["input_ids"][: length * samples]]
    empty = np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), np.float32)
    names = onnx_graph.input_names(dims.num_layers)
    feeds = []
    for start in range(0, max(len(ids) - 16, 1), length):
        chunk = np.asarray([ids[start:start + length]], np.int64)
        feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk), "logits_to_keep": np.asarray([1])}
        feed.update({name: empty for name in names if name not in feed})
        feeds.append(feed)
    return feeds


def decoder_parts(model: Any, spec: ArchSpec, max_context: int) -> tuple[onnx_graph.DecoderDims,
                                                                           onnx_graph.DecoderWeights]:
    """The graph builder's dimensions and (lazily built, one layer at a time) weights of an HF decoder."""
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != spec.activation:
        raise UnsupportedModelError(f"{spec.architecture} with hidden_act={cfg.hidden_act!r} is not supported "
                                    f"(edgekit supports {spec.activation!r} for this family).")
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedModelError(f"RoPE type '{rope_type}' changes with sequence length and is not supported yet. "
                                    "Supported: default, linear, llama3, yarn (static frequencies).")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = rotary.inv_freq.detach().float().numpy()
    if inv_freq.shape[0] * 2 != head_dim:
        raise UnsupportedModelError(f"Partial rotary embedding (rotary dim {inv_freq.shape[0] * 2} of head dim "
                                    f"{head_dim}) is not supported yet.")
    window = -1
    if spec.sliding_window_attr and getattr(cfg, spec.sliding_window_attr, None):
        if spec.sliding_window_flag is None or getattr(cfg, spec.sliding_window_flag, False):
            window = int(getattr(cfg, spec.sliding_window_attr))
    sd = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in sd
    assert spec.layer_weights is not None, "AR records name their layer hook"
    layer_weights = spec.layer_weights
    dims = onnx_graph.DecoderDims(
        num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim=head_dim,
        vocab_size=cfg.vocab_size, rms_eps=float(cfg.rms_norm_eps), max_positions=max_context,
        local_window=window if window < max_context else -1,
    )
    weights = onnx_graph.DecoderWeights(
        embed=sd["model.embed_tokens.weight"].float().numpy(),
        lm_head=None if tied else sd["lm_head.weight"].float().numpy(),
        final_norm=sd["model.norm.weight"].float().numpy(),
        inv_freq=inv_freq,
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        layers=lambda i: layer_weights(sd, i),
    )
    return dims, weights


def generation_defaults(model: Any) -> dict[str, Any]:
    gen = getattr(model, "generation_config", None)
    out: dict[str, Any] = {"max_new_tokens": 256, "temperature": 0.0}
    if gen is not None and getattr(gen, "do_sample", False):
        out["temperature"] = float(gen.temperature or 1.0)
        out["top_p"] = float(gen.top_p if gen.top_p is not None else 1.0)
        out["top_k"] = int(gen.top_k or 0)
    if gen is not None and getattr(gen, "repetition_penalty", None) not in (None, 1.0):
        out["repetition_penalty"] = float(gen.repetition_penalty)
    return out
