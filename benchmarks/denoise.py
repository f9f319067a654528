"""Denoising benchmark: accuracy vs speed of the diffusion sampler settings on a trained synthetic-task dLLM.

Trains (or reuses) the models of benchmarks/train_dllm.py, exports both with edgekit, and decodes a fixed eval set
with each setting: cache mode (none, prefix, dual) x rule (one token per step = the naive loop, fixed k tokens per
step = fewer steps, confidence thresholds and entropy bounds = parallel decoding), a few other remasking rules without
cache, and the AR model of the same size as a reference row. Columns: exact-answer accuracy, forward passes and tokens
per forward (means), positions run through the network per answer, latency per answer and time to the first block
(medians), generated tokens/s. Writes benchmarks/results/denoise.{json,md,png}.

    python benchmarks/denoise.py --eval 200            # trains the models first if .cache/dllm/ lacks them
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode import machine, pyplot, save_results  # noqa: E402
from train_dllm import CACHE, DEFAULT_TASK, TASKS, correct, folder, sample  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BLOCK = 16
RULES: list[tuple[str, dict]] = [  # (label, options); gen_length 48 = 3 blocks of 16
    ("1 token/step (48 steps)", dict(diffusion_steps=48)),
    ("k=2/step (24 steps)", dict(diffusion_steps=24)),
    ("k=4/step (12 steps)", dict(diffusion_steps=12)),
    ("k=8/step (6 steps)", dict(diffusion_steps=6)),
    ("k=16/step (3 steps)", dict(diffusion_steps=3)),
    ("threshold 0.9", dict(diffusion_steps=48, threshold=0.9)),
    ("threshold 0.8", dict(diffusion_steps=48, threshold=0.8)),
    ("threshold 0.7", dict(diffusion_steps=48, threshold=0.7)),
    ("entropy bound 0.1", dict(diffusion_steps=48, entropy_bound=0.1)),
    ("entropy bound 0.5", dict(diffusion_steps=48, entropy_bound=0.5)),
]
OTHERS: list[tuple[str, dict]] = [  # other remasking rules, no cache
    ("threshold 0.5", dict(diffusion_steps=48, threshold=0.5)),
    ("margin, k=2/step", dict(diffusion_steps=24, remasking="margin")),
    ("entropy, k=2/step", dict(diffusion_steps=24, remasking="entropy")),
    ("random, k=2/step", dict(diffusion_steps=24, remasking="random", seed=0)),
]
SETTINGS = [(cache, label, opts) for cache in ("none", "prefix", "dual") for label, opts in RULES] + \
    [("none", label, opts) for label, opts in OTHERS]


def ensure_models(task: str, steps: int) -> None:
    for kind in ("dllm", "ar"):
        if not (folder(task, kind) / "config.json").exists():  # the AR model learns the task in far fewer steps
            n = steps if kind == "dllm" else max(steps // 5, 200)
            subprocess.run([sys.executable, str(Path(__file__).parent / "train_dllm.py"), "--steps", str(n),
                            "--batch", "64", "--task", task, "--only", kind], check=True)


def export(task: str, kind: str) -> Path:
    out = CACHE / task / f"bundle-{kind}"
    if not (out / "edgekit.json").exists():
        subprocess.run(["edgekit", "export", str(folder(task, kind)), "-o", str(out), "--force", "--no-parity"],
                       check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK)
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import edgekit.runtimes as rt

    ensure_models(args.task, args.train_steps)
    gen = TASKS[args.task]["gen_length"]
    dllm = rt.load(export(args.task, "dllm"), threads=args.threads)
    ar = rt.load(export(args.task, "ar"), threads=args.threads)
    prompts, _ = sample(np.random.default_rng(1234), args.eval, args.task)
    rows = []
    for n, (cache, label, opts) in enumerate(SETTINGS):
        ok, passes, tokens, computed, lat, first = 0, [], [], [], [], []
        for p in prompts:
            stream = dllm.stream(p, gen_length=gen, block_length=min(BLOCK, gen), cache=cache, **opts)
            text = "".join(stream)
            ok += correct(p, text)
            passes.append(stream.stats.forward_passes)
            tokens.append(stream.stats.generated_tokens)
            computed.append(stream.stats.positions_computed)
            lat.append(stream.stats.latency_s)
            first.append(stream.stats.first_block_s)
        rows.append({"setting": f"{cache} / {label}", "cache": cache, "rule": label, **opts,
                     "accuracy": ok / len(prompts), "forward_passes": float(np.mean(passes)),
                     "tokens_per_forward": sum(tokens) / sum(passes), "positions_per_answer": float(np.mean(computed)),
                     "latency_ms": statistics.median(lat) * 1000, "first_block_ms": statistics.median(first) * 1000,
                     "tokens_per_s": sum(tokens) / sum(lat)})
        print(f"[{n + 1}/{len(SETTINGS)}] {rows[-1]['setting']:<36} acc {rows[-1]['accuracy']:.1%}  passes "
              f"{rows[-1]['forward_passes']:.1f}  latency {rows[-1]['latency_ms']:.2f} ms", file=sys.stderr, flush=True)
    ok, lat, toks, first = 0, [], [], []
    for p in prompts:
        t0 = time.perf_counter()
        stream = ar.stream(p, max_new_tokens=gen, temperature=0)
        text = "".join(stream)
        lat.append(time.perf_counter() - t0)
        first.append(stream.stats.ttft_s)
        ok += correct(p, text)
        toks.append(stream.stats.generated_tokens)
    rows.append({"setting": "AR model (same size), greedy, KV cache", "cache": "kv", "rule": "AR",
                 "accuracy": ok / len(prompts), "forward_passes": float(np.mean(toks)), "tokens_per_forward": 1.0,
                 "positions_per_answer": None, "latency_ms": statistics.median(lat) * 1000,
                 "first_block_ms": statistics.median(first) * 1000, "tokens_per_s": sum(toks) / sum(lat)})
    naive = rows[0]
    for r in rows:
        r["speedup_vs_naive"] = naive["latency_ms"] / r["latency_ms"]
    best = max((r for r in rows[:-1] if r["accuracy"] >= naive["accuracy"] - 0.01),
               key=lambda r: r["speedup_vs_naive"])
    task = json.loads((folder(args.task, "dllm") / "task.json").read_text())
    result = {"benchmark": "denoise", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "task": task, "eval_prompts": len(prompts), "block_length": BLOCK, "rows": rows,
              "best_within_1_point": {"setting": best["setting"], "accuracy": best["accuracy"],
                                      "speedup_vs_naive": best["speedup_vs_naive"]}}
    save_results("denoise", result, render, plot)


def render(r: dict) -> str:
    t, best = r["task"], r["best_within_1_point"]
    lines = [f"# Denoising benchmark ({r['date']})", "",
             f"Task `{t['task']}`: {t['pairs']} digit pairs with given sums"
             + (f", each followed by {t['copy']} digits copied from the prompt" if t["copy"] else "")
             + f"; {t['gen_length']}-token answers in blocks of {r['block_length']}; {r['eval_prompts']} held-out "
             f"prompts, exact check. dLLM: ModernBERT masked LM (4 layers, 128 wide) trained {t['steps']} steps "
             f"({t['train_seconds']} s); AR: Llama of the same size and tokenizer. Machine: {r['machine']['cpu']}, "
             f"{r['machine']['cores']} cores, 2 threads. Latency: median per answer.", "",
             f"Best setting within 1 point of the naive loop's accuracy: **{best['setting']}**, "
             f"{best['accuracy']:.1%}, **{best['speedup_vs_naive']:.2f}x** the naive loop (none / 1 token/step).", "",
             "| cache / rule | accuracy | forward passes | tokens/forward | positions computed | latency ms | "
             "first block ms | tokens/s | speed-up vs naive |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        pos = f"{row['positions_per_answer']:.0f}" if row["positions_per_answer"] is not None else "-"
        lines.append(f"| {row['setting']} | {row['accuracy']:.1%} | {row['forward_passes']:.1f} | "
                     f"{row['tokens_per_forward']:.2f} | {pos} | {row['latency_ms']:.2f} | "
                     f"{row['first_block_ms']:.2f} | {row['tokens_per_s']:.0f} | {row['speedup_vs_naive']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(r: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"none": "#2b7bba", "prefix": "#1b9e77", "dual": "#7570b3", "kv": "#d95f02"}
    for cache, color in colors.items():
        pts = [row for row in r["rows"] if row["cache"] == cache]
        ax.scatter([p["latency_ms"] for p in pts], [p["accuracy"] * 100 for p in pts], color=color,
                   label="AR model" if cache == "kv" else f"cache {cache}", s=18)
    for row in r["rows"]:
        if row["cache"] in ("dual", "kv") or row["rule"].startswith("1 token"):
            ax.annotate(row["rule"], (row["latency_ms"], row["accuracy"] * 100), fontsize=6)
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.set_xlabel("latency per answer (ms, median, log scale)")
    ax.set_ylabel("exact-answer accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title("dLLM: cache mode x unmasking rule vs the AR model", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "denoise.png", dpi=110)


if __name__ == "__main__":
    main()
