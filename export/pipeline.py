"""``export_bundle``: source -> PyTorch model -> fused ONNX graph -> bundle folder, checked before it is published.

Configuration flows one way: the CLI builds an ``ExportConfig`` and calls this function; nothing here reads argv or
the environment. The bundle is assembled in a staging folder and renamed into place only when complete.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from edgekit.devices import DeviceProfile, load_profile
from edgekit.export import diffusion, fit, gguf, onnx_graph, prompts, prune, quality, quantize, source
from edgekit.export.fit import FitReport
from edgekit.export.progress import Progress
from edgekit.export.quantize import ALGOS
from edgekit.export.registry import ArchSpec, lookup
from edgekit.runtimes import bundle as bdl
from edgekit.runtimes import load
from edgekit.runtimes.denoiser import CACHE_MODES, Remasking
from edgekit.runtimes.errors import ConfigError, UnsupportedModelError, did_you_mean

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_MAX_CONTEXT = 8192
LM_HEADS: tuple[str, ...] = ("fp32", "int8")
GGUF_FAMILIES = ("llama", "mistral")  # GGUF layouts whose q/k permutation export.gguf undoes
# Tokens that end a chat turn in common templates, most specific first.
TURN_END_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

# (bundle_dir, torch_model, hf_tokenizer, progress) -> parity report (a JSON-able mapping with a "passed" key)
Verifier = Callable[[Path, Any, Any, Progress], Mapping[str, Any]]


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how. ``None`` means: the device profile's default if a device is given, else the
    built-in default (fp32; gguf carry-over when the source's blocks fit the precision, else rtn; accuracy level
    0 for gguf, 4 for rtn/hqq; the model's context up to 8192)."""

    source: str
    output: Path
    precision: str | None = None
    algo: str | None = None
    block_size: int = 32
    accuracy_level: int | None = None
    lm_head: str | None = None  # gguf: "fp32" (exact) or "int8" (Q8_0 blocks, int8 activations)
    quant_format: str | None = None  # rtn: "nbits" (MatMulNBits, default) or "qdq" (DequantizeLinear + MatMul)
    kv_cache: str | None = None  # int8/int4: "fp32" (default) or "fp16" (fp16 activations and KV cache, GPU targets)
    max_context: int | None = None
    batch: int = 1
    device: str | None = None
    prune: str | None = None  # depth=N | width=F | sparsity=2:4
    calibration: str | None = None  # a text file for pruning importance (a built-in text otherwise)
    eval_text: str | None = None  # a text file for the perplexity in the quality report (a built-in text otherwise)
    force: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Plan:
    """ExportConfig merged with the device profile and the source: every choice made, nothing None."""

    precision: str
    algo: str | None  # None for fp32
    block_size: int
    accuracy_level: int
    max_context: int
    device: DeviceProfile | None
    fit: FitReport | None
    prune: prune.PruneSpec | None = None
    calibration_text: str = ""
    eval_text: str = ""
    lm_head: str = "fp32"
    quant_format: str = "nbits"
    kv_cache: str = "fp32"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: bdl.Manifest


def export_bundle(cfg: ExportConfig, verify: Verifier | None = None, progress: Progress | None = None) -> ExportResult:
    """Export ``cfg.source`` to a bundle at ``cfg.output``; run ``verify`` (parity) on it before publishing."""
    progress = progress or Progress(total=(5 if verify else 4) + (1 if cfg.prune else 0))
    ref = source.resolve(cfg.source)
    arch, config = source.read_architecture(ref, cfg.trust_remote_code)
    spec = lookup(arch)
    if spec.kind == "diffusion":
        return _export_diffusion(cfg, ref, arch, config, verify, progress)
    plan = make_plan(cfg, ref, config)  # validates every option and checks the memory fit before heavy work
    if plan.fit is not None:
        progress.note(f"fits {plan.device.name}: {plan.fit.line()} of {plan.fit.budget_mb / 1024:.2f} GB")  # type: ignore[union-attr]
    label = plan.precision + (f" {plan.algo}, accuracy level {plan.accuracy_level}" if plan.algo else "")
    with bdl.staging_dir(cfg.output, force=cfg.force) as stage:
        with progress.stage(f"Loading {ref.label}"):
            model = source.load_model(ref, cfg.trust_remote_code)
            tokenizer = source.load_tokenizer(ref, cfg.trust_remote_code)
            # the uncompressed model's outputs, taken before pruning so the quality report shows its cost
            baseline = quality.reference(model, prompts.prompt_ids(tokenizer, bool(tokenizer.chat_template)),
                                         tokenizer(plan.eval_text)["input_ids"], max_tokens=plan.max_context)
        pruning = None
        if plan.prune is not None:
            with progress.stage(f"Pruning ({plan.prune.label()}, importance from calibration text)"):
                pruning = prune.apply(model, tokenizer, plan.prune, plan.calibration_text)
                progress.note(", ".join(f"{k}: {v}" for k, v in pruning.items() if k != "block_influence"))
        with progress.stage(f"Building the ONNX graph ({arch}, {label})"):
            dims, weights = _decoder_parts(model, spec, plan.max_context)
            graph, quant = _build(plan, ref, model, tokenizer, spec, dims, weights, progress)
        with progress.stage("Writing the bundle"):
            onnx_graph.save_model(graph, stage / "model.onnx")
            del graph
            tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
            manifest = _manifest(plan, ref, arch, spec, model, tokenizer, dims, quant, pruning)
            manifest = replace(manifest, files=bdl.hash_payload(stage))
            bdl.write_manifest(stage, manifest)
        with progress.stage("Checking the bundle loads; quality vs the uncompressed model"):
            bdl.load_manifest(stage)
            report = quality.evaluate(load(stage), baseline, stage)
            progress.note(f"perplexity {report.perplexity:.3f} (reference {report.reference_perplexity:.3f}), "
                          f"top-1 {report.top1:.2%}, KL {report.kl:.2e}, {report.decode_tok_s:.1f} tok/s")
            manifest = replace(manifest, extra={**manifest.extra, "quality": report.to_dict()})
            bdl.write_manifest(stage, manifest)
        manifest = _parity(stage, manifest, verify, model, tokenizer, progress, "Parity against the PyTorch model")
    return ExportResult(cfg.output, manifest)


def _export_diffusion(cfg: ExportConfig, ref: source.SourceRef, arch: str, config: Any, verify: Verifier | None,
                      progress: Progress) -> ExportResult:
    """A masked LM as a diffusion bundle: the whole-sequence denoiser graph (no-cache mode), fp32."""
    if (cfg.precision or "fp32") != "fp32" or cfg.algo or cfg.prune or cfg.device:
        raise ConfigError("Diffusion bundles are fp32 only for now: --precision/--algo/--prune/--device are not "
                          "supported with a masked-LM source yet.")
    max_context = _max_context(config, cfg.max_context)
    with bdl.staging_dir(cfg.output, force=cfg.force) as stage:
        with progress.stage(f"Loading {ref.label} (masked LM, run as a diffusion LM)"):
            model = source.load_model(ref, cfg.trust_remote_code, kind="diffusion")
            tokenizer = source.load_tokenizer(ref, cfg.trust_remote_code)
            mask_id = tokenizer.mask_token_id
            if mask_id is None:
                mask_id = getattr(config, "mask_token_id", None)
            if mask_id is None:
                raise UnsupportedModelError(
                    f"'{ref.spec}' has no mask token in its tokenizer; a diffusion LM needs one to mark the "
                    "positions it generates. HINT: set tokenizer.mask_token and re-save the folder.")
        isolated = diffusion.prompt_isolated(model)
        graph = None
        if not isolated:  # (a prompt-isolated model's whole-sequence graph is the encode graph below)
            with progress.stage(f"Building the ONNX denoiser graph ({arch}, torch.onnx)"):
                graph = diffusion.build_denoiser(model)
        graphs = {"denoiser": bdl.GraphSpec("model.onnx", ("input_ids", "attention_mask"), ("logits",))}
        cache_info: dict[str, Any] = {}
        with progress.stage("Building the cached graphs (prefix / dual cache: encode + block)"):
            try:
                cached = diffusion.build_cached_denoisers(model)
            except UnsupportedModelError as e:
                if isolated:
                    raise UnsupportedModelError(f"'{ref.spec}' declares prompt-isolated attention "
                                                f"(attention_prompt_isolated), which edgekit runs through its own "
                                                f"attention function, but: {e}") from None
                cached = None
                cache_info = {"unavailable": str(e)}
                progress.note(f"no cache modes: {e}")
        with progress.stage("Writing the bundle"):
            if graph is not None:
                onnx_graph.save_model(graph, stage / "model.onnx")
                del graph
            if cached is not None:
                onnx_graph.save_model(cached.encode, stage / "encode.onnx")
                onnx_graph.save_model(cached.block, stage / "block.onnx")
                kv = tuple(f"{k}_{i}" for i in range(cached.layers) for k in ("key", "value"))
                enc_inputs = ("input_ids", "prompt_length") if isolated else ("input_ids",)
                graphs["denoise_encode"] = bdl.GraphSpec("encode.onnx", enc_inputs,
                                                         ("logits", *(f"present_{n}" for n in kv)))
                if isolated:
                    graphs["denoiser"] = graphs["denoise_encode"]
                graphs["denoise_block"] = bdl.GraphSpec(
                    "block.onnx", ("input_ids", "position_ids", "past_positions", *(f"past_{n}" for n in kv)),
                    ("logits",))
                cache_info = {"layers": cached.layers, "position_offset": cached.position_offset,
                              "torch_block_vs_full_max_abs_diff": cached.max_abs_diff}
            tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
            eos = [t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id) if t is not None][:1]
            specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                                                 "mask_token", "cls_token", "sep_token")}
            gen = dict(diffusion.DEFAULTS)
            gen["gen_length"] = min(gen["gen_length"], max_context // 2)
            gen["block_length"] = min(gen["block_length"], gen["gen_length"])
            gen["diffusion_steps"] = gen["gen_length"]
            manifest = bdl.Manifest(
                kind="diffusion", architecture=arch, model_type=str(config.model_type), precision="fp32",
                max_context=max_context, vocab_size=int(config.vocab_size),
                graphs=graphs,
                tokens=bdl.SpecialTokens(bos_id=tokenizer.bos_token_id or tokenizer.cls_token_id,
                                         eos_id=eos[0] if eos else None, pad_id=tokenizer.pad_token_id,
                                         mask_id=int(mask_id), stop_ids=tuple(eos)),
                tokenizer=bdl.TokenizerSpec(
                    file="tokenizer.json",
                    chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
                    add_special_tokens=False,  # the prompt is followed by mask tokens, not by [SEP]
                    special_token_strings={k: (str(v) if v is not None else None) for k, v in specials.items()}),
                provenance=_provenance(ref, lookup(arch)),
                extra={"diffusion": {"defaults": gen,
                                     "cache_modes": list(CACHE_MODES) if cached is not None else ["none"],
                                     "cache": cache_info,
                                     "attention": "prompt_isolated" if isolated else "bidirectional",
                                     "remasking": [r.value for r in Remasking]}},
            )
            manifest = replace(manifest, files=bdl.hash_payload(stage))
            bdl.write_manifest(stage, manifest)
        with progress.stage("Checking the bundle loads"):
            load(stage)
        manifest = _parity(stage, manifest, verify, model, tokenizer, progress,
                           "Parity: the denoiser sampler against its PyTorch reference")
    return ExportResult(cfg.output, manifest)


def _parity(stage: Path, manifest: bdl.Manifest, verify: Verifier | None, model: Any, tokenizer: Any,
            progress: Progress, label: str) -> bdl.Manifest:
    """Run the verifier on the staged bundle and store its report in the manifest."""
    if verify is None:
        return manifest
    with progress.stage(label):
        report = verify(stage, model, tokenizer, progress)
    manifest = replace(manifest, parity=dict(report))
    bdl.write_manifest(stage, manifest)
    return manifest


def _max_context(config: Any, requested: int | None, default: int = DEFAULT_MAX_CONTEXT) -> int:
    limit = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_CONTEXT) or DEFAULT_MAX_CONTEXT)
    if requested is None:
        return min(limit, default)
    if not 16 <= requested <= limit:
        raise ConfigError(f"max_context must be between 16 and the model's limit {limit}, got {requested}.")
    return requested


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        near = did_you_mean(str(value), [str(a) for a in allowed])
        raise ConfigError(f"Unknown {name} {value!r}. Choose one of: {', '.join(map(str, allowed))}.{near}")


def _gguf_linear_types(ref: source.SourceRef) -> set[str]:
    from gguf import GGUFReader

    reader = GGUFReader(str(ref.folder / ref.gguf_file))
    return {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}


def _gguf_head_is_q8(ref: source.SourceRef) -> bool:
    """Whether the GGUF's embedding (and output layer, when it has its own) are Q8_0 blocks edgekit can carry."""
    if ref.gguf_file is None:
        return False
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(str(ref.folder / ref.gguf_file)).tensors
             if t.name in ("token_embd.weight", "output.weight")}
    return types.get("token_embd.weight") == "Q8_0" and types.get("output.weight", "Q8_0") == "Q8_0"


def make_plan(cfg: ExportConfig, ref: source.SourceRef, config: Any) -> Plan:
    """Merge the options with the device profile; validate them; check the memory fit."""
    profile = load_profile(cfg.device) if cfg.device else None
    precision = cfg.precision or (profile.default_precision if profile else "fp32")
    _choice("precision", precision, PRECISIONS)
    _choice("block size", cfg.block_size, BLOCK_SIZES)
    if cfg.batch < 1:
        raise ConfigError(f"batch must be >= 1, got {cfg.batch}.")
    if cfg.accuracy_level is not None:
        _choice("accuracy level", cfg.accuracy_level, (0, 1, 2, 3, 4))
    spec = prune.parse(cfg.prune) if cfg.prune else None
    if spec is not None:
        prune.check_amount(spec, config)
    calibration = prune.read_calibration(cfg.calibration)
    eval_text = quality.read_text(cfg.eval_text)
    algo = cfg.algo
    if spec is not None and algo == "gguf":
        raise ConfigError("--prune changes the weights, so GGUF blocks cannot be carried over unchanged. "
                          "HINT: use --algo rtn or --algo hqq with --prune.")
    if precision in ("fp32", "fp16"):
        if algo is not None:
            raise ConfigError(f"--algo {algo} applies to int8/int4 exports; this export is {precision}. "
                              "HINT: add --precision int4 (or int8).")
    else:
        if algo is not None:
            _choice("quantization algorithm", algo, ALGOS)
        bits = 4 if precision == "int4" else 8
        fits_gguf = False
        if ref.gguf_file is not None and config.model_type in GGUF_FAMILIES and spec is None:
            wanted = {"Q4_0", "Q4_1"} if bits == 4 else {"Q8_0"}
            fits_gguf = _gguf_linear_types(ref) <= wanted | ({"Q8_0"} if bits == 4 else set())
        if algo == "gguf" and not fits_gguf:
            raise ConfigError(
                f"--algo gguf carries GGUF blocks over unchanged, which needs a Llama/Mistral GGUF source whose "
                f"linear weights are {'Q4_0/Q4_1' if bits == 4 else 'Q8_0'}; '{ref.spec}' is not. "
                "HINT: use --algo rtn or --algo hqq."
            )
        algo = algo or ("gguf" if fits_gguf else "rtn")
        if algo == "gptq" and bits != 4:
            raise ConfigError("onnxruntime's GPTQ writes 4-bit weights only; use --precision int4 with --algo gptq "
                              "(or --algo rtn for int8).")
        if algo == "gguf" and cfg.block_size != 32:
            raise ConfigError(f"GGUF blocks are 32 wide; --block-size {cfg.block_size} cannot apply to --algo gguf.")
    accuracy = cfg.accuracy_level if cfg.accuracy_level is not None else (0 if algo in (None, "gguf") else 4)
    if cfg.lm_head is not None:
        _choice("lm_head precision", cfg.lm_head, LM_HEADS)
        if algo != "gguf":
            raise ConfigError(f"--lm-head {cfg.lm_head} chooses how a GGUF's output layer is carried over; this export "
                              f"is {precision}{' ' + algo if algo else ''}. HINT: drop --lm-head, or use --algo gguf.")
    if cfg.quant_format is not None:
        _choice("quantization format", cfg.quant_format, quantize.QUANT_FORMATS)
        if cfg.quant_format == "qdq" and algo != "rtn":
            raise ConfigError(f"--quant-format qdq (DequantizeLinear + MatMul, for TensorRT) is written by --algo rtn; "
                              f"this export is {precision}{' ' + algo if algo else ''}. HINT: add --precision int8 "
                              "--algo rtn (or int4).")
    kv_cache = cfg.kv_cache or ("fp16" if precision == "fp16" else "fp32")
    if cfg.kv_cache is not None:
        _choice("KV cache dtype", cfg.kv_cache, ("fp32", "fp16"))
        if precision in ("fp32", "fp16") and cfg.kv_cache != precision:
            raise ConfigError(f"--kv-cache {cfg.kv_cache} applies to int8/int4 exports; a {precision} bundle keeps its "
                              f"KV cache in {precision}. HINT: use --precision fp16 for an fp16 cache.")
        if cfg.kv_cache == "fp16" and (algo == "gguf" or cfg.quant_format == "qdq"):
            raise ConfigError("--kv-cache fp16 runs the quantized graph in fp16, which --algo gguf (exact fp32 "
                              "carry-over) and --quant-format qdq do not support. HINT: use --algo rtn, hqq or gptq.")
    head_q8 = algo == "gguf" and _gguf_head_is_q8(ref)  # (a non-gguf --lm-head was refused above)
    lm_head = cfg.lm_head or ("int8" if head_q8 else "fp32")
    if lm_head == "int8" and not head_q8:
        raise ConfigError(f"--lm-head int8 carries the GGUF's Q8_0 output/embedding blocks over, but '{ref.spec}' has "
                          "none. HINT: use --lm-head fp32.")
    limit_default = profile.default_max_context if profile else DEFAULT_MAX_CONTEXT
    max_context = _max_context(config, cfg.max_context, limit_default)
    kv_bytes = 2 if kv_cache == "fp16" else 4
    report = (fit.check(config, precision, max_context, cfg.batch, profile, cfg.block_size, kv_bytes)
              if profile else None)
    return Plan(precision, algo, cfg.block_size, accuracy, max_context, profile, report, spec, calibration, eval_text,
                lm_head, cfg.quant_format or "nbits", kv_cache)


def _build(plan: Plan, ref: source.SourceRef, model: Any, tokenizer: Any, spec: ArchSpec,
           dims: onnx_graph.DecoderDims, weights: onnx_graph.DecoderWeights,
           progress: Progress) -> tuple[Any, dict[str, Any] | None]:
    """The graph for the plan's precision, and the manifest's description of its quantization."""
    tick = lambda i: progress.tick(i + 1, dims.num_layers)  # noqa: E731
    if plan.precision in ("fp32", "fp16"):
        opts = onnx_graph.BuildOptions(dtype="float16" if plan.precision == "fp16" else "float32")
        return onnx_graph.build_decoder(dims, weights, on_layer=tick, options=opts), None
    bits = 4 if plan.precision == "int4" else 8
    if plan.algo == "gguf":
        carried = gguf.read(ref.folder / ref.gguf_file, model.config)  # type: ignore[operator]
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
        quant = {"method": "gguf", "bits": bits, "block_size": 32, "accuracy_level": plan.accuracy_level,
                 "source_types": carried.types,
                 "embedding": "8-bit blocks (GGUF Q8_0)" if fast_head else "float32 (dequantized exactly)",
                 "lm_head": "8-bit blocks (GGUF Q8_0), int8 activations" if fast_head
                 else "float32 (dequantized exactly)", "lm_head_int8act": fast_head}
        return graph, quant
    dtype = "float16" if plan.kv_cache == "fp16" else "float32"
    graph = onnx_graph.build_decoder(dims, weights, on_layer=tick,
                                     options=onnx_graph.BuildOptions(lm_head_matmul=True, dtype=dtype))
    calibrated = plan.algo == "gptq" or (plan.quant_format == "qdq" and bits == 8)
    feeds = _calibration_feeds(dims, tokenizer, plan.calibration_text) if calibrated else []
    graph = quantize.quantize_weights(graph, bits, plan.algo or "rtn", plan.block_size, plan.accuracy_level,
                                      on_step=progress.note, calibration=feeds, quant_format=plan.quant_format)
    quant = {"method": plan.algo, "bits": bits, "block_size": plan.block_size, "accuracy_level": plan.accuracy_level,
             "format": plan.quant_format, "symmetric": plan.quant_format == "qdq", "kv_cache": plan.kv_cache,
             "activations": "int8 (static, calibrated)" if calibrated and bits == 8 else "float",
             "embedding": "float32", "lm_head": "float32" if plan.quant_format == "qdq" and bits == 4 else "8-bit"}
    return graph, quant


def _calibration_feeds(dims: onnx_graph.DecoderDims, tokenizer: Any, text: str, length: int = 128,
                       samples: int = 8) -> list[dict[str, Any]]:
    """Prefill feeds of the decoder graph (empty KV cache) over consecutive chunks of the calibration text."""
    import numpy as np

    ids = [int(t) for t in tokenizer(text)["input_ids"][: length * samples]]
    empty = np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), np.float32)
    feeds = []
    for start in range(0, max(len(ids) - 16, 1), length):
        chunk = np.asarray([ids[start:start + length]], np.int64)
        feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk), "logits_to_keep": np.asarray([1])}
        feed.update({name: empty for name in onnx_graph.input_names(dims.num_layers)[3:]})
        feeds.append(feed)
    return feeds


def _decoder_parts(
    model: Any, spec: ArchSpec, max_context: int
) -> tuple[onnx_graph.DecoderDims, onnx_graph.DecoderWeights]:
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != spec.activation:
        raise UnsupportedModelError(f"{spec.architecture} with hidden_act={cfg.hidden_act!r} is not supported "
                                    f"(edgekit supports {spec.activation!r} for this family).")
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedModelError(
            f"RoPE type '{rope_type}' changes with sequence length and is not supported yet. "
            "Supported: default, linear, llama3, yarn (static frequencies)."
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = rotary.inv_freq.detach().float().numpy()
    if inv_freq.shape[0] * 2 != head_dim:
        raise UnsupportedModelError(
            f"Partial rotary embedding (rotary dim {inv_freq.shape[0] * 2} of head dim {head_dim}) "
            "is not supported yet."
        )
    window = -1
    if spec.sliding_window_attr and getattr(cfg, spec.sliding_window_attr, None):
        if spec.sliding_window_flag is None or getattr(cfg, spec.sliding_window_flag, False):
            window = int(getattr(cfg, spec.sliding_window_attr))
    sd = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in sd
    dims = onnx_graph.DecoderDims(
        num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        rms_eps=float(cfg.rms_norm_eps),
        max_positions=max_context,
        local_window=window if window < max_context else -1,
    )
    weights = onnx_graph.DecoderWeights(
        embed=sd["model.embed_tokens.weight"].float().numpy(),
        lm_head=None if tied else sd["lm_head.weight"].float().numpy(),
        final_norm=sd["model.norm.weight"].float().numpy(),
        inv_freq=inv_freq,
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        layers=lambda i: spec.layer_weights(sd, i),
    )
    return dims, weights


def _special_tokens(model: Any, tokenizer: Any) -> bdl.SpecialTokens:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template or ""
    turn_end = next((vocab[t] for t in TURN_END_TOKENS if t in vocab and t in template), None)
    stop = sorted({*eos_ids, *([turn_end] if turn_end is not None else [])})
    return bdl.SpecialTokens(
        bos_id=tokenizer.bos_token_id,
        eos_id=eos_ids[0] if eos_ids else None,
        pad_id=tokenizer.pad_token_id,
        turn_end_id=turn_end,
        stop_ids=tuple(stop),
    )


def _generation_defaults(model: Any) -> dict[str, Any]:
    gen = getattr(model, "generation_config", None)
    out: dict[str, Any] = {"max_new_tokens": 256, "temperature": 0.0}
    if gen is not None and getattr(gen, "do_sample", False):
        out["temperature"] = float(gen.temperature or 1.0)
        out["top_p"] = float(gen.top_p if gen.top_p is not None else 1.0)
        out["top_k"] = int(gen.top_k or 0)
    if gen is not None and getattr(gen, "repetition_penalty", None) not in (None, 1.0):
        out["repetition_penalty"] = float(gen.repetition_penalty)
    return out


def _manifest(plan: Plan, ref: source.SourceRef, arch: str, spec: ArchSpec, model: Any, tokenizer: Any,
              dims: onnx_graph.DecoderDims, quant: dict[str, Any] | None,
              pruning: dict[str, Any] | None = None) -> bdl.Manifest:
    kv = bdl.KVCacheLayout(dims.num_layers, dims.num_kv_heads, dims.head_dim,
                           dtype="float16" if plan.kv_cache == "fp16" else "float32")
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return bdl.Manifest(
        kind="ar",
        architecture=arch,
        model_type=str(model.config.model_type),
        precision=plan.precision,
        max_context=plan.max_context,
        vocab_size=dims.vocab_size,
        graphs={"decoder": bdl.GraphSpec("model.onnx", onnx_graph.input_names(dims.num_layers),
                                         onnx_graph.output_names(dims.num_layers))},
        tokens=_special_tokens(model, tokenizer),
        tokenizer=bdl.TokenizerSpec(
            file="tokenizer.json",
            chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
            add_special_tokens=True,
            special_token_strings={k: (str(v) if v is not None else None) for k, v in specials.items()},
        ),
        kv_cache=kv,
        generation=_generation_defaults(model),
        provenance=_provenance(ref, spec),
        extra={
            "attention": {"num_heads": dims.num_heads, "local_window": dims.local_window},
            "quantization": quant,
            "pruning": pruning,
            "sparse_2_4": bool(pruning and pruning.get("pattern") == "2:4"),
            "device": plan.device.name if plan.device else None,
            "fit": plan.fit.to_dict() if plan.fit else None,
            # onnxruntime 1.31's QDQ propagation gives an int8-activation graph a uint8 zero point it then refuses
            "runtime": {"disabled_optimizers": ["QDQPropagationTransformer"]}
            if quant and str(quant.get("activations", "")).startswith("int8") else {},
        },
    )


def _provenance(ref: source.SourceRef, spec: ArchSpec) -> dict[str, Any]:
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
        "family": spec.family,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": versions,
    }
