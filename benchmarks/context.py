"""Decode speed vs context length: the device-resident KV cache (one buffer bound as past and present) against the
copying loop (the past fed as arrays and the presents taken back every token, what bundles did before), on the same
bundle, prompts of ~40 and ~1,000 tokens, interleaved runs, medians. Writes benchmarks/results/context.{json,md,png}.

    python benchmarks/context.py --bundle bundles/smollm2 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import machine, pyplot, save_results  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEXT = ("The history of the lighthouse is closely tied to the history of navigation. Before electric light, keepers "
        "tended oil lamps through the night, trimming wicks and polishing lenses so that ships could find the "
        "harbour. ")


def decode_tok_s(model, ids: list[int], n: int) -> float:
    from edgekit.runtimes.model import run_one

    seq = model.new_sequence(ids, model.params(len(ids), max_new_tokens=n, temperature=0))
    for _ in run_one(model.new_batch(1), seq):
        pass
    return seq.stats.decode_tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/smollm2"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--lengths", default="40,1000")
    args = ap.parse_args()
    import edgekit.runtimes as rt

    shared = rt.load(args.bundle, threads=args.threads)
    shared.stop_ids = frozenset()
    copying = rt.load(args.bundle, threads=args.threads)
    copying.stop_ids = frozenset()
    copying.layout = replace(copying.layout, shared_buffer=False)
    base = shared.tokenizer.encode(TEXT * 80)
    lengths = [int(x) for x in args.lengths.split(",")]
    prompts = {n: base[:n] for n in lengths}
    engines = {"shared buffer (IO binding)": shared, "copying past (before)": copying}
    speeds: dict[str, dict[int, list[float]]] = {e: {n: [] for n in lengths} for e in engines}
    for m in engines.values():  # warm-up
        decode_tok_s(m, prompts[lengths[0]], 8)
    for r in range(args.runs):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for name in order:
            for n in lengths:
                speeds[name][n].append(decode_tok_s(engines[name], prompts[n], args.new_tokens))
        print(f"run {r + 1}/{args.runs}: " + ", ".join(f"{k.split(' (')[0]} " + "/".join(
            f"{v[n][-1]:.0f}" for n in lengths) for k, v in speeds.items()), file=sys.stderr, flush=True)
    rows = {}
    for name, per in speeds.items():
        med = {n: statistics.median(v) for n, v in per.items()}
        rows[name] = {"decode_tok_s": {str(n): med[n] for n in lengths},
                      "long_vs_short": med[lengths[-1]] / med[lengths[0]]}
    result = {"benchmark": "context", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "settings": {"bundle": str(args.bundle), "threads": args.threads, "runs": args.runs,
                           "new_tokens": args.new_tokens, "prompt_tokens": lengths,
                           "precision": shared.manifest.precision},
              "rows": rows, "raw": {k: {str(n): v for n, v in per.items()} for k, per in speeds.items()}}
    save_results("context", result, render, plot)


def render(r: dict) -> str:
    s = r["settings"]
    lengths = s["prompt_tokens"]
    lines = [f"# Decode speed vs context ({r['date']})", "",
             f"Bundle {s['bundle']} ({s['precision']}); {r['machine']['cpu']}, {s['threads']} threads; {s['runs']} "
             f"interleaved runs, medians; {s['new_tokens']} greedy tokens after each prompt.",
             f"Versions: {', '.join(f'{k} {v}' for k, v in r['machine']['versions'].items())}", "",
             "| KV cache | " + " | ".join(f"decode tok/s @ {n}-token prompt" for n in lengths)
             + f" | {lengths[-1]} vs {lengths[0]} |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row['decode_tok_s'][str(n)]:.1f}" for n in lengths)
                     + f" | {row['long_vs_short']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(r: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = r["settings"]["prompt_tokens"]
    for name, row in r["rows"].items():
        ax.plot(lengths, [row["decode_tok_s"][str(n)] for n in lengths], marker="o", label=name)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "context.png", dpi=110)


if __name__ == "__main__":
    main()
