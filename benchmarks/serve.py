"""Serving benchmark: aggregate tok/s and TTFT p50/p95 at 1, 2, 4, 8 concurrent streams; server overhead vs the
in-process runtime at 1 stream; TTFT of a chat's second turn with and without prefix KV reuse.

Runs the real ``edgekit serve`` (subprocess, loopback only) on a bundle; everything is measured in one run.
Writes benchmarks/results/serve.{json,md,png}.

    python benchmarks/serve.py --bundle bundles/smollm2 --rounds 3
    python benchmarks/serve.py --bundle .cache/dllm/pairs_copy/bundle-bdllm --task pairs_copy \
        --fields '{"diffusion_steps": 48, "threshold": 0.9}' --max-tokens 48 --concurrency 1,2,4
      (a dLLM bundle: the task's prompts through /v1/completions, the fields sent with every request; writes
       results/serve-<task>.*; no chat-turn part; --threads N other than 2 adds -tN to the name)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from decode import machine, pyplot, save_results  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the ocean", "a robot learning to paint", "a city on Mars", "an old lighthouse", "a lost cat",
          "the first snow of winter", "a chess tournament", "a mountain village"]


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, threads: int, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", str(bundle), "--port",
                                      str(self.port), "--threads", str(threads), "--model-name", "m", *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


FIELDS: dict = {}  # extra request fields (--fields)


def stream_once(url: str, messages: list[dict] | str, max_tokens: int, client: httpx.Client | None = None) -> dict:
    """One streamed chat request (or completions, for a prompt string); client-side timings. ``client``: a kept-alive
    connection (as real clients hold; making an ``httpx.Client`` costs ~10 ms of CPU, which would be timed)."""
    own = client is None
    client = client or httpx.Client(timeout=300)
    start = time.perf_counter()
    times: list[float] = []
    usage = {}
    chat = not isinstance(messages, str)
    body = {"model": "m", ("messages" if chat else "prompt"): messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **FIELDS}
    text = []
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with client.stream("POST", url + path, json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            elif obj["choices"]:
                piece = obj["choices"][0].get("delta", {}).get("content") or obj["choices"][0].get("text")
                if piece:
                    times.append(time.perf_counter())
                    text.append(piece)
    end = time.perf_counter()
    if own:
        client.close()
    n = usage.get("completion_tokens", len(times))
    return {"ttft_s": times[0] - start, "end_s": end, "start_s": start, "tokens": n, "text": "".join(text),
            "decode_tok_s": (n - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
            "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def concurrent(url: str, c: int, max_tokens: int, offset: int, per_stream: int = 1) -> dict:
    """``c`` streams at once, each on its own kept-alive connection sending ``per_stream`` requests back to back;
    aggregate tok/s = all tokens / the wall time from the first request to the last answer."""
    results: list[list[dict]] = [[] for _ in range(c)]
    clients = [httpx.Client(timeout=300) for _ in range(c)]
    for cl in clients:  # connect before timing
        cl.get(url.rsplit("/v1", 1)[0] + "/health")

    def run(i: int) -> None:
        for k in range(per_stream):
            results[i].append(stream_once(url, prompt(offset + i * per_stream + k), max_tokens, clients[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cl in clients:
        cl.close()
    done = [r for rs in results for r in rs]
    wall = max(r["end_s"] for r in done) - min(r["start_s"] for r in done)
    return {"aggregate_tok_s": sum(r["tokens"] for r in done) / wall, "ttfts": [r["ttft_s"] for r in done]}


def in_process(model, c: int, max_tokens: int, offset: int, per_stream: int = 1) -> float:
    """The same load without HTTP: c * per_stream requests through the model's own batch, at most c at once;
    aggregate tok/s (what continuous batching alone gives on this machine)."""
    batch = model.new_batch(c)
    pending = [model.tokenizer.encode_prompt(prompt(offset + i)) for i in range(c * per_stream)]
    seqs = []
    start = time.perf_counter()
    while pending or batch.active:
        while pending and len(batch.active) < c:
            ids = pending.pop(0)
            seqs.append(model.new_sequence(ids, model.params(len(ids), max_new_tokens=max_tokens, temperature=0,
                                                             **FIELDS)))
            batch.admit(seqs[-1])
        batch.step()
    return sum(len(q.stats.token_ids) for q in seqs) / (time.perf_counter() - start)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/smollm2"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--task", default=None, help="a train_dllm task: its prompts via /v1/completions (dLLM bundles)")
    ap.add_argument("--requests-per-stream", type=int, default=1, help="requests each stream sends back to back")
    ap.add_argument("--fields", default="{}", help="JSON object of extra request fields (e.g. diffusion settings)")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    FIELDS.update(json.loads(args.fields))
    if args.task is not None:
        import numpy as np
        from train_dllm import sample

        texts, _ = sample(np.random.default_rng(7), 64, args.task)
        global prompt
        prompt = lambda i: texts[i % len(texts)]  # noqa: E731
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import edgekit.runtimes as rt

    print("starting servers and loading the in-process runtime ...", file=sys.stderr)
    server = Server(args.bundle, args.threads)
    cold = Server(args.bundle, args.threads, "--prefix-cache-entries", "0")
    model = rt.load(args.bundle, threads=args.threads, spin=False)  # as the server (edgekit serve --no-spin)

    per_level: dict[int, list[dict]] = {c: [] for c in levels}
    batched: dict[int, list[float]] = {c: [] for c in levels}  # the same load in-process (no HTTP)
    inproc: list[float] = []
    served: list[float] = []
    inproc_e2e: list[float] = []  # whole request: tokens / wall time (prefill and first block included)
    served_e2e: list[float] = []
    warm_t2: list[float] = []
    cold_t2: list[float] = []
    cached_tokens = 0
    warm = args.max_tokens if args.task else 8
    stream_once(server.url, prompt(0), warm)  # warm-up
    stream_once(cold.url, prompt(0), warm)
    for r in range(args.rounds):
        # 1 stream: in-process runtime vs server, back to back
        t0 = time.perf_counter()
        s = model.stream(prompt(r), max_new_tokens=args.max_tokens, temperature=0, **FIELDS)
        for _ in s:
            pass
        inproc_e2e.append(s.stats.generated_tokens / (time.perf_counter() - t0))
        inproc.append(s.stats.decode_tokens_per_s)
        with httpx.Client(timeout=300) as kept:
            kept.get(server.url + "/health")
            one = stream_once(server.url, prompt(r), args.max_tokens, kept)
        served.append(one["decode_tok_s"])
        served_e2e.append(one["tokens"] / (one["end_s"] - one["start_s"]))
        for c in levels:
            per_level[c].append(concurrent(server.url, c, args.max_tokens, offset=r * 8,
                                           per_stream=args.requests_per_stream))
            batched[c].append(in_process(model, c, args.max_tokens, r * 8, args.requests_per_stream))
        if args.task is not None:
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{c}x {per_level[c][-1]['aggregate_tok_s']:.1f}" for c in levels), file=sys.stderr)
            continue
        # a chat's second turn: with prefix reuse (server) vs without (cold server), same request
        turn1 = [{"role": "user", "content": f"Tell me about {TOPICS[(r + 3) % len(TOPICS)]} in three sentences."}]
        for srv, out in ((server, warm_t2), (cold, cold_t2)):
            a1 = stream_once(srv.url, turn1, 48)
            turn2 = turn1 + [{"role": "assistant", "content": a1["text"]},
                             {"role": "user", "content": "Now summarise that in one sentence."}]
            t2 = stream_once(srv.url, turn2, 16)
            out.append(t2["ttft_s"])
            if srv is server:
                cached_tokens = t2["cached"]
        print(f"round {r + 1}/{args.rounds}: in-process {inproc[-1]:.1f} tok/s, served {served[-1]:.1f} tok/s; "
              + ", ".join(f"{c}x {per_level[c][-1]['aggregate_tok_s']:.1f}" for c in levels), file=sys.stderr)
    server.stop()
    cold.stop()

    rows = []
    for c in levels:
        ttfts = [t for run in per_level[c] for t in run["ttfts"]]
        rows.append({"concurrency": c, "aggregate_tok_s": statistics.median(x["aggregate_tok_s"] for x in per_level[c]),
                     "ttft_p50_ms": pct(ttfts, 0.5) * 1000, "ttft_p95_ms": pct(ttfts, 0.95) * 1000,
                     "in_process_tok_s": statistics.median(batched[c])})
    base, base_in = rows[0]["aggregate_tok_s"], rows[0]["in_process_tok_s"]
    for row in rows:
        row["scaling"] = row["aggregate_tok_s"] / base
        row["in_process_scaling"] = row["in_process_tok_s"] / base_in
    result = {
        "benchmark": "serve", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "settings": {"bundle": str(args.bundle), "threads": args.threads, "rounds": args.rounds,
                     "max_tokens": args.max_tokens, "decoding": "greedy",
                     "requests_per_stream": args.requests_per_stream},
        "concurrency": rows,
        "single_stream": {"in_process_decode_tok_s": statistics.median(inproc),
                          "server_decode_tok_s": statistics.median(served),
                          "server_overhead": 1 - statistics.median(served) / statistics.median(inproc),
                          "in_process_e2e_tok_s": statistics.median(inproc_e2e),
                          "server_e2e_tok_s": statistics.median(served_e2e)},
        "prefix_reuse": None if args.task else {"turn2_ttft_ms_with_reuse": statistics.median(warm_t2) * 1000,
                                                "turn2_ttft_ms_without": statistics.median(cold_t2) * 1000,
                                                "cached_prompt_tokens": cached_tokens},
        "raw": {"inproc": inproc, "served": served, "warm_t2": warm_t2, "cold_t2": cold_t2},
    }
    result["settings"].update(task=args.task, fields=FIELDS)
    name = ("serve" if args.task is None else f"serve-{args.task}") + ("" if args.threads == 2 else f"-t{args.threads}")
    save_results(name, result, render, lambda r: plot(r, name))


def render(r: dict) -> str:
    s, ss, pr = r["settings"], r["single_stream"], r["prefix_reuse"]
    lines = [f"# Serving benchmark ({r['date']})", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; server threads={s['threads']}; bundle "
             f"{s['bundle']}; {s['rounds']} rounds, medians; {s['max_tokens']} max tokens per request, greedy"
             + (f"; task {s['task']} prompts, request fields {s['fields']}." if s.get("task") else "."),
             f"Versions: {', '.join(f'{k} {v}' for k, v in r['machine']['versions'].items())}", "",
             "| concurrent streams | aggregate tok/s | vs 1 stream | TTFT p50 (ms) | TTFT p95 (ms) | same load "
             "in-process (no HTTP) tok/s | vs 1 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["concurrency"]:
        inp = (f"{row['in_process_tok_s']:.1f} | {row['in_process_scaling']:.2f}x" if "in_process_tok_s" in row
               else "- | -")
        lines.append(f"| {row['concurrency']} | {row['aggregate_tok_s']:.1f} | {row['scaling']:.2f}x | "
                     f"{row['ttft_p50_ms']:.0f} | {row['ttft_p95_ms']:.0f} | {inp} |")
    lines += ["", f"Single stream decode: in-process runtime {ss['in_process_decode_tok_s']:.1f} tok/s, through the "
              f"server {ss['server_decode_tok_s']:.1f} tok/s: server overhead **{ss['server_overhead'] * 100:.1f}%**."
              + (f" Whole request (tokens / wall time, first block included): in-process "
                 f"{ss['in_process_e2e_tok_s']:.1f} tok/s, through the server {ss['server_e2e_tok_s']:.1f} tok/s."
                 if "server_e2e_tok_s" in ss else ""),
              f"Each stream keeps its connection and sends {s.get('requests_per_stream', 1)} request(s) back to back.",
              ""]
    if pr:
        lines += [f"Second chat turn TTFT: {pr['turn2_ttft_ms_with_reuse']:.0f} ms with prefix KV reuse "
                  f"({pr['cached_prompt_tokens']} prompt tokens from cache) vs {pr['turn2_ttft_ms_without']:.0f} ms "
                  "without (same request, server with --prefix-cache-entries 0).", ""]
    return "\n".join(lines)


def plot(r: dict, name: str = "serve") -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = r["concurrency"]
    c = [x["concurrency"] for x in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(c, [x["aggregate_tok_s"] for x in rows], "o-", color="#2b7bba")
    a.set_xlabel("concurrent streams")
    a.set_ylabel("aggregate tok/s")
    a.set_xticks(c)
    a.set_title("throughput (continuous batching)", fontsize=10)
    b.plot(c, [x["ttft_p50_ms"] for x in rows], "o-", label="p50")
    b.plot(c, [x["ttft_p95_ms"] for x in rows], "s--", label="p95")
    b.set_xlabel("concurrent streams")
    b.set_ylabel("TTFT ms")
    b.set_xticks(c)
    b.legend()
    b.set_title("time to first token", fontsize=10)
    fig.suptitle(f"edgekit serve, {r['settings']['bundle']}, {r['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
