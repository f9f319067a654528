"""The ``edgekit`` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from edgekit.export.methods import BLOCK_SIZES, KV_DTYPES, LM_HEADS, METHODS, PRECISIONS, QUANT_FORMATS
from edgekit.runtimes.bundle import TARGETS  # (names only: the runtime-only install has no onnx)
from edgekit.runtimes.errors import ConfigError, EdgekitError, ParityError
from edgekit.runtimes.unmasking import CACHE_MODES, Remasking


class _Group(click.Group):
    """Turns EdgekitError into a one-line message and its exit code; never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="edgekit")
def main() -> None:
    """Export Hugging Face LMs to self-describing ONNX bundles and run them without torch."""


@main.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="fp16 is for GPU targets [the device's default, else fp32].")
@click.option("--algo", type=click.Choice(tuple(METHODS)), default=None, help="int8/int4 method: " + "; ".join(
    f"{m.name}: {m.summary}" for m in METHODS.values()) + " [gguf when the source allows, else rtn].")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default="32", show_default=True,
              callback=lambda ctx, param, value: int(value), help="Quantization block size.")
@click.option("--accuracy-level", type=int, default=None,
              help="MatMulNBits compute: 0 = float activations (exact), 4 = int8 activations (faster) "
                   "[0 for gguf, 4 for rtn/hqq].")
@click.option("--quant-format", type=click.Choice(QUANT_FORMATS), default=None,
              help="rtn: nbits (MatMulNBits, onnxruntime's kernels) or qdq (symmetric blockwise DequantizeLinear + "
                   "MatMul, the weight-only form TensorRT consumes) [nbits].")
@click.option("--kv-cache", "kv_cache", type=click.Choice(KV_DTYPES), default=None,
              help="int8/int4: fp32, or fp16 (fp16 activations and half the KV-cache memory; GPU targets) [fp32].")
@click.option("--lm-head", "lm_head", type=click.Choice(LM_HEADS), default=None,
              help="gguf: the output layer as float32 (dequantized exactly) or int8 (the GGUF's Q8_0 blocks, int8 "
                   "activations; several times fewer bytes per token) [int8 when the GGUF has Q8_0 there].")
@click.option("--target", type=click.Choice(tuple(TARGETS)), default=None,
              help="Graph flavour: cpu (onnxruntime's fused CPU kernels), cuda (fp16 fused kernels for the CUDA EP; "
                   "scale-only 4-bit blocks) or tensorrt (plain standard ops TensorRT 10.3 parses whole; "
                   "int4 = symmetric weight-only QDQ) [cuda for GPU device profiles, else cpu].")
@click.option("--onnxruntime", default=None, help="The oldest onnxruntime the bundle must run on, e.g. 1.20 (a "
              "JetPack's wheel): exact alternatives for newer ops, or a clear refusal [the device profile's, else any]")
@click.option("--device", default=None, help="Device profile (see 'edgekit devices') or a .toml file: picks "
              "defaults and checks the memory fit before any heavy work.")
@click.option("--max-context", type=int, default=None,
              help="Context length the bundle supports [device default or the model's, max 8192].")
@click.option("--batch", default=1, show_default=True, help="Concurrent sequences to budget KV cache for.")
@click.option("--prune", default=None, help="depth=N (drop N layers), width=F (drop a fraction F of FFN channels) "
              "or sparsity=2:4, ranked by importance on calibration text.")
@click.option("--calibration", default=None, type=click.Path(), help="Text file for pruning importance "
              "[a built-in text].")
@click.option("--eval-text", default=None, type=click.Path(), help="Text file for the perplexity in the quality "
              "report [a built-in text].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python modeling code to run.")
@click.option("--parity-tokens", default=64, show_default=True, help="Greedy tokens per prompt in the parity check.")
@click.option("--no-parity", is_flag=True, help="Skip the parity check against the PyTorch model.")
def export(source: str, output: Path, parity_tokens: int, no_parity: bool, **options: Any) -> None:
    """Export SOURCE (a built-in name like smollm2-135m-instruct, an HF folder or a .gguf file) to a bundle."""
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.parity import verifier

    cfg = ExportConfig(source=source, output=output, **options)
    result = export_bundle(cfg, verify=None if no_parity else verifier(parity_tokens))
    size = sum(p.stat().st_size for p in result.path.iterdir()) / 2**20
    click.echo(f"Bundle written to {result.path} ({size:.0f} MB).")
    report = result.parity
    if report is not None:
        click.echo(report.table())
        if not report.passed:
            raise ParityError(f"the bundle at {result.path} was written but failed parity "
                              f"({len(report.misses)} misses).")


def _bias_pairs(items: tuple[str, ...]) -> dict[str, float]:
    """--logit-bias ID=BIAS values as the library's mapping (the values' ranges are the sampler's to check)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--logit-bias takes ID=BIAS (e.g. 198=-100), got {item!r}.") from None
        if not sep:
            raise ConfigError(f"--logit-bias takes ID=BIAS (e.g. 198=-100), got {item!r}.")
    return out


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat/--no-chat", default=None, help="Wrap the prompt as a user message in the chat template "
              "[default: chat when the bundle has a template].")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None, help="0 = greedy.")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--presence-penalty", type=float, default=None, help="OpenAI's, in [-2, 2]: minus this for every "
              "token already in the answer.")
@click.option("--frequency-penalty", type=float, default=None, help="OpenAI's, in [-2, 2]: minus this times each "
              "token's count in the answer.")
@click.option("--logit-bias", "logit_bias", multiple=True, metavar="ID=BIAS",
              help="Add BIAS (in [-100, 100]) to token ID's logit (repeatable).")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json-schema", "json_schema_file", type=click.Path(path_type=Path), default=None,
              help="Constrain the answer to JSON matching the schema in this file.")
@click.option("--json-object", is_flag=True, default=None, help="Constrain the answer to a JSON object.")
@click.option("--regex", default=None, help="Constrain the answer to match this regex.")
@click.option("--grammar", "grammar_file", type=click.Path(path_type=Path), default=None,
              help="Constrain the answer to the grammar in this file (Lark, or llama.cpp's GBNF).")
@click.option("--no-jump-forward", is_flag=True, help="Under a constraint, draw the tokens it forces one by one.")
@click.option("--logprobs", type=int, default=None, metavar="K",
              help="Print each token's log-probability and the K most likely alternatives to stderr.")
@click.option("--speculate", default=None, help="Speculative decoding: off or lookup (prompt lookup; the output "
              "is unchanged, only faster where the answer repeats the prompt).")
@click.option("-n", "n", type=int, default=1, show_default=True,
              help="Answers to draw (sharing one prefill of the prompt); needs a temperature to differ.")
@click.option("--gen-length", type=int, default=None, help="Diffusion: tokens to generate.")
@click.option("--block-length", type=int, default=None, help="Diffusion: tokens per semi-autoregressive block.")
@click.option("--diffusion-steps", type=int, default=None, help="Diffusion: denoising steps in total.")
@click.option("--remasking", type=click.Choice([r.value for r in Remasking]), default=None,
              help="Diffusion: which masked positions each step commits.")
@click.option("--threshold", type=float, default=None,
              help="Diffusion: commit every position whose confidence exceeds this (parallel decoding).")
@click.option("--entropy-bound", type=float, default=None,
              help="Diffusion: EB-sampler; commit the most confident positions while their entropy sum minus the "
                   "largest stays within this many nats.")
@click.option("--position-decay", type=float, default=None,
              help="Diffusion: rank scores x exp(-decay * offset in the block), so earlier positions go first.")
@click.option("--cache", type=click.Choice(CACHE_MODES), default=None,
              help="Diffusion: KV cache mode (prefix/dual: Fast-dLLM's approximate cache, refreshed per block).")
@click.option("--provider", "providers", multiple=True, help="onnxruntime execution provider (repeatable, in order).")
@click.option("--threads", type=int, default=None)
@click.option("--stats", is_flag=True, help="Print token counts, TTFT and decode speed to stderr.")
def run(bundle: Path, prompt: str, chat: bool | None, system: str | None, providers: tuple[str, ...],
        threads: int | None, stats: bool, stop: tuple[str, ...], logit_bias: tuple[str, ...],
        json_schema_file: Path | None, grammar_file: Path | None, no_jump_forward: bool, n: int,
        **sampling: Any) -> None:
    """Stream an answer to PROMPT from BUNDLE."""
    from edgekit.runtimes import load

    if json_schema_file is not None:
        sampling["json_schema"] = _read_text(json_schema_file, "--json-schema")
    if grammar_file is not None:
        sampling["grammar"] = _read_text(grammar_file, "--grammar")
    if no_jump_forward:
        sampling["jump_forward"] = False
    if not 1 <= n <= 8:
        raise ConfigError(f"-n must be between 1 and 8, got {n}.")

    model = load(bundle, providers=providers or None, threads=threads)
    use_chat = model.tokenizer.has_chat_template if chat is None else chat
    messages: Any = prompt
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    options = {k: v for k, v in sampling.items() if v is not None}
    if stop:
        options["stop"] = stop
    if logit_bias:
        options["logit_bias"] = _bias_pairs(logit_bias)
    if n > 1:
        _run_choices(model, messages, options, n, stats)
        return
    stream = model.stream(messages, **options)
    try:
        for piece in stream:
            click.echo(piece, nl=False)
    finally:
        stream.close()
    click.echo()
    if stream.logprobs is not None:
        _echo_logprobs(model, stream.logprobs)
    if stats:
        click.echo(stream.stats.line(), err=True)


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag}: cannot read '{path}': {e}. HINT: pass a readable UTF-8 file.") from None


def _echo_logprobs(model: Any, entries: list[Any]) -> None:
    def tok(t: int) -> str:
        return repr(model.vocab.token_bytes(t).decode("utf-8", "replace"))

    for e in entries:
        alts = "  ".join(f"{tok(t)} {lp:.3f}" for t, lp in e.top)
        click.echo(f"{tok(e.token):>16} {e.logprob:8.4f}   {alts}", err=True)


def _run_choices(model: Any, messages: Any, options: dict[str, Any], n: int, stats: bool) -> None:
    """``-n``: n answers of one prompt decoded together, the prompt prefilled once (the server's ``n``)."""
    from edgekit.runtimes.engine import Engine, Request

    ids = model.tokenizer.encode_prompt(messages)
    params = model.params(len(ids), **options)
    engine = Engine(model, max_batch=n, prefix_cache_entries=0)
    reqs = [Request(ids, params, lambda ev: None) for _ in range(n)]
    engine.submit(*reqs)
    while engine.running or engine.waiting:
        engine.step()
    for i, req in enumerate(reqs):
        assert req.seq is not None
        click.echo(f"--- answer {i + 1}/{n}")
        click.echo(model.tokenizer.decode(req.seq.stats.token_ids))
        if req.seq.logprobs is not None:
            _echo_logprobs(model, req.seq.logprobs)
        if stats:
            click.echo(req.seq.stats.line(), err=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", required=True, help="The source the bundle was exported from (name, folder or .gguf).")
@click.option("--tokens", "new_tokens", default=64, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report here.")
def parity(bundle: Path, reference: str, new_tokens: int, trust_remote_code: bool, json_out: Path | None) -> None:
    """Compare BUNDLE with the full PyTorch model; exit 1 listing every miss."""
    from edgekit.parity import run_parity

    report = run_parity(bundle, reference, new_tokens=new_tokens, trust_remote_code=trust_remote_code)
    click.echo(report.table())
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    if not report.passed:
        raise ParityError(f"parity failed for {bundle}: {len(report.misses)} misses (listed above).")


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--provider", "providers", multiple=True, help="onnxruntime execution provider (repeatable, in order).")
@click.option("--threads", type=int, default=None)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report here.")
def verify_cmd(bundle: Path, providers: tuple[str, ...], threads: int | None, json_out: Path | None) -> None:
    """Parity on this device without PyTorch: BUNDLE's loop against the reference stored at export; exit 1 on a miss."""
    from edgekit.verify import verify

    report = verify(bundle, providers=providers or None, threads=threads)
    click.echo(report.table())
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    if not report.passed:
        raise ParityError(f"verify failed for {bundle}: {len(report.misses)} misses (listed above).")


@main.command("quality")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", required=True, help="The uncompressed source (name, folder or .gguf).")
@click.option("--text", "text_file", default=None, type=click.Path(), help="Evaluation text [built-in].")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path), help="Also save a PNG chart.")
@click.option("--trust-remote-code", is_flag=True)
def quality_cmd(bundle: Path, reference: str, text_file: str | None, plot_path: Path | None,
                trust_remote_code: bool) -> None:
    """Perplexity, agreement with the uncompressed model, size and speed of BUNDLE."""
    from edgekit.export import prompts, quality, source
    from edgekit.export.reference import TorchReference
    from edgekit.export.registry import lookup
    from edgekit.runtimes import load

    text = quality.read_text(text_file)
    runtime = load(bundle)
    ref = source.resolve(reference)
    model = source.load_model(ref, trust_remote_code, lookup(runtime.manifest.architecture).auto_classes)
    tok = source.load_tokenizer(ref, trust_remote_code)
    baseline = quality.baseline(TorchReference.for_manifest(model, runtime.manifest),
                                prompts.prompt_ids(tok, runtime.tokenizer.has_chat_template), tok(text)["input_ids"],
                                max_tokens=runtime.max_context, objective=runtime.objective,
                                mask_id=runtime.manifest.tokens.mask_id)
    report = quality.evaluate(runtime, baseline, bundle)
    click.echo(report.table())
    if plot_path:
        quality.plot(report, plot_path)
        click.echo(f"plot written to {plot_path}")


@main.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--root", default="/", show_default=True, type=click.Path(path_type=Path),
              help="Filesystem root to read the machine from (a mounted device image, or tests).")
@click.option("--max-batch", default=8, show_default=True, help="As for edgekit serve: KV rows decoding together.")
@click.option("--prefix-cache-entries", default=8, show_default=True, help="As for edgekit serve: KV rows kept.")
def doctor(bundle: Path | None, root: Path, max_batch: int, prefix_cache_entries: int) -> None:
    """What this machine is, what onnxruntime/CUDA/TensorRT it has, its device profile; for BUNDLE, where it runs
    and whether it fits."""
    from edgekit.doctor import inspect

    click.echo(inspect(root=root, bundle=bundle, serve_rows=max_batch + max(prefix_cache_entries, 0)).table())


@main.command()
@click.argument("prompts", type=click.Path(path_type=Path))
@click.option("--url", default="http://127.0.0.1:8000/v1", show_default=True, help="The API base URL.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="JSONL results, appended as they complete; a rerun skips the ids already there.")
@click.option("--concurrency", default=8, show_default=True, help="Requests in flight at once.")
@click.option("--rate", type=float, default=None, help="Requests per second at most (token bucket) [unlimited].")
@click.option("--burst", default=1, show_default=True, help="Requests the bucket may save up.")
@click.option("--max-retries", default=8, show_default=True,
              help="Retries per request on 429/5xx/connection errors (Retry-After honoured, else jittered backoff).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds per request.")
@click.option("--model", default=None, help="Model name to send when a line has none.")
@click.option("--api-key", envvar="EDGEKIT_API_KEY", default=None, help="Bearer token [$EDGEKIT_API_KEY].")
def batch(prompts: Path, output: Path, **opts: Any) -> None:
    """Answer every request of the JSONL file PROMPTS (one object per line: 'messages' or 'prompt', an optional
    'id', any request fields incl. the diffusion ones) against an OpenAI-compatible server."""
    from edgekit.batch import BatchConfig, run

    progress = run(prompts, output, BatchConfig(**opts))
    if progress.failed:
        raise EdgekitError(f"{progress.failed} of {progress.total} requests failed (see 'error' in {output}). HINT: "
                           "rerun the same command: it retries those that ran out of retries and skips the rest.")


@main.command()
def devices() -> None:
    """List the known device profiles."""
    from edgekit.export.device import list_profiles, load_profile

    head = f"{'device':<28} {'memory':>7} {'budget':>7} {'cc':>4}  {'precisions':<18} {'context':>7}  providers"
    click.echo(head)
    click.echo("-" * len(head))
    for name in list_profiles():
        p = load_profile(name)
        eps = ", ".join(e.replace("ExecutionProvider", "") for e in p.execution_providers)
        click.echo(f"{p.name:<28} {p.memory_gb:>5.0f}GB {p.memory_budget_gb:>5.1f}GB {p.compute_capability or '-':>4}  "
                   f"{','.join(p.precisions):<18} {p.default_max_context:>7}  {eps}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(bundle: Path, as_json: bool) -> None:
    """Show what is in BUNDLE (after the checks a load makes: files, hashes, manifest against its graphs)."""
    from edgekit.runtimes import load

    m = load(bundle).manifest
    if as_json:
        click.echo(json.dumps(m.to_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(describe(bundle, m))


def describe(bundle: Path, m: Any) -> str:
    sizes = {name: (bundle / name).stat().st_size for name in m.files}
    kv = m.kv_cache
    lines = [
        f"bundle       {bundle}  (format v{m.format_version}, files verified)",
        f"kind         {m.kind}    architecture {m.architecture} ({m.model_type})    precision {m.precision}",
        *([f"quantization {m.quantization}"] if m.quantization else []),
        *([f"device       {m.extra['device']} (fits: {m.extra['fit']['total_mb']:.0f} of "
           f"{m.extra['fit']['budget_mb']:.0f} MB)"] if m.extra.get("fit") else []),
        f"context      {m.max_context} tokens    vocab {m.vocab_size}",
    ]
    if kv:
        lines.append(f"kv cache     {kv.num_layers} layers x {kv.num_kv_heads} kv heads x {kv.head_dim} dims, "
                     f"{kv.dtype}, {kv.layout}")
    t = m.tokens
    lines.append(f"tokens       bos={t.bos_id} eos={t.eos_id} pad={t.pad_id} turn_end={t.turn_end_id} "
                 f"stop={list(t.stop_ids)}")
    lines.append(f"chat         {'template present' if m.tokenizer.chat_template else 'no template'}")
    lines.append(f"generation   {dict(m.generation)}")
    lines.append("files        " + ", ".join(f"{k} ({v / 2**20:.1f} MB)" for k, v in sizes.items()))
    prov = m.provenance
    lines.append(f"source       {prov.get('source')}  [{prov.get('description')}]  created {prov.get('created')}")
    q = m.extra.get("quality")
    if isinstance(q, dict) and "top1" in q:
        lines.append(f"quality      perplexity {q.get('perplexity', 0):.3f} (reference "
                     f"{q.get('reference_perplexity', 0):.3f}), top-1 {q['top1']:.2%}, KL {q.get('kl', 0):.2e}, "
                     f"{q.get('size_mb', 0):.1f} MB, {q.get('decode_tok_s', 0):.1f} tok/s (at export)")
    for key in ("pruning", "diffusion_cache"):
        if m.extra.get(key):
            lines.append(f"{key.replace('_', ' '):<12} {m.extra[key]}")
    if m.block_attention is not None:
        b = m.block_attention
        lines.append(f"blocks       {b.block_length} (trained: {list(b.block_lengths)}), token shift {b.token_shift}")
    if m.diffusion is not None:
        d = m.diffusion
        lines.append(f"diffusion    {d.attention} attention, cache modes {', '.join(d.cache_modes)}")
    if m.parity:
        s = m.parity.get("summary", {})
        verdict = "PASSED" if m.parity.get("passed") else "FAILED"
        rows = m.parity.get("rows", [])
        lines.append(f"parity       {verdict} ({m.parity.get('precision')} tolerance): max|Δ| "
                     f"{s.get('max_abs_diff', 0):.2e}, top-1 {s.get('top1', 0):.1%}, tokens identical "
                     f"{s.get('tokens_identical', 0):.0%} ({len({r['prompt'] for r in rows})} prompts x "
                     f"{len({r['setting'] for r in rows})} settings)")
    else:
        lines.append("parity       not run")
    return "\n".join(lines)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback unless told).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every endpoint but /health "
              "(the WebSocket handshake may pass ?api_key=).")
@click.option("--max-batch", default=8, show_default=True, help="Requests decoded together.")
@click.option("--max-queue", default=32, show_default=True, help="Requests allowed to wait; more get 429.")
@click.option("--request-timeout", default=60.0, show_default=True, help="Seconds before a request is ended.")
@click.option("--max-tokens-cap", default=2048, show_default=True, help="Largest max_tokens a request may ask.")
@click.option("--max-body-bytes", default=1_000_000, show_default=True)
@click.option("--model-name", default=None, help="Model id clients use [bundle folder name].")
@click.option("--prefix-cache-entries", default=8, show_default=True,
              help="Finished conversations whose KV cache is kept for reuse by the next turn (0 = off).")
@click.option("--header-timeout", default=10.0, show_default=True, help="Seconds a client has to send headers.")
@click.option("--body-timeout", default=30.0, show_default=True, help="Seconds a client has to send its body.")
@click.option("--max-connections", default=256, show_default=True, help="Open connections beyond this get 503.")
@click.option("--threads", type=int, default=None, help="onnxruntime threads [onnxruntime decides]; a model this "
              "small may serve more with 1 on a 2-core device (benchmarks/results/serve-*.md).")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="Let onnxruntime's threads busy-wait between runs (a little lower latency for one stream; "
                   "takes cores from the HTTP side when they are shared).")
@click.option("--speculate", default="off", show_default=True,
              help="Speculative decoding for requests that do not set 'speculate': off or lookup (prompt lookup).")
@click.option("--provider", "providers", multiple=True)
def serve(bundle: Path, providers: tuple[str, ...], **opts: Any) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API with streaming."""
    from edgekit.serve import ServeConfig
    from edgekit.serve import serve as run_server

    run_server(ServeConfig(bundle=bundle, providers=providers or None, **opts))


if __name__ == "__main__":
    main()
