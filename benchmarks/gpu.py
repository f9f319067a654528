"""The device check for a GPU machine: per available execution provider (TensorRT, CUDA, CPU), the bundle of the
matching target flavour verified torch-free against the reference it stores (``edgekit verify``) and its decode
speed, within a time budget. Writes benchmarks/results/gpu.{json,md}. On a machine without a GPU provider it says
what it skipped and exits 0.

Bundles are made on a dev box (the GPU machine may have no torch and no network) and copied over:

    edgekit export smollm2-135m-instruct -o bundles/smollm2-cuda --precision int4 --target cuda
    edgekit export smollm2-135m-instruct -o bundles/smollm2-trt --precision int4 --target tensorrt
    edgekit export smollm2-135m-instruct -o bundles/smollm2 --precision int4          # the CPU flavour
    python benchmarks/gpu.py --bundles bundles/smollm2-cuda bundles/smollm2-trt bundles/smollm2 --minutes 10

Each bundle runs on the providers its target is for (a cuda bundle on the CUDA EP, a tensorrt bundle on the
TensorRT EP, whose first run builds the engine into ``<bundle>.trt-cache``; that build is timed separately).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROVIDER_OF = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}
PROMPT = "Explain in three sentences why the sky is blue."


def plan(bundles: list[Path], available: list[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(bundle, provider) pairs to run, and one line per thing skipped."""
    from edgekit.runtimes.bundle import read_manifest

    runs, skipped = [], []
    for path in bundles:
        target = read_manifest(path).runtime.target
        provider = PROVIDER_OF[target]
        if provider in available:
            runs.append((path, provider))
        else:
            skipped.append(f"{path} ({target} flavour): {provider} is not in this onnxruntime build "
                           f"(available: {', '.join(available)})")
    return runs, skipped


def decode_speed(path: Path, provider: str, tokens: int, runs: int) -> dict:
    import edgekit.runtimes as rt
    from edgekit.runtimes.model import run_one

    start = time.perf_counter()
    model = rt.load(path, providers=[provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider"
                    else [provider])
    ids = model.tokenizer.encode_prompt([{"role": "user", "content": PROMPT}])
    model.stop_ids = frozenset()

    def once(n: int) -> float:
        seq = model.new_sequence(ids, model.params(len(ids), max_new_tokens=n, temperature=0))
        for _ in run_one(model.new_batch(1), seq):
            pass
        return seq.stats.decode_tokens_per_s

    once(4)  # the first run builds TensorRT engines / CUDA kernels' tactics
    ready = time.perf_counter() - start
    speeds = [once(tokens) for _ in range(runs)]
    return {"decode_tok_s": statistics.median(speeds), "runs": speeds, "load_and_first_run_s": ready,
            "session_providers": model.graph.session.get_providers()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", type=Path, nargs="+", default=[])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    gpu = [p for p in available if p in (PROVIDER_OF["cuda"], PROVIDER_OF["tensorrt"])]
    if not gpu:
        print(f"No GPU execution provider in this onnxruntime build (available: {', '.join(available)}): skipped "
              "the CUDA and TensorRT checks. Nothing was run; exit 0.")
        return 0
    missing = [str(p) for p in args.bundles if not (p / "edgekit.json").is_file()]
    if not args.bundles or missing:
        print(f"No bundle at {', '.join(missing) or '(none given)'}: pass --bundles made on a dev box (see the "
              "docstring).", file=sys.stderr)
        return 2
    from edgekit.verify import verify

    runs, skipped = plan(args.bundles, available)
    deadline = time.monotonic() + args.minutes * 60
    rows = []
    for path, provider in runs:
        if time.monotonic() > deadline:
            skipped.append(f"{path} on {provider}: out of the {args.minutes:g}-minute budget")
            continue
        print(f"{path} on {provider}: verify ...", flush=True)
        t0 = time.perf_counter()
        report = verify(path, providers=[provider, "CPUExecutionProvider"])
        summary = report.to_dict()["summary"]
        row = {"bundle": str(path), "provider": provider, "parity_passed": report.passed,
               "verify_s": time.perf_counter() - t0, **{f"parity_{k}": v for k, v in summary.items()}}
        print(f"  parity {'PASSED' if report.passed else 'FAILED'} ({summary}); decode ...", flush=True)
        row.update(decode_speed(path, provider, args.tokens, args.runs))
        print(f"  {row['decode_tok_s']:.1f} tok/s", flush=True)
        rows.append(row)
    host = machine()
    lines = ["# GPU device check", "",
             f"Machine: {host['cpu']}; versions: {host['versions']}; providers: {', '.join(available)}", "",
             "| bundle | provider | parity | top-1 | max abs diff | decode (tok/s) | load + first run (s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['bundle']} | {r['provider']} | {'passed' if r['parity_passed'] else 'FAILED'} | "
                     f"{r.get('parity_top1', float('nan')):.2%} | {r.get('parity_max_abs_diff', float('nan')):.3g} | "
                     f"{r['decode_tok_s']:.1f} | {r['load_and_first_run_s']:.1f} |")
    lines += ["", *[f"- skipped: {s}" for s in skipped]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps({"machine": machine(), "providers": available, "rows": rows,
                                                  "skipped": skipped}, indent=2))
    (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["parity_passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
