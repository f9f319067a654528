"""Structured-output benchmark: decode speed with and without a JSON-schema constraint (and with jump-forward),
single stream and 4 concurrent streams, schema compile time, output validity; and the two maintained engines
(llguidance, which edgekit uses, and xgrammar) side by side on the bundle's own tokenizer: compile time and mask
time per token along the same answers.

Every mode runs on the same prompt, interleaved, ``--runs`` times; medians are reported. Writes JSON, a markdown
table and a PNG plot to benchmarks/results/ (``structured-<bundle>``).

    python benchmarks/structured.py --bundle bundles/smollm2-int4      # exported (int4) if missing
    python benchmarks/structured.py --bundle bundles/qwen-int4 --source qwen2.5-coder-0.5b-instruct --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPT = [{"role": "user", "content": "Create a JSON profile of a software engineer: name, age, contact details, "
                                      "skills, a role and the team they work in."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "contact": {"type": "object", "properties": {"email": {"type": "string"}, "phone": {"type": "string"},
                                                     "city": {"type": "string"}},
                    "required": ["email", "phone", "city"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "role": {"enum": ["backend", "frontend", "data", "devops", "mobile"]},
        "seniority": {"enum": ["junior", "mid", "senior", "staff"]},
        "team": {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"},
                                                  "remote": {"type": "boolean"}},
                 "required": ["name", "size", "remote"], "additionalProperties": False},
    },
    "required": ["name", "age", "contact", "skills", "role", "seniority", "team"],
    "additionalProperties": False,
}
MODES = {"free": {}, "schema": {"json_schema": SCHEMA, "jump_forward": False},
         "schema+jf": {"json_schema": SCHEMA, "jump_forward": True}}


def ensure_bundle(path: Path, source: str) -> Path:
    from edgekit.runtimes.bundle import MANIFEST_FILE

    if not (path / MANIFEST_FILE).exists():
        from edgekit.export.pipeline import ExportConfig, export_bundle

        print(f"exporting {source} (int4) to {path} ...", file=sys.stderr, flush=True)
        export_bundle(ExportConfig(source=source, output=path, precision="int4", force=True), verify=None)
    return path


def run_batch(model, c: int, options: dict, new_tokens: int) -> dict:
    """``c`` sequences of PROMPT decoding together on one batch; aggregate tokens/s after admission."""
    ids = model.tokenizer.encode_prompt(PROMPT)
    batch = model.new_batch(c)
    seqs = [model.new_sequence(ids, model.params(len(ids), max_new_tokens=new_tokens, temperature=0, **options))
            for _ in range(c)]
    for s in seqs:
        batch.admit(s)
    start = time.perf_counter()
    first = sum(len(s.stats.token_ids) for s in seqs)
    while batch.active:
        batch.step()
    wall = time.perf_counter() - start
    made = sum(len(s.stats.token_ids) for s in seqs) - first
    st = seqs[0].stats
    return {"tok_s": made / wall if wall else 0.0, "tokens": [len(s.stats.token_ids) for s in seqs],
            "forwards": st.forward_passes, "forced": st.forced_tokens, "mask_ms": st.mask_s * 1000,
            "texts": [model.tokenizer.decode(s.stats.token_ids) for s in seqs], "finish": st.finish_reason,
            "token_ids": list(st.token_ids)}


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def compile_times(model, runs: int) -> dict:
    """Cold compile of the schema (a variant per run, so no cache answers) and the vocabulary's first build."""
    from edgekit.runtimes.constraints import Constraint, Vocabulary

    vocab = Vocabulary(model.vocab.path, model.manifest.vocab_size, model.stop_ids)
    t0 = time.perf_counter()
    _ = vocab.tokenizer
    build = time.perf_counter() - t0
    times = []
    for i in range(runs):
        schema = {**SCHEMA, "title": f"variant {i}"}
        times.append(vocab.compile(Constraint.json_schema(schema))[1])
    return {"vocabulary_build_ms": build * 1000, "schema_compile_ms": statistics.median(times) * 1000}


def engines(model, answers: list[list[int]], runs: int) -> dict:
    """llguidance vs xgrammar on this tokenizer: cold compile time of the schema and mask time per token, replaying
    the same constrained answers through both."""
    import numpy as np

    from edgekit.runtimes.constraints import Constraint, Vocabulary

    out: dict = {}
    vocab = Vocabulary(model.vocab.path, model.manifest.vocab_size, model.stop_ids)
    compile_ms, mask_us = [], []
    for i in range(runs):
        guide = vocab.guide(Constraint.json_schema({**SCHEMA, "title": f"llg {i}"}))
        compile_ms.append(guide.compile_s * 1000)
        for ids in answers:
            guide = vocab.guide(Constraint.json_schema({**SCHEMA, "title": f"llg {i}"}))
            for t in ids:
                t0 = time.perf_counter()
                guide.allowed()
                mask_us.append((time.perf_counter() - t0) * 1e6)
                guide.consume(t)
    out["llguidance"] = {"version": metadata.version("llguidance"), "compile_ms": statistics.median(compile_ms),
                         "mask_us_per_token": statistics.median(mask_us), "p90_mask_us": float(np.percentile(mask_us,
                                                                                                            90))}
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        out["xgrammar"] = {"error": f"not installed ({e})"}
        return out
    hf = PreTrainedTokenizerFast(tokenizer_file=str(model.vocab.path))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=model.manifest.vocab_size,
                                              stop_token_ids=sorted(model.stop_ids))
    compile_ms, mask_us = [], []
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for i in range(runs):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps({**SCHEMA, "title": f"xgr {i}"}), any_whitespace=False)
        compile_ms.append((time.perf_counter() - t0) * 1000)
        for ids in answers:
            matcher = xgr.GrammarMatcher(compiled)
            for t in ids:
                t0 = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                mask_us.append((time.perf_counter() - t0) * 1e6)
                if not matcher.accept_token(t):  # (its own tokenization may disagree on a forced token)
                    break
    out["xgrammar"] = {"version": metadata.version("xgrammar"), "compile_ms": statistics.median(compile_ms),
                       "mask_us_per_token": statistics.median(mask_us),
                       "p90_mask_us": float(np.percentile(mask_us, 90)),
                       "needs": "torch, transformers, triton (its wheel's requirements)"}
    return out


def bundle_arguments(doc: str, runs: int, new_tokens: int) -> argparse.ArgumentParser:
    """The options every structured / speculative run takes: the int4 bundle (and its source, to export it), runs,
    new tokens, threads, concurrent streams."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-int4"))
    ap.add_argument("--source", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--new-tokens", type=int, default=new_tokens)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=4)
    return ap


def main() -> None:
    ap = bundle_arguments(__doc__, runs=5, new_tokens=160)
    ap.add_argument("--no-engines", action="store_true", help="skip the llguidance / xgrammar comparison")
    args = ap.parse_args()

    import edgekit.runtimes as rt

    model = rt.load(ensure_bundle(args.bundle, args.source), threads=args.threads)
    for c in (1, args.streams):  # warm-up (sessions, the vocabulary, the compiled schema)
        for opts in MODES.values():
            run_batch(model, c, opts, 8)
    trials: dict = {f"{m}@{c}": [] for c in (1, args.streams) for m in MODES}
    for r in range(args.runs):
        print(f"run {r + 1}/{args.runs} ...", file=sys.stderr, flush=True)
        for c in (1, args.streams):
            for mode, opts in MODES.items():
                trials[f"{mode}@{c}"].append(run_batch(model, c, opts, args.new_tokens))
    summary = {}
    for key, runs in trials.items():
        texts = [t for r in runs for t in r["texts"]]
        summary[key] = {"tok_s": statistics.median(r["tok_s"] for r in runs),
                        "tokens": statistics.median(statistics.mean(r["tokens"]) for r in runs),
                        "forwards": statistics.median(r["forwards"] for r in runs),
                        "forced": statistics.median(r["forced"] for r in runs),
                        "mask_ms": statistics.median(r["mask_ms"] for r in runs),
                        "valid": sum(valid(t) for t in texts) / len(texts) if not key.startswith("free") else None,
                        "finish": runs[-1]["finish"], "sample": runs[-1]["texts"][0][:400]}
    for c in (1, args.streams):
        free = summary[f"free@{c}"]["tok_s"]
        for mode in ("schema", "schema+jf"):
            summary[f"{mode}@{c}"]["vs_free"] = summary[f"{mode}@{c}"]["tok_s"] / free if free else 0.0
    answers = [trials["schema@1"][0]["token_ids"]]
    result = {"benchmark": "structured", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "bundle": str(args.bundle),
              "source": args.source, "machine": {**machine(), "cpu_features": _features()},
              "settings": {"runs": args.runs, "new_tokens": args.new_tokens, "threads": args.threads,
                           "streams": args.streams, "schema": SCHEMA},
              "compile": compile_times(model, args.runs), "modes": summary,
              "engines": None if args.no_engines else engines(model, answers, max(args.runs // 2, 2))}
    result["machine"]["versions"]["llguidance"] = metadata.version("llguidance")
    RESULTS.mkdir(exist_ok=True)
    name = f"structured-{args.bundle.name}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(render(result))
    plot(result, RESULTS / f"{name}.png")
    print(render(result))


def _features() -> str:
    from edgekit.runtimes import cpu

    d = cpu.describe()
    return f"{d['arch']}, {'/'.join(d['features'][-4:])}, int8 kernels: {d['int8_kernels']}"


def render(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    lines = [f"# Structured output: {r['bundle']} ({r['source']})", "",
             f"Machine: {m['cpu']} ({m['cpu_features']}), {m['cores']} cores; threads={s['threads']}; "
             f"{s['runs']} interleaved runs (medians); up to {s['new_tokens']} new tokens, greedy; {r['date']}.",
             f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.", "",
             f"Schema compile (cold, llguidance): {r['compile']['schema_compile_ms']:.1f} ms; the vocabulary's first "
             f"build: {r['compile']['vocabulary_build_ms']:.0f} ms (once per loaded model).", "",
             "| streams | mode | tok/s (aggregate) | vs unconstrained | tokens/answer | forwards | forced tokens | "
             "mask ms/answer | valid |", "|---|---|---|---|---|---|---|---|---|"]
    for key, v in r["modes"].items():
        mode, c = key.split("@")
        ratio = f"{v['vs_free']:.2f}x" if "vs_free" in v else "1.00x"
        ok = "" if v["valid"] is None else f"{v['valid'] * 100:.0f}%"
        lines.append(f"| {c} | {mode} | {v['tok_s']:.1f} | {ratio} | {v['tokens']:.0f} | {v['forwards']:.0f} | "
                     f"{v['forced']:.0f} | {v['mask_ms']:.1f} | {ok} |")
    if r.get("engines"):
        lines += ["", "Engines on this tokenizer (the same answers replayed; compile is cold):", "",
                  "| engine | version | compile ms | mask us/token (median) | p90 | needs |",
                  "|---|---|---|---|---|---|"]
        for name, e in r["engines"].items():
            if "error" in e:
                lines.append(f"| {name} | - | - | - | - | {e['error']} |")
            else:
                lines.append(f"| {name} | {e['version']} | {e['compile_ms']:.1f} | {e['mask_us_per_token']:.0f} | "
                             f"{e['p90_mask_us']:.0f} | {e.get('needs', 'nothing (Rust, abi3 wheel)')} |")
    sample = r["modes"].get("schema+jf@1", {}).get("sample", "")
    lines += ["", f"Sample (schema+jf, 1 stream): `{sample}`", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    streams = sorted({int(k.split("@")[1]) for k in r["modes"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for j, mode in enumerate(MODES):
        vals = [r["modes"][f"{mode}@{c}"]["tok_s"] for c in streams]
        ax.bar([i + (j - 1) * width for i in range(len(streams))], vals, width, label=mode)
    ax.set_xticks(range(len(streams)), [f"{c} stream{'s' if c > 1 else ''}" for c in streams])
    ax.set_ylabel("decode tok/s (aggregate, median)")
    ax.set_title(f"JSON-schema constrained decoding: {Path(r['bundle']).name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
