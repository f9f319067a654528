"""Decode benchmark: edgekit's runtime vs Hugging Face ``generate`` on the same model, prompt and thread count.

Each engine lives in its own worker process (so peak RSS is its own); the parent asks them for trials in
interleaved order and reports medians. Writes JSON, a markdown table and a PNG plot to benchmarks/results/.

    python benchmarks/decode.py                       # SmolLM2 bundle at bundles/smollm2 (exported if missing)
    python benchmarks/decode.py --runs 7 --new-tokens 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = [{"role": "user", "content": "Why is the sky blue?"}]


# --- workers -------------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_edgekit(args: argparse.Namespace) -> None:
    import edgekit.runtimes as rt

    model = rt.load(args.bundle, threads=args.threads)
    model.stop_ids = frozenset()  # always generate exactly --new-tokens, like the HF side
    yield_ready()
    for _ in sys.stdin:
        stream = model.stream(PROMPT, max_new_tokens=args.new_tokens, temperature=0)
        for _piece in stream:
            pass
        s = stream.stats
        reply({"ttft_ms": s.ttft_s * 1000, "decode_tok_s": s.decode_tokens_per_s, "tokens": s.generated_tokens,
               "prompt_tokens": s.prompt_tokens, "peak_rss_mb": _peak_rss_mb()})


def worker_hf(args: argparse.Namespace) -> None:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from edgekit.export import source

    torch.set_num_threads(args.threads)
    ref = source.resolve(args.reference)
    model, tok = source.load_model(ref), source.load_tokenizer(ref)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # first call: the prompt; then one call per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    yield_ready()
    for _ in sys.stdin:
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, streamer=clock)
        new = clock.times[1:]
        reply({"ttft_ms": (new[0] - start) * 1000, "decode_tok_s": (len(new) - 1) / (new[-1] - new[0]),
               "tokens": int(out.shape[1] - ids.shape[1]), "prompt_tokens": int(ids.shape[1]),
               "peak_rss_mb": _peak_rss_mb()})


def yield_ready() -> None:
    reply({"ready": True})


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- parent --------------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, name: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", name, "--bundle", str(args.bundle), "--reference",
               args.reference, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     stderr=subprocess.DEVNULL)
        assert self._read().get("ready"), f"{name} worker failed to start"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died")
        return json.loads(line)

    def trial(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for d in ("edgekit", "onnxruntime", "torch", "transformers", "numpy"):
        try:
            versions[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            versions[d] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/smollm2"))
    ap.add_argument("--reference", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--worker", choices=["edgekit", "hf"])
    args = ap.parse_args()
    if args.worker == "edgekit":
        return worker_edgekit(args)
    if args.worker == "hf":
        return worker_hf(args)

    if not (args.bundle / "edgekit.json").exists():
        print(f"exporting {args.reference} to {args.bundle} ...", file=sys.stderr)
        subprocess.run(["edgekit", "export", args.reference, "-o", str(args.bundle), "--no-parity"], check=True)
    print("starting workers (loading models) ...", file=sys.stderr)
    workers = [Worker("edgekit", args), Worker("hf", args)]
    trials: dict[str, list[dict]] = {w.name: [] for w in workers}
    for w in workers:  # warm-up, not counted
        w.trial()
    for r in range(args.runs):
        order = workers if r % 2 == 0 else workers[::-1]  # interleave, alternating who goes first
        for w in order:
            trials[w.name].append(w.trial())
        print(f"run {r + 1}/{args.runs}: " + ", ".join(
            f"{n} {t[-1]['decode_tok_s']:.1f} tok/s, TTFT {t[-1]['ttft_ms']:.0f} ms" for n, t in trials.items()),
            file=sys.stderr)
    for w in workers:
        w.close()

    med = {n: {k: statistics.median(t[k] for t in ts) for k in ("ttft_ms", "decode_tok_s")} | {
        "peak_rss_mb": max(t["peak_rss_mb"] for t in ts), "tokens": ts[0]["tokens"],
        "prompt_tokens": ts[0]["prompt_tokens"]} for n, ts in trials.items()}
    ratio = {"decode_speedup": med["edgekit"]["decode_tok_s"] / med["hf"]["decode_tok_s"],
             "ttft_ratio": med["edgekit"]["ttft_ms"] / med["hf"]["ttft_ms"],
             "rss_ratio": med["edgekit"]["peak_rss_mb"] / med["hf"]["peak_rss_mb"]}
    result = {"benchmark": "decode", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "settings": {"threads": args.threads, "runs": args.runs, "new_tokens": args.new_tokens,
                           "bundle": str(args.bundle), "reference": args.reference, "prompt": PROMPT,
                           "decoding": "greedy, stop tokens ignored"},
              "median": med, "ratios": ratio, "trials": trials}
    save_results("decode", result, render, plot)


def render(r: dict) -> str:
    m, s, ra = r["median"], r["settings"], r["ratios"]
    lines = [
        f"# Decode benchmark ({r['date']})",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; threads={s['threads']}; "
        f"{s['runs']} interleaved runs, medians; {s['new_tokens']} greedy tokens after a "
        f"{m['edgekit']['prompt_tokens']}-token chat prompt.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in r['machine']['versions'].items())}",
        "",
        "| engine | TTFT (ms) | decode (tok/s) | peak RSS (MB) |",
        "|---|---:|---:|---:|",
    ]
    names = {"edgekit": "edgekit runtime (fp32 bundle, onnxruntime)", "hf": "Hugging Face generate (torch fp32)"}
    for k in ("edgekit", "hf"):
        lines.append(f"| {names[k]} | {m[k]['ttft_ms']:.1f} | {m[k]['decode_tok_s']:.1f} | {m[k]['peak_rss_mb']:.0f} |")
    lines += ["", f"edgekit / HF: decode **{ra['decode_speedup']:.2f}x**, TTFT **{ra['ttft_ratio']:.2f}x**, "
              f"peak RSS {ra['rss_ratio']:.2f}x", ""]
    return "\n".join(lines)


def save_results(name: str, result: dict, render, plot) -> None:
    """Write results/<name>.json and .md, draw the plot, print the markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    md = render(result)
    (RESULTS / f"{name}.md").write_text(md)
    plot(result)
    print(md)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; skipping the plot", file=sys.stderr)
        return None
    return plt


def plot(r: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    m = r["median"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    labels = ["edgekit", "HF generate"]
    colors = ["#2b7bba", "#aaaaaa"]
    for ax, key, title in zip(axes, ("decode_tok_s", "ttft_ms", "peak_rss_mb"),
                              ("decode tok/s (higher is better)", "TTFT ms (lower is better)", "peak RSS MB")):
        vals = [m["edgekit"][key], m["hf"][key]]
        ax.bar(labels, vals, color=colors)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=9)
    fig.suptitle(f"SmolLM2-135M fp32, {r['settings']['threads']} threads, {r['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "decode.png", dpi=110)


if __name__ == "__main__":
    main()
