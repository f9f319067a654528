"""Speculative-decoding benchmark: decode tok/s plain vs prompt lookup, per workload (input-grounded: rewrite a
given code file, where the answer copies long spans of the prompt; a multi-turn chat quoting an earlier turn;
free-form: the "sky" prompt and a story), single stream and 4 concurrent streams, greedy (the output is the same
either way: checked), acceptance rate and tokens per forward. Modes interleaved, ``--runs`` times, medians. Writes
JSON, markdown and a PNG plot to benchmarks/results/ (``speculative-<bundle>``).

    python benchmarks/speculative.py --bundle bundles/smollm2-int4
    python benchmarks/speculative.py --bundle bundles/qwen-int4 --source qwen2.5-coder-0.5b-instruct --runs 3

With ``--llama-cpp GGUF`` (llama-cpp-python installed), llama.cpp on the same GGUF runs beside it in the same
interleaved loop, single stream, plain and with its own prompt lookup (``LlamaPromptLookupDecoding``); its decode
rate counts streamed chunks (one per token) from the first to the last.
Not here yet: the draft-bundle and self-speculation drafters.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import machine  # noqa: E402
from structured import _features, bundle_arguments, ensure_bundle  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CODE = '''def moving_average(values, window):
    """Return the moving averages of values over a window."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
WORKLOADS = {
    "rewrite-code": [{"role": "user", "content": "Rename the function moving_average to rolling_mean and keep "
                                                 "everything else exactly the same. Answer with the code only.\n\n"
                      + CODE}],
    "chat-quote": [{"role": "user", "content": "Here is my note: 'The meeting moves to Thursday at 10am in room 4B; "
                                               "bring the quarterly report and the budget draft.'"},
                   {"role": "assistant", "content": "Got it. Anything else?"},
                   {"role": "user", "content": "Repeat my note back to me word for word."}],
    "sky": [{"role": "user", "content": "Why is the sky blue?"}],
    "story": [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}],
}
GROUNDED = ("rewrite-code", "chat-quote")


def run(model, c: int, workload: str, speculate: str, new_tokens: int) -> dict:
    ids = model.tokenizer.encode_prompt(WORKLOADS[workload])
    batch = model.new_batch(c)
    seqs = [model.new_sequence(ids, model.params(len(ids), max_new_tokens=new_tokens, temperature=0,
                                                 speculate=speculate)) for _ in range(c)]
    for s in seqs:
        batch.admit(s)
    first = sum(len(s.stats.token_ids) for s in seqs)
    start = time.perf_counter()
    while batch.active:
        batch.step()
    wall = time.perf_counter() - start
    st = seqs[0].stats
    return {"tok_s": (sum(len(s.stats.token_ids) for s in seqs) - first) / wall, "tokens": len(st.token_ids),
            "drafted": st.drafted_tokens, "accepted": st.accepted_tokens, "per_forward": st.tokens_per_forward,
            "ids": list(st.token_ids)}


def llama_cpp(gguf: str, threads: int) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    kw = dict(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    return {"off": Llama(**kw), "lookup": Llama(**kw, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))}


def run_llama(llm, workload: str, new_tokens: int) -> dict:
    times = []
    for chunk in llm.create_chat_completion(WORKLOADS[workload], max_tokens=new_tokens, temperature=0.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    return {"tok_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0, "tokens": len(times)}


def main() -> None:
    ap = bundle_arguments(__doc__, runs=3, new_tokens=128)
    ap.add_argument("--llama-cpp", default=None, metavar="GGUF", help="Also run llama.cpp on this GGUF.")
    args = ap.parse_args()

    import edgekit.runtimes as rt

    model = rt.load(ensure_bundle(args.bundle, args.source), threads=args.threads)
    for mode in ("off", "lookup"):  # warm-up
        run(model, 1, "sky", mode, 8)
    trials: dict = {}
    llamas = llama_cpp(args.llama_cpp, args.threads) if args.llama_cpp else {}
    for llm in llamas.values():  # warm-up
        run_llama(llm, "sky", 8)
    for r in range(args.runs):
        print(f"run {r + 1}/{args.runs} ...", file=sys.stderr, flush=True)
        for w in WORKLOADS if llamas else ():
            for mode, llm in llamas.items():
                trials.setdefault(("llama.cpp", w, mode), []).append(run_llama(llm, w, args.new_tokens))
        for c in (1, args.streams):
            for w in WORKLOADS:
                for mode in ("off", "lookup"):
                    trials.setdefault((c, w, mode), []).append(run(model, c, w, mode, args.new_tokens))
    rows = []
    for c in (1, args.streams):
        for w in WORKLOADS:
            off, on = trials[(c, w, "off")], trials[(c, w, "lookup")]
            med = {k: statistics.median(t["tok_s"] for t in v) for k, v in (("off", off), ("lookup", on))}
            drafted = sum(t["drafted"] for t in on)
            rows.append({"streams": c, "workload": w, "grounded": w in GROUNDED, "plain_tok_s": med["off"],
                         "lookup_tok_s": med["lookup"], "speedup": med["lookup"] / med["off"],
                         "acceptance": sum(t["accepted"] for t in on) / drafted if drafted else 0.0,
                         "tokens_per_forward": statistics.median(t["per_forward"] for t in on),
                         "tokens": statistics.median(t["tokens"] for t in on),
                         "identical": all(a["ids"] == b["ids"] for a, b in zip(off, on))})
            if c == 1 and llamas:
                lo = statistics.median(t["tok_s"] for t in trials[("llama.cpp", w, "off")])
                ll = statistics.median(t["tok_s"] for t in trials[("llama.cpp", w, "lookup")])
                rows[-1].update({"llama_plain_tok_s": lo, "llama_lookup_tok_s": ll,
                                 "vs_llama_lookup": med["lookup"] / ll if ll else 0.0})
    if llamas:
        from importlib import metadata

        result_versions = {"llama_cpp_python": metadata.version("llama_cpp_python")}
    else:
        result_versions = {}
    result = {"benchmark": "speculative", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "bundle": args.bundle.name,
              "source": args.source, "machine": {**machine(), "cpu_features": _features()},
              "settings": {"runs": args.runs, "new_tokens": args.new_tokens, "threads": args.threads,
                           "streams": args.streams, "llama_cpp": args.llama_cpp}, "rows": rows}
    result["machine"]["versions"].update(result_versions)
    RESULTS.mkdir(exist_ok=True)
    name = f"speculative-{args.bundle.name}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(render(result))
    plot(result, RESULTS / f"{name}.png")
    print(render(result))


def render(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    lines = [f"# Speculative decoding (prompt lookup): {r['bundle']} ({r['source']})", "",
             f"Machine: {m['cpu']} ({m['cpu_features']}), {m['cores']} cores; threads={s['threads']}; {s['runs']} "
             f"interleaved runs (medians); up to {s['new_tokens']} new tokens, greedy; {r['date']}.",
             f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.", "",
             "| streams | workload | plain tok/s | lookup tok/s | speedup | acceptance | tokens/forward | tokens | "
             "identical |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['streams']} | {x['workload']}{' (grounded)' if x['grounded'] else ''} | "
                     f"{x['plain_tok_s']:.1f} | {x['lookup_tok_s']:.1f} | {x['speedup']:.2f}x | "
                     f"{x['acceptance'] * 100:.0f}% | {x['tokens_per_forward']:.2f} | {x['tokens']:.0f} | "
                     f"{'yes' if x['identical'] else 'NO'} |")
    llama = [x for x in r["rows"] if "llama_lookup_tok_s" in x]
    if llama:
        lines += ["", f"llama.cpp on {r['settings']['llama_cpp']} (single stream, same loop):", "",
                  "| workload | llama.cpp plain tok/s | llama.cpp lookup tok/s | edgekit lookup vs llama.cpp lookup |",
                  "|---|---|---|---|"]
        for x in llama:
            lines.append(f"| {x['workload']} | {x['llama_plain_tok_s']:.1f} | {x['llama_lookup_tok_s']:.1f} | "
                         f"{x['vs_llama_lookup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{x['workload']}\n{x['streams']} stream{'s' if x['streams'] > 1 else ''}" for x in r["rows"]]
    ax.bar(range(len(labels)), [x["speedup"] for x in r["rows"]], color=["C0" if x["grounded"] else "C1"
                                                                         for x in r["rows"]])
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("lookup / plain decode tok/s (median)")
    ax.set_title(f"Prompt-lookup speculation: {r['bundle']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
