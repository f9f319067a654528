"""The AR decoder export: weights from the PyTorch model (or carried from its GGUF) into the fused-op graph,
quantized as the plan says, with the quality report measured on the written bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.export import floors, gguf, onnx_graph, prompts, prune, quality, quantize
from edgekit.export.manifest import Built
from edgekit.export.plan import Plan
from edgekit.export.progress import Progress
from edgekit.export.reference import TorchReference
from edgekit.export.registry import ArchSpec
from edgekit.export.source import SourceRef
from edgekit.runtimes import bundle as bdl
from edgekit.runtimes.errors import UnsupportedModelError

STAGES = 1  # progress stages of ``build`` (plus one when pruning)


def build(plan: Plan, ref: SourceRef, model: Any, tokenizer: Any, stage: Path, progress: Progress,
          reference: TorchReference) -> Built:
    """Write ``model.onnx`` into ``stage``; return its manifest entries. ``reference``: the PyTorch model's logits,
    shared with parity (the prompts' forwards run once)."""
    spec = plan.spec
    block = int(getattr(model.config, BLOCK_FLAG, 0) or 0)
    if block:
        reference = TorchReference(model, "block", block)
    # the uncompressed model's outputs, taken before pruning so the quality report shows its cost
    baseline = quality.baseline(reference, prompts.prompt_ids(tokenizer, bool(tokenizer.chat_template)),
                                tokenizer(plan.eval_text)["input_ids"], max_tokens=plan.max_context)
    pruning = None
    if plan.prune is not None:
        with progress.stage(f"Pruning ({plan.prune.label()}, importance from calibration text)"):
            pruning = prune.apply(model, tokenizer, plan.prune, plan.calibration_text)
            reference.forget()  # (the weights changed: parity compares with the pruned model)
            progress.note(", ".join(f"{k}: {v}" for k, v in pruning.items() if k != "block_influence"))
    with progress.stage(f"Building the ONNX graph ({spec.architecture}, {plan.label()})"):
        dims, weights = decoder_parts(model, spec, plan.max_context)
        graph, quant = _graph(plan, ref, model, tokenizer, dims, weights, progress)
        if plan.graph_target.check is not None:
            plan.graph_target.check(graph)
        onnx_graph.save_model(graph, stage / "model.onnx")
        del graph

    def check(runtime: Any, bundle_dir: Path) -> dict[str, Any]:
        report = quality.evaluate(runtime, baseline, bundle_dir)
        progress.note(f"perplexity {report.perplexity:.3f} (reference {report.reference_perplexity:.3f}), "
                      f"top-1 {report.top1:.2%}, KL {report.kl:.2e}, {report.decode_tok_s:.1f} tok/s")
        return {"quality": report.to_dict()}

    return Built(
        graphs={"decoder": bdl.GraphSpec("model.onnx", onnx_graph.input_names(dims.num_layers, bool(dims.block_length)),
                                         onnx_graph.output_names(dims.num_layers))},
        generation=generation_defaults(model),
        # a graph without GroupQueryAttention's in-place buffer concatenates past and new K/V, so its runtime copies
        # the past per step
        kv_cache=bdl.KVCacheLayout(dims.num_layers, dims.num_kv_heads, dims.head_dim,
                                   dtype="float16" if plan.kv_cache == "fp16" else "float32",
                                   shared_buffer=plan.graph_target.shared_kv_buffer and not dims.block_length),
        kind="block_diffusion" if dims.block_length else None,
        mask_id=_mask_id(tokenizer, spec) if dims.block_length else None,
        quantization=quant,
        block_attention=bdl.BlockAttention(dims.block_length, dims.block_lengths,
                                           bool(getattr(model.config, SHIFT_FLAG, False))) if dims.block_length
        else None,
        extra={"pruning": pruning} if pruning else {},
        check=check,
    )


def _graph(plan: Plan, ref: SourceRef, model: Any, tokenizer: Any, dims: onnx_graph.DecoderDims,
           weights: onnx_graph.DecoderWeights, progress: Progress) -> tuple[Any, bdl.Quantization | None]:
    """The graph for the plan's precision, and the manifest's record of its quantization."""
    tick = lambda i: progress.tick(i + 1, dims.num_layers)  # noqa: E731
    method, bits = plan.method, plan.bits
    dtype = "float16" if plan.kv_cache == "fp16" else "float32"
    # MultiHeadAttention's [B, 1, S, T] bias (block-causal layers) computes wrong values for B > 1 before 1.21.1:
    # plain ops there, exact, for an older onnxruntime
    form = None if plan.runs(floors.BATCHED_BIAS) else "plain"
    split = None if plan.runs(floors.NBITS_8BIT) else True  # (8-bit blocks as two exact 4-bit ones)
    if method is None or bits is None:
        opts = onnx_graph.BuildOptions(dtype=dtype, target=plan.target, block_attention=form, split_8bit=split)
        return onnx_graph.build_decoder(dims, weights, on_layer=tick, options=opts), None
    record = dict(method=method.name, bits=bits, block_size=plan.block_size, accuracy_level=plan.accuracy_level,
                  tolerance=plan.tolerance, format=plan.quant_format, kv_cache=plan.kv_cache,
                  activations="int8" if plan.accuracy_level >= 4 else "float")  # (MatMulNBits' level 4: int8)
    if method.gguf_source:
        assert ref.gguf_file is not None, "the plan chose gguf for a GGUF source only"
        spec = plan.spec
        carried = gguf.read(ref.folder / ref.gguf_file, model.config)
        for r in carried.requantized:
            progress.note(f"WARNING: GGUF tensor '{r.name}' is {r.source_type}, which has no exact carry-over: "
                          f"dequantized and re-quantized (4-bit RTN), relative weight error {r.rel_error:.2%}")
        sd = model.state_dict()
        worst = [0.0]

        def layers(i: int) -> Any:  # each layer checked against transformers' weights as the graph takes it
            lw = spec.layer(sd, i)
            worst[0] = max(worst[0], gguf.check_layer(i, carried.layers[i], lw))
            return replace(lw, **carried.layers[i])

        fast_head = plan.lm_head == "int8"
        opts = onnx_graph.BuildOptions(
            accuracy_level=plan.accuracy_level, dtype=dtype, target=plan.target, block_attention=form, split_8bit=split,
            # (the cuda flavour gathers a dense fp16 embedding: GatherBlockQuantized is a CPU kernel)
            embed_quant=carried.embed if fast_head and plan.graph_target.quantized_embedding else None,
            lm_head_quant=(carried.lm_head or carried.embed) if fast_head else None,
        )
        graph = onnx_graph.build_decoder(dims, replace(weights, layers=layers), on_layer=tick, options=opts)
        progress.note(f"GGUF blocks carried over unchanged ({carried.types}): every matrix dequantizes to exactly "
                      f"what the file holds (max |diff| {carried.max_abs_diff:g}); vs transformers' weights "
                      f"max |Δ| {worst[0]:.1e}")
        acts = "int8" if plan.accuracy_level >= 4 else "float"
        head_w, embed_w = opts.lm_head_quant, opts.embed_quant
        head = (f"8-bit blocks (GGUF {head_w.source_type}), {acts} activations" if head_w is not None
                else "float32 (dequantized exactly)")
        if plan.graph_target.block_format == "qdq":  # (blockwise DequantizeLinear is INT4: 8-bit blocks go dense)
            head = f"{dtype} (dequantized from GGUF {head_w.source_type if head_w is not None else 'blocks'})"
        embedding = f"8-bit blocks (GGUF {embed_w.source_type})" if embed_w is not None else dtype
        return graph, bdl.Quantization(**record, source_types=carried.types, lm_head=head, embedding=embedding)
    if plan.quant_format == "qdq":  # symmetric int4 blocks behind DequantizeLinear, written by the graph builder
        progress.note(f"rtn {bits}-bit symmetric, block {plan.block_size}, transformer matmuls (QDQ); lm_head {dtype}")
        opts = onnx_graph.BuildOptions(lm_head_matmul=True, dtype=dtype, target=plan.target, block_attention=form,
                                       split_8bit=split, qdq_bits=bits, qdq_block=plan.block_size)
        return (onnx_graph.build_decoder(dims, weights, on_layer=tick, options=opts),
                bdl.Quantization(**record, lm_head=dtype))
    graph = onnx_graph.build_decoder(dims, weights, on_layer=tick, options=onnx_graph.BuildOptions(
        lm_head_matmul=True, dtype=dtype, target=plan.target, block_attention=form, split_8bit=split))
    feeds = calibration_feeds(dims, tokenizer, plan.calibration_text) if plan.calibrated else []
    graph = quantize.quantize_weights(graph, bits, method.name, plan.block_size, plan.accuracy_level,
                                      on_step=progress.note, calibration=feeds,
                                      head_bits=8 if plan.runs(floors.NBITS_8BIT) else None)
    return graph, bdl.Quantization(**record, lm_head="8-bit" if plan.runs(floors.NBITS_8BIT) else dtype)


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


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
BLOCK_FLAG = "block_diffusion_length"  # config field marking an AR-family checkpoint as a block-diffusion dLLM
SHIFT_FLAG = "block_diffusion_token_shift"  # ... that predicts token i at position i - 1 (AR-adapted, Fast-dLLM v2)


def _mask_id(tokenizer: Any, spec: ArchSpec) -> int:
    if tokenizer.mask_token_id is None:
        raise UnsupportedModelError(f"{spec.architecture} checkpoint has {BLOCK_FLAG} set (a block-diffusion dLLM) "
                                    "but its tokenizer has no mask token. HINT: set tokenizer.mask_token.")
    return int(tokenizer.mask_token_id)


def decoder_parts(model: Any, spec: ArchSpec, max_context: int) -> tuple[onnx_graph.DecoderDims,
                                                                           onnx_graph.DecoderWeights]:
    """The graph builder's dimensions and (lazily built, one layer at a time) weights of an HF decoder: the
    family's record says which config fields apply; anything the graph cannot honour is refused by name."""
    cfg = model.config
    act = getattr(cfg, spec.activation_attr, None) or getattr(cfg, "hidden_act", "silu")
    if act != spec.activation or act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{spec.architecture} with {spec.activation_attr}={act!r} is not supported "
                                    f"(edgekit supports {spec.activation!r} for this family).")
    for flag in ("use_bidirectional_attention", "attention_chunk_size"):
        if getattr(cfg, flag, None):
            raise UnsupportedModelError(f"{spec.architecture} with {flag}={getattr(cfg, flag)!r} is not supported "
                                        "(edgekit's decoder graph is causal with full or sliding-window attention).")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_layers = cfg.num_hidden_layers
    layer_types = list(getattr(cfg, "layer_types", None) or []) if "layer_types" in spec.honours else []
    ropes, layer_rope = _rope_tables(model.model.rotary_emb, layer_types, head_dim, n_layers)
    if "no_rope_layers" in spec.honours and getattr(cfg, "no_rope_layers", None):
        layer_rope = tuple(r if use else -1 for r, use in zip(layer_rope, cfg.no_rope_layers))
    sd = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in sd
    honour = lambda name, default: getattr(cfg, name, None) if name in spec.honours and getattr(  # noqa: E731
        cfg, name, None) is not None else default
    scale = honour("attention_multiplier", None)
    if honour("query_pre_attn_scalar", None) is not None:
        scale = float(cfg.query_pre_attn_scalar) ** -0.5
    dims = onnx_graph.DecoderDims(
        num_layers=n_layers, hidden=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim=head_dim,
        vocab_size=cfg.vocab_size, rms_eps=float(cfg.rms_norm_eps), max_positions=max_context,
        layer_windows=_windows(cfg, spec, layer_types, max_context), layer_rope=layer_rope, activation=act,
        attn_scale=None if scale is None else float(scale),
        attn_softcap=float(honour("attn_logit_softcapping", 0.0)),
        embed_scale=(float(np.float32(cfg.hidden_size ** 0.5)) if spec.embed_scale == "sqrt_hidden"
                     else float(honour("embedding_multiplier", 1.0))),
        residual_scale=float(honour("residual_multiplier", 1.0)),
        logits_divisor=float(honour("logits_scaling", 1.0)),
        final_softcap=float(honour("final_logit_softcapping", 0.0)),
    )
    block = int(getattr(cfg, BLOCK_FLAG, 0) or 0)
    trained = tuple(int(b) for b in (getattr(cfg, BLOCK_FLAG + "s", None) or ([block] if block else [])))
    if block and (block not in trained or min(trained) < 1 or max(dims.layer_windows) > 0):
        raise UnsupportedModelError(f"{spec.architecture} block-diffusion config is not supported: {BLOCK_FLAG}="
                                    f"{block}, {BLOCK_FLAG}s={list(trained)}, sliding windows "
                                    f"{sorted(set(dims.layer_windows))} (the default block must be one of the trained "
                                    "lengths; windows and blocks do not combine yet).")
    dims = replace(dims, local_window=max(dims.layer_windows), block_length=block, block_lengths=trained)
    final_norm = sd["model.norm.weight"].float().numpy() + spec.norm_offset
    weights = onnx_graph.DecoderWeights(
        embed=sd["model.embed_tokens.weight"].float().numpy(),
        lm_head=None if tied else sd["lm_head.weight"].float().numpy(),
        final_norm=final_norm, rope=ropes, layers=lambda i: spec.layer(sd, i),
    )
    return dims, weights


def _windows(cfg: Any, spec: ArchSpec, layer_types: list[str], max_context: int) -> tuple[int, ...]:
    """Per layer: the local attention window, or -1 (full causal attention, also when the window covers the
    whole context)."""
    window = getattr(cfg, "sliding_window", None) if "sliding_window" in spec.honours else None
    if window and spec.sliding_window_flag is not None and not getattr(cfg, spec.sliding_window_flag, False):
        window = None
    if not window or int(window) >= max_context:
        return (-1,) * cfg.num_hidden_layers
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else -1 for t in layer_types)
    return (int(window),) * cfg.num_hidden_layers


def _rope_tables(rotary: Any, layer_types: list[str], head_dim: int,
                 n_layers: int) -> tuple[tuple[onnx_graph.Rope, ...], tuple[int, ...]]:
    """The rotary tables of an HF rotary module (one, or one per layer type as in Gemma 3 / OLMo 3) and the
    table each layer uses. Static RoPE types (default, linear, llama3, yarn) are one table; LongRoPE adds its
    long table; types whose frequencies follow the sequence length otherwise (dynamic NTK) are refused."""
    types = sorted(set(layer_types)) if isinstance(getattr(rotary, "rope_type", None), dict) else [None]
    ropes = []
    for lt in types:
        prefix = "" if lt is None else f"{lt}_"
        rope_type = rotary.rope_type if lt is None else rotary.rope_type[lt]
        if rope_type == "dynamic":
            raise UnsupportedModelError("RoPE type 'dynamic' changes with sequence length and is not supported. "
                                        "Supported: default, linear, llama3, yarn, longrope.")
        inv_freq = getattr(rotary, f"{prefix}original_inv_freq", getattr(rotary, f"{prefix}inv_freq"))
        inv_freq = inv_freq.detach().float().numpy()
        if inv_freq.shape[0] * 2 > head_dim or inv_freq.shape[0] % 8:
            raise UnsupportedModelError(
                f"Rotary dim {inv_freq.shape[0] * 2} (head dim {head_dim}) is not supported: onnxruntime's "
                "GroupQueryAttention needs half the rotary dim to be a multiple of 8 and at most half the head dim.")
        long_inv, original = None, 0
        if rope_type == "longrope":
            params = rotary.config.rope_parameters if lt is None else rotary.config.rope_parameters[lt]
            original = int(params.get("original_max_position_embeddings")
                           or rotary.config.original_max_position_embeddings)
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            kw = {} if lt is None else {"layer_type": lt}
            long_inv = ROPE_INIT_FUNCTIONS["longrope"](rotary.config, None, seq_len=original + 1, **kw)[0]
            long_inv = long_inv.detach().float().numpy()
        scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        ropes.append(onnx_graph.Rope(inv_freq, scaling, long_inv, original))
    if types == [None]:
        return tuple(ropes), (0,) * n_layers
    return tuple(ropes), tuple(types.index(t) for t in layer_types)


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
