"""Denoising benchmark: accuracy vs speed of the diffusion sampler settings on a trained synthetic-task dLLM.

Trains (or reuses) the models of benchmarks/train_dllm.py, exports both with edgekit, and decodes a fixed eval set
with each setting: the naive loop (one token per forward pass), fixed k tokens per step (fewer steps), confidence
thresholds (parallel decoding), other remasking rules; plus the AR model of the same size as a reference row.
Columns: exact-answer accuracy, forward passes and tokens per forward (means), latency per answer (median),
generated tokens/s. Writes benchmarks/results/denoise.{json,md,png}. The no-cache mode is the only cache mode so far.

    python benchmarks/denoise.py --eval 200
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
from train_dllm import CACHE, GEN_LENGTH, correct, sample  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SETTINGS: list[tuple[str, dict]] = [
    ("naive: 1 token/step (16 steps)", dict(block_length=16, diffusion_steps=16)),
    ("2 blocks x 8, 1 token/step", dict(block_length=8, diffusion_steps=16)),
    ("k=2/step (8 steps)", dict(block_length=16, diffusion_steps=8)),
    ("k=4/step (4 steps)", dict(block_length=16, diffusion_steps=4)),
    ("k=8/step (2 steps)", dict(block_length=16, diffusion_steps=2)),
    ("one step (k=16)", dict(block_length=16, diffusion_steps=1)),
    ("threshold 0.9", dict(block_length=16, diffusion_steps=16, threshold=0.9)),
    ("threshold 0.8", dict(block_length=16, diffusion_steps=16, threshold=0.8)),
    ("threshold 0.7", dict(block_length=16, diffusion_steps=16, threshold=0.7)),
    ("threshold 0.5", dict(block_length=16, diffusion_steps=16, threshold=0.5)),
    ("margin, k=2/step", dict(block_length=16, diffusion_steps=8, remasking="margin")),
    ("entropy, k=2/step", dict(block_length=16, diffusion_steps=8, remasking="entropy")),
    ("random, k=2/step", dict(block_length=16, diffusion_steps=8, remasking="random", seed=0)),
    ("random, k=4/step", dict(block_length=16, diffusion_steps=4, remasking="random", seed=0)),
    ("random, k=8/step", dict(block_length=16, diffusion_steps=2, remasking="random", seed=0)),
]


def ensure_models(steps: int) -> None:
    if not ((CACHE / "dllm" / "config.json").exists() and (CACHE / "ar" / "config.json").exists()):
        subprocess.run([sys.executable, str(Path(__file__).parent / "train_dllm.py"), "--steps", str(steps),
                        "--batch", "64"], check=True)


def export(kind: str) -> Path:
    out = CACHE / f"bundle-{kind}"
    if not (out / "edgekit.json").exists():
        subprocess.run(["edgekit", "export", str(CACHE / kind), "-o", str(out), "--force", "--no-parity"],
                       check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import edgekit.runtimes as rt

    ensure_models(args.train_steps)
    dllm = rt.load(export("dllm"), threads=args.threads)
    ar = rt.load(export("ar"), threads=args.threads)
    prompts, _ = sample(np.random.default_rng(1234), args.eval)
    rows = []
    for label, opts in SETTINGS:
        ok, passes, tokens, lat = 0, [], [], []
        for p in prompts:
            stream = dllm.stream(p, gen_length=GEN_LENGTH, **opts)
            text = "".join(stream)
            ok += correct(p, text)
            passes.append(stream.stats.forward_passes)
            tokens.append(stream.stats.generated_tokens)
            lat.append(stream.stats.latency_s)
        rows.append({"setting": label, "cache": "none", **opts, "accuracy": ok / len(prompts),
                     "forward_passes": float(np.mean(passes)), "tokens_per_forward": sum(tokens) / sum(passes),
                     "latency_ms": statistics.median(lat) * 1000, "tokens_per_s": sum(tokens) / sum(lat)})
        print(f"{label:<32} acc {rows[-1]['accuracy']:.1%}  passes {rows[-1]['forward_passes']:.1f}  "
              f"latency {rows[-1]['latency_ms']:.2f} ms", file=sys.stderr, flush=True)
    ok, lat, toks, passes = 0, [], [], []
    for p in prompts:
        t0 = time.perf_counter()
        stream = ar.stream(p, max_new_tokens=GEN_LENGTH, temperature=0)
        text = "".join(stream)
        lat.append(time.perf_counter() - t0)
        ok += correct(p, text)
        toks.append(stream.stats.generated_tokens)
        passes.append(stream.stats.generated_tokens)  # one graph run per generated token
    rows.append({"setting": "AR model (same size), greedy", "cache": "kv", "accuracy": ok / len(prompts),
                 "forward_passes": float(np.mean(passes)), "tokens_per_forward": 1.0,
                 "latency_ms": statistics.median(lat) * 1000, "tokens_per_s": sum(toks) / sum(lat)})
    naive = rows[0]
    for r in rows:
        r["speedup_vs_naive"] = naive["latency_ms"] / r["latency_ms"]
    task = json.loads((CACHE / "dllm" / "task.json").read_text())
    result = {"benchmark": "denoise", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "task": task, "eval_prompts": len(prompts), "rows": rows}
    save_results("denoise", result, render, plot)


def render(r: dict) -> str:
    t = r["task"]
    lines = [f"# Denoising benchmark ({r['date']})", "",
             f"Task: {t['pairs']} digit pairs with given sums, {t['gen_length']}-token answers, {r['eval_prompts']} "
             f"held-out prompts, exact check. dLLM: ModernBERT masked LM (4 layers, 128 wide) trained "
             f"{t['steps']} steps ({t['train_seconds']} s); AR: Llama of the same size and tokenizer. "
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores. Cache mode: none (prefix/dual caches "
             "are not implemented yet).", "",
             "| setting | accuracy | forward passes | tokens/forward | latency ms | tokens/s | speed-up vs naive |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['setting']} | {row['accuracy']:.1%} | {row['forward_passes']:.1f} | "
                     f"{row['tokens_per_forward']:.2f} | {row['latency_ms']:.2f} | {row['tokens_per_s']:.0f} | "
                     f"{row['speedup_vs_naive']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(r: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in r["rows"]:
        color = "#d95f02" if row["cache"] == "kv" else "#2b7bba"
        ax.scatter(row["latency_ms"], row["accuracy"] * 100, color=color)
        ax.annotate(row["setting"], (row["latency_ms"], row["accuracy"] * 100), fontsize=7)
    ax.set_xlabel("latency per answer (ms, median)")
    ax.set_ylabel("exact-answer accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title("dLLM sampler settings vs the AR model (orange)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "denoise.png", dpi=110)


if __name__ == "__main__":
    main()
