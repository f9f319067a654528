"""Denoising benchmark: accuracy vs speed of the AR model, the block-diffusion dLLM and the full dLLM, one task.

Trains (or reuses) the models of benchmarks/train_dllm.py (AR, block-diffusion, full-bidirectional, all the same
size), exports them with edgekit and decodes a fixed eval set: the AR model greedily on its KV cache; the
block-diffusion model on edgekit's exact KV cache at B in {4, 8, 16} with each rule (one token per step, k=2,
confidence thresholds, entropy bounds); the full dLLM with cache mode (none, prefix, dual) x rule. Columns: accuracy,
forward passes and committed tokens per forward (means), positions run through the network per answer, latency per
answer and time to the first block (medians), generated tokens/s and its ratio to the AR model's; plus the measured
cost of an S-token forward vs a 1-token one on this machine. Writes benchmarks/results/denoise[-TASK].{json,md,png}.

    python benchmarks/denoise.py --eval 200                   # pairs_copy; trains what .cache/dllm/ lacks
    python benchmarks/denoise.py --task shuffle --no-train    # shuffle, with the models already trained
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
def full_rules(gen: int, block: int) -> list[tuple[str, dict]]:
    """The full dLLM's (label, options) for a gen-token answer in blocks of ``block``: k tokens per step, thresholds,
    entropy bounds (``full_settings``: each cache mode x these, plus other remasking rules without cache)."""
    steps = sorted({gen // k for k in (1, 2, 4, 8, 16) if k <= block and (gen // k) % (gen // block) == 0},
                   reverse=True)
    fixed = [(f"1 token/step ({n} steps)" if n == gen else f"k={gen / n:g}/step ({n} steps)", dict(diffusion_steps=n))
             for n in steps]
    return fixed + [
        ("threshold 0.9", dict(diffusion_steps=gen, threshold=0.9)),
        ("threshold 0.8", dict(diffusion_steps=gen, threshold=0.8)),
        ("threshold 0.7", dict(diffusion_steps=gen, threshold=0.7)),
        ("entropy bound 0.1", dict(diffusion_steps=gen, entropy_bound=0.1)),
        ("entropy bound 0.5", dict(diffusion_steps=gen, entropy_bound=0.5)),
        ("entropy bound 0.5 + position decay 1", dict(diffusion_steps=gen, entropy_bound=0.5, position_decay=1.0)),
    ]


def other_rules(gen: int) -> list[tuple[str, dict]]:  # other remasking rules, no cache
    return [("threshold 0.5", dict(diffusion_steps=gen, threshold=0.5)),
            ("margin, k=2/step", dict(diffusion_steps=gen // 2, remasking="margin")),
            ("entropy, k=2/step", dict(diffusion_steps=gen // 2, remasking="entropy")),
            ("random, k=2/step", dict(diffusion_steps=gen // 2, remasking="random", seed=0))]


def full_settings(gen: int, block: int) -> list[tuple[str, str, dict]]:
    return [(cache, label, opts) for cache in ("none", "prefix", "dual") for label, opts in full_rules(gen, block)] + \
        [("none", label, opts) for label, opts in other_rules(gen)]


BLOCKS = (4, 8, 16)


def block_rules(gen: int) -> list[tuple[str, dict]]:
    return [("1 token/step", dict(diffusion_steps=gen)), ("k=2/step", dict(diffusion_steps=gen // 2)),
            ("threshold 0.9", dict(diffusion_steps=gen, threshold=0.9)),
            ("threshold 0.7", dict(diffusion_steps=gen, threshold=0.7)),
            ("entropy bound 0.1", dict(diffusion_steps=gen, entropy_bound=0.1)),
            ("entropy bound 0.5", dict(diffusion_steps=gen, entropy_bound=0.5)),
            # PC-Sampler's positional prior: between similar scores the earlier position first
            ("threshold 0.9 + position decay 1", dict(diffusion_steps=gen, threshold=0.9, position_decay=1.0)),
            ("entropy bound 0.5 + position decay 0.3", dict(diffusion_steps=gen, entropy_bound=0.5,
                                                             position_decay=0.3)),
            ("entropy bound 0.5 + position decay 1", dict(diffusion_steps=gen, entropy_bound=0.5, position_decay=1.0)),
            ("entropy bound 1.0 + position decay 1", dict(diffusion_steps=gen, entropy_bound=1.0, position_decay=1.0))]


def ensure_models(task: str, steps: int) -> None:
    """Train what .cache/dllm/<task>/ lacks: the AR model first (it learns a task in far fewer steps), the block
    dLLM adapted from it (token shift kept, as Fast-dLLM v2 / SDAR adapt AR checkpoints), the full dLLM from scratch."""
    script = str(Path(__file__).parent / "train_dllm.py")
    runs = {"ar": ["--steps", str(max(steps // 5, 200)), "--batch", "64"],
            "bdllm": ["--steps", str(steps // 2), "--batch", "128", "--init", "ar", "--lr", "1e-3"],
            "dllm": ["--steps", str(steps), "--batch", "64"]}
    for kind, extra in runs.items():
        if not (folder(task, kind) / "config.json").exists():
            subprocess.run([sys.executable, script, *extra, "--task", task, "--only", kind], check=True)


def export(task: str, kind: str) -> Path:
    out = CACHE / task / f"bundle-{kind}"
    if not (out / "edgekit.json").exists():
        subprocess.run(["edgekit", "export", str(folder(task, kind)), "-o", str(out), "--force", "--no-parity"],
                       check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return out


def measure(model, prompts: list[str], **options) -> dict:
    """Decode every prompt with ``options``: accuracy and the sums/medians of the stats."""
    ok, passes, tokens, computed, lat, first = 0, [], [], [], [], []
    for p in prompts:
        t0 = time.perf_counter()
        stream = model.stream(p, **options)
        text = "".join(stream)
        lat.append(time.perf_counter() - t0)
        ok += correct(p, text)
        passes.append(stream.stats.forward_passes)
        tokens.append(stream.stats.generated_tokens)
        computed.append(stream.stats.positions_computed)
        first.append(stream.stats.first_block_s)
    return {"accuracy": ok / len(prompts), "forward_passes": float(np.mean(passes)),
            "tokens_per_forward": sum(tokens) / sum(passes), "positions_per_answer": float(np.mean(computed)),
            "latency_ms": statistics.median(lat) * 1000, "first_block_ms": statistics.median(first) * 1000,
            "tokens_per_s": sum(tokens) / sum(lat)}


def forward_cost(model, runs: int = 30) -> dict[int, float]:
    """Median time of an S-token forward on a 48-position committed cache, relative to S = 1 (this machine)."""
    vocab = model.manifest.vocab_size
    ids = [3 + i % (vocab - 3) for i in range(48)]
    out = {}
    for s in (1, 2, 4, 8, 16, 32):
        times = []
        for _ in range(runs):
            cache = model.graph.new_cache()
            model.graph.forward(ids, cache)
            t0 = time.perf_counter()
            model.graph.forward(ids[:s], cache, logits_to_keep=s)
            times.append(time.perf_counter() - t0)
            cache.release()
        out[s] = statistics.median(times)
    return {s: t / out[1] for s, t in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK)
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-train", action="store_true", help="benchmark the models already trained, skip the rest")
    ap.add_argument("--rounds", type=int, default=5, help="head to head: times the AR model and the fastest settings "
                    "within a point of it are run, alternated")
    args = ap.parse_args()
    import edgekit.runtimes as rt

    if not args.no_train:
        ensure_models(args.task, args.train_steps)
    have = {k: (folder(args.task, k) / "config.json").exists() for k in ("dllm", "ar", "bdllm")}
    gen = TASKS[args.task]["gen_length"]
    prompts, _ = sample(np.random.default_rng(1234), args.eval, args.task)
    rows = []

    def log(row: dict) -> None:
        rows.append(row)
        print(f"{row['setting']:<44} acc {row['accuracy']:.1%}  tok/fwd {row['tokens_per_forward']:.2f}  "
              f"{row['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    ar = rt.load(export(args.task, "ar"), threads=args.threads)
    models = {"ar": ar}
    ar_options = dict(max_new_tokens=gen, temperature=0)
    log({"setting": "AR model (same size), greedy, KV cache", "kind": "ar", "cache": "kv", "rule": "AR",
         "options": ar_options, **measure(ar, prompts, **ar_options)})
    if have["bdllm"]:
        bd = models["block"] = rt.load(export(args.task, "bdllm"), threads=args.threads)
        for b in BLOCKS:
            whole = -(-gen // b) * b  # the answer in whole blocks (a shorter task answer is then EOS padding)
            for label, opts in block_rules(whole):
                options = dict(gen_length=whole, block_length=b, **opts)
                log({"setting": f"block-diffusion B={b} / {label}", "kind": "block", "cache": "exact KV",
                     "block": b, "rule": label, **opts, "options": options, **measure(bd, prompts, **options)})
        cost = forward_cost(bd)
    else:
        cost = forward_cost(ar)
    if have["dllm"]:
        dllm = models["full"] = rt.load(export(args.task, "dllm"), threads=args.threads)
        for cache, label, opts in full_settings(gen, min(BLOCK, gen)):
            options = dict(gen_length=gen, block_length=min(BLOCK, gen), cache=cache, **opts)
            log({"setting": f"full dLLM {cache} / {label}", "kind": "full", "cache": cache, "rule": label, **opts,
                 "options": options, **measure(dllm, prompts, **options)})
    ar_row = rows[0]
    for r in rows:
        r["tokens_per_s_vs_ar"] = r["tokens_per_s"] / ar_row["tokens_per_s"]
    close = [r for r in rows[1:] if r["accuracy"] >= ar_row["accuracy"] - 0.01]
    best = {k: max((r for r in close if r["kind"] == k), key=lambda r: r["tokens_per_s"], default=None)
            for k in ("block", "full")}
    # the sweep runs each row once, minutes apart on a shared machine: the speed claim comes from the AR model and the
    # fastest settings within a point of it, run alternately, medians
    # (where none is within a point: the most accurate setting of that kind, the fastest of those)
    top = {k: best[k] or max((r for r in rows if r["kind"] == k), key=lambda r: (r["accuracy"], r["tokens_per_s"]),
                             default=None) for k in best}
    contenders = [ar_row] + [r for r in top.values() if r is not None]
    runs: dict[str, list[float]] = {r["setting"]: [] for r in contenders}
    for i in range(args.rounds):
        for r in contenders:
            runs[r["setting"]].append(measure(models[r["kind"]], prompts, **r["options"])["tokens_per_s"])
        print(f"head to head {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()),
              file=sys.stderr, flush=True)
    ar_runs = runs[ar_row["setting"]]
    head = {k: {"kind": next(r["kind"] for r in contenders if r["setting"] == k), "tokens_per_s": v,
                "accuracy": next(r["accuracy"] for r in contenders if r["setting"] == k),
                "median_tokens_per_s": statistics.median(v),
                "median_ratio_vs_ar": statistics.median(x / y for x, y in zip(v, ar_runs))} for k, v in runs.items()}
    info = {k: json.loads((folder(args.task, k) / "task.json").read_text()) for k, ok in have.items() if ok}
    result = {"benchmark": "denoise", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "task": args.task, "models": info, "eval_prompts": len(prompts), "gen_length": gen, "rows": rows,
              "forward_cost_vs_1_token": cost, "head_to_head": {"rounds": args.rounds, "rows": head},
              "best_within_1_point_of_ar": {k: (None if r is None else {"setting": r["setting"],
                                                                       "accuracy": r["accuracy"],
                                                                       "tokens_per_s_vs_ar": r["tokens_per_s_vs_ar"]})
                                            for k, r in best.items()}}
    name = "denoise" if args.task == DEFAULT_TASK else f"denoise-{args.task}"
    save_results(name, result, render, lambda r: plot(r, name))


def render(r: dict) -> str:
    models = r["models"]
    lines = [f"# Denoising benchmark, task `{r['task']}` ({r['date']})", "",
             f"{r['eval_prompts']} held-out prompts, {r['gen_length']}-token answers, exact check (shuffle: any "
             "valid order). Models, all 4 layers x 128 wide, one character tokenizer: AR = Llama trained on next-token "
             "prediction; block-diffusion = the same Llama "
             + ("adapted from that AR model (its token shift kept: Fast-dLLM v2 / SDAR) with"
                if models.get("bdllm", {}).get("init") else "trained with")
             + " the two-stream block-causal objective on "
             "blocks of 4, 8 and 16, decoded on edgekit's exact KV cache; full dLLM = ModernBERT masked-diffusion LM "
             "(bidirectional over the whole sequence; prefix/dual are Fast-dLLM's approximate caches). Training: "
             + ", ".join(f"{k} {v['steps']} steps ({v['train_seconds']:.0f} s)" for k, v in models.items())
             + f". Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, 2 threads; latency and time to "
             "first block are medians per answer, tokens/s = all tokens / all latency.", ""]
    for kind, label in (("block", "block-diffusion"), ("full", "full dLLM")):
        b = r["best_within_1_point_of_ar"].get(kind)
        if b is not None:
            lines.append(f"Fastest {label} setting within 1 point of the AR model's accuracy: **{b['setting']}**, "
                         f"{b['accuracy']:.1%}, **{b['tokens_per_s_vs_ar']:.2f}x** the AR model's tokens/s.")
        elif any(row["kind"] == kind for row in r["rows"]):
            lines.append(f"No {label} setting comes within 1 point of the AR model's accuracy.")
    h2h = r.get("head_to_head")
    if h2h:
        lines += ["", f"Head to head (the AR model and the fastest setting of each kind within a point of it, or the "
                  f"most accurate where none is; run alternately {h2h['rounds']} times on the same prompts; medians):",
                  "", "| setting | accuracy | tokens/s (median) | vs AR (median of per-round ratios) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['accuracy']:.1%} | {v['median_tokens_per_s']:.0f} | {v['median_ratio_vs_ar']:.2f}x |"
                  for k, v in h2h["rows"].items()]
    cost = ", ".join(f"{s} tokens {c:.2f}x" for s, c in r["forward_cost_vs_1_token"].items())
    lines += ["", f"Cost of an S-token forward vs a 1-token forward on a 48-position cache (this machine): {cost}.",
              "", "The sweep (each row run once, in this order):", "",
              "| model / setting | accuracy | forward passes | tokens/forward | positions computed | latency ms | "
              "first block ms | tokens/s | vs AR |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['setting']} | {row['accuracy']:.1%} | {row['forward_passes']:.1f} | "
                     f"{row['tokens_per_forward']:.2f} | {row['positions_per_answer']:.0f} | {row['latency_ms']:.2f} | "
                     f"{row['first_block_ms']:.2f} | {row['tokens_per_s']:.0f} | {row['tokens_per_s_vs_ar']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(r: dict, name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    colors = {"ar": "#d95f02", "block": "#1b9e77", "full": "#2b7bba"}
    for kind, color in colors.items():
        pts = [row for row in r["rows"] if row["kind"] == kind]
        ax.scatter([p["tokens_per_s"] for p in pts], [p["accuracy"] * 100 for p in pts], color=color, s=18,
                   label={"ar": "AR (KV cache)", "block": "block diffusion (exact KV)", "full": "full dLLM"}[kind])
    for row in r["rows"]:
        if row["kind"] != "full":
            ax.annotate(row["setting"].replace("block-diffusion ", ""), (row["tokens_per_s"], row["accuracy"] * 100),
                        fontsize=5)
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.set_xlabel("generated tokens/s (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"task {r['task']}: accuracy vs speed", fontsize=10)
    cost = r["forward_cost_vs_1_token"]
    bx.plot([int(s) for s in cost], list(cost.values()), marker="o", color="#1b9e77", label="measured")
    bx.plot([int(s) for s in cost], [int(s) for s in cost], ls="--", color="grey", label="linear")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log", base=2)
    bx.set_xlabel("tokens per forward (S)")
    bx.set_ylabel("time vs a 1-token forward")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    bx.set_title("S-token forward cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
