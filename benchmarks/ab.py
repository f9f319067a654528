"""A/B of two edgekit checkouts on one machine in one run: export time and decode speed, side by side, alternated.

Each side is a Python interpreter whose environment imports its own edgekit (e.g. a venv with the previous commit
installed editable). Every measurement runs in a fresh subprocess of that side's interpreter, the sides alternated
round by round so that the shared machine's drift hits both; the table gives medians and the B/A ratio.

    python benchmarks/ab.py --side before=/work/venv-base/bin/python --side after=.venv/bin/python \\
        --model smollm2-135m-instruct --precisions fp32,int4 --rounds 5

Export: ``edgekit export MODEL --precision P`` with parity (the default), timed whole, once per side and precision
(``--export-rounds``). Decode: single stream (64 greedy tokens of the built-in story prompt, median of the runs in a
round) and a batch of 4 concurrent requests through the engine (aggregate generated tok/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, threading, time
from edgekit.runtimes import load
from edgekit.runtimes.engine import Engine, Request

bundle, threads, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = load(bundle, threads=threads)
prompt = [{"role": "user", "content": "Write a short story about the sea."}]
def one():
    s = m.stream(prompt, max_new_tokens=tokens, temperature=0)
    for _ in s:
        pass
    return s.stats.decode_tokens_per_s
one()  # warm-up
single = sorted(one() for _ in range(3))[1]
topics = ["the sea", "a mountain", "a city at night", "a small robot"]
ids = [m.tokenizer.encode_prompt([{"role": "user", "content": f"Write a short story about {t}."}]) for t in topics]
engine = Engine(m, max_batch=4, max_queue=8).start()
done = threading.Semaphore(0)
made = []
def on_event(ev):
    if getattr(ev, "type", None) in ("done", "error") or getattr(ev, "kind", None) in ("done", "error"):
        made.append(ev.stats.generated_tokens if ev.stats else 0)
        done.release()
t0 = time.perf_counter()
for x in ids:
    engine.submit(Request(x, m.params(len(x), max_new_tokens=tokens, temperature=0.0), on_event))
for _ in ids:
    done.acquire()
wall = time.perf_counter() - t0
engine.stop()
print(json.dumps({"single_tok_s": single, "batch4_tok_s": sum(made) / wall}))
"""


def run(python: str, args: list[str], timeout: float = 1800) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout,  # (outside any checkout:
                         cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its own edgekit)
    if out.returncode != 0:
        raise SystemExit(f"{python} {' '.join(args[:3])} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out.stdout


def versions(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as md, subprocess, edgekit, os; "
            "root = os.path.dirname(os.path.dirname(edgekit.__file__)); "
            "rev = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], capture_output=True, "
            "text=True).stdout.strip(); "
            "print(json.dumps({'commit': rev, **{d: md.version(d) for d in ('onnxruntime', 'transformers', "
            "'torch')}}))")
    return json.loads(run(python, ["-c", code])[1])


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", action="append", required=True, help="NAME=PYTHON (twice: A then B)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--export-rounds", type=int, default=1, help="0: reuse the bundles already in --work")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=None, help="Folder for the bundles [a temporary one].")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ab.md"))
    args = ap.parse_args()
    sides = [tuple(s.split("=", 1)) for s in args.side]
    if len(sides) != 2:
        raise SystemExit("give exactly two --side NAME=PYTHON")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit-ab-"))
    precisions = args.precisions.split(",")
    export_s: dict[tuple[str, str], list[float]] = {}
    for r in range(args.export_rounds):
        for precision in precisions:
            for name, python in (sides if r % 2 == 0 else sides[::-1]):
                out = work / f"{name}-{precision}"
                secs, _ = run(python, ["-m", "edgekit", "export", args.model, "-o", str(out), "--force",
                                       "--precision", precision])
                export_s.setdefault((name, precision), []).append(secs)
                print(f"export {name} {precision}: {secs:.1f} s", file=sys.stderr, flush=True)
    decode: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for precision in precisions:
            for name, python in (sides if r % 2 == 0 else sides[::-1]):
                _, text = run(python, ["-c", WORKER, str(work / f"{name}-{precision}"), str(args.threads),
                                       str(args.tokens)])
                decode.setdefault((name, precision), []).append(json.loads(text.strip().splitlines()[-1]))
                print(f"round {r} {name} {precision}: {text.strip()}", file=sys.stderr, flush=True)
    (a, pa), (b, pb) = sides
    va, vb = versions(pa), versions(pb)
    lines = [f"# A/B: {a} ({va['commit']}) vs {b} ({vb['commit']})", "",
             f"`python benchmarks/ab.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {cpu()}; onnxruntime {vb['onnxruntime']}, transformers {vb['transformers']}, torch "
             f"{vb['torch']}; {args.threads} onnxruntime threads; {args.rounds} alternated rounds (medians).", "",
             f"| measure | precision | {a} | {b} | {b} / {a} |", "|---|---|---:|---:|---:|"]
    for precision in precisions:
        if export_s:
            ea, eb = (statistics.median(export_s[(s, precision)]) for s in (a, b))
            lines.append(f"| export with parity (s) | {precision} | {ea:.1f} | {eb:.1f} | {eb / ea:.3f} |")
        for key, label in (("single_tok_s", "decode, 1 stream (tok/s)"), ("batch4_tok_s", "decode, 4 requests "
                                                                                          "(aggregate tok/s)")):
            ma, mb = (statistics.median(x[key] for x in decode[(s, precision)]) for s in (a, b))
            ratios = [y[key] / x[key] for x, y in zip(decode[(a, precision)], decode[(b, precision)])]
            lines.append(f"| {label} | {precision} | {ma:.1f} | {mb:.1f} | {mb / ma:.3f} (per-round median "
                         f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}) |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
