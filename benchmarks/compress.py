"""Compression benchmark: size, speed and fidelity of every precision, side by side with the peers, in one run.

Rows: edgekit fp32, int4 GGUF carry-over (exact; default = exact layers + Q8_0 head with int8 activations; fast =
int8 activations everywhere), int4 RTN / HQQ / GPTQ, int4 with an fp16 KV cache, int8 RTN, the QDQ forms for
TensorRT, fp16, pruned variants; plus llama.cpp (llama-cpp-python) on the same GGUF and
onnxruntime-genai's int4 model built from the same weights, when those packages are installed.
Columns: size on disk, TTFT, decode tok/s (2 threads, medians of interleaved runs), top-1 agreement and KL vs the
PyTorch model (teacher-forced on the built-in parity prompts), perplexity on a built-in text.
Writes benchmarks/results/compress.{json,md,png} (for another --source: compress-<source>.*).

llama.cpp: on the 2-core dev box (an AMX-capable Xeon VM) a plain `pip install llama-cpp-python` builds with
GGML_NATIVE and dies with "Illegal instruction" on the first decode (AMX tiles it may not use); build it with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON" (every SIMD extension but AMX).

    python benchmarks/compress.py --runs 5
    python benchmarks/compress.py --source qwen2.5-coder-0.5b-instruct --variants gguf,fp32 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode import machine, pyplot, save_results  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA_CPP = "llama.cpp (same GGUF)"
CACHE = Path(".cache/benchmarks")
SPEED_PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
EVAL_TEXT = (
    "The history of the lighthouse is closely tied to the history of navigation. Before electric light, keepers "
    "tended oil lamps through the night, trimming wicks and polishing lenses so that ships could find the harbour. "
    "In the nineteenth century, the Fresnel lens made beams visible for many miles, and lighthouses spread along "
    "every dangerous coast. Today most of them are automated, but many are preserved as museums, and their keepers' "
    "logbooks remain a valuable record of weather, shipwrecks and daily life by the sea."
)
VARIANTS: list[tuple[str, list[str]]] = [
    ("fp32", ["--precision", "fp32"]),
    ("int4 gguf exact (acc 0, fp32 head)", ["--precision", "int4", "--algo", "gguf", "--lm-head", "fp32"]),
    ("int4 gguf default (acc 0, 8-bit head)", ["--precision", "int4"]),
    ("int4 gguf fast (acc 4)", ["--precision", "int4", "--algo", "gguf", "--accuracy-level", "4"]),
    ("int4 rtn (acc 4)", ["--precision", "int4", "--algo", "rtn", "--accuracy-level", "4"]),
    ("int4 hqq (acc 4)", ["--precision", "int4", "--algo", "hqq", "--accuracy-level", "4"]),
    ("int4 gptq (acc 4)", ["--precision", "int4", "--algo", "gptq", "--accuracy-level", "4"]),
    ("int4 rtn, fp16 KV cache", ["--precision", "int4", "--algo", "rtn", "--kv-cache", "fp16"]),
    ("int8 rtn (acc 4)", ["--precision", "int8", "--algo", "rtn", "--accuracy-level", "4"]),
    ("int4 QDQ weight-only (TensorRT form)", ["--precision", "int4", "--algo", "rtn", "--quant-format", "qdq"]),
    # the GPU flavours on the CPU provider (fidelity is what counts here: fp16 kernels are emulated on x86 CPUs)
    ("int4 gguf, cuda flavour (fp16)", ["--precision", "int4", "--target", "cuda"]),
    ("int4 gguf, tensorrt flavour (fp16)", ["--precision", "int4", "--target", "tensorrt"]),
    ("fp16", ["--precision", "fp16"]),
    ("fp32 pruned depth=4", ["--precision", "fp32", "--prune", "depth=4"]),
    ("fp32 pruned width=0.25", ["--precision", "fp32", "--prune", "width=0.25"]),
    ("fp32 sparsity 2:4", ["--precision", "fp32", "--prune", "sparsity=2:4"]),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dir_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


# --- engines: each gives full-sequence logits [S, V] for given ids, and timed greedy decoding ------------------------
class EdgekitEngine:
    def __init__(self, bundle: Path, threads: int) -> None:
        import edgekit.runtimes as rt

        self.model = rt.load(bundle, threads=threads)
        self.model.stop_ids = frozenset()

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model.graph.forward(ids, self.model.graph.new_cache(), logits_to_keep=len(ids))

    def speed(self, ids: list[int], n: int) -> tuple[float, float]:
        from edgekit.runtimes.model import run_one

        model = self.model
        seq = model.new_sequence(ids, model.params(len(ids), max_new_tokens=n, temperature=0))
        for _ in run_one(model.new_batch(1), seq):
            pass
        return seq.stats.ttft_s * 1000, seq.stats.decode_tokens_per_s


class LlamaCppEngine:
    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        kw = dict(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.full = Llama(logits_all=True, **kw)
        self.fast = Llama(logits_all=False, **kw)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.full.reset()
        self.full.eval(ids)
        return np.array(self.full.scores[: len(ids)], dtype=np.float32)

    def speed(self, ids: list[int], n: int) -> tuple[float, float]:
        llm = self.fast
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (n - 1) / (t2 - t1)


class GenaiEngine:
    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.clear_providers()
        self.model = og.Model(config)

    def _gen(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def logits(self, ids: list[int]) -> np.ndarray:
        gen = self._gen(len(ids) + 1)
        gen.append_tokens(ids)
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        return out.reshape(-1, out.shape[-1])[-len(ids):]

    def speed(self, ids: list[int], n: int) -> tuple[float, float]:
        gen = self._gen(len(ids) + n + 1)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (n - 1) / (t2 - t1)


# --- reference and metrics -----------------------------------------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def quality(engine: Any, prompts: list[list[int]], ref: list[np.ndarray], eval_ids: list[int]) -> dict[str, float]:
    agree = total = 0
    kls = []
    for ids, r in zip(prompts, ref):
        got = engine.logits(ids)
        agree += int((got.argmax(-1) == r.argmax(-1)).sum())
        total += len(ids)
        lp, lq = log_softmax(r), log_softmax(got)
        kls.append(float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1))))
    lg = log_softmax(engine.logits(eval_ids))
    nll = -np.mean([lg[i, eval_ids[i + 1]] for i in range(len(eval_ids) - 1)])
    return {"top1": agree / total, "kl": float(np.mean(kls)), "ppl": float(np.exp(nll))}


def reference(source: str, prompts: list[Any]) -> tuple[Any, list[list[int]], list[np.ndarray], list[int], Any]:
    import torch

    from edgekit.export import source as src
    from edgekit.export.prompts import reference_ids

    ref = src.resolve(source)
    model, tok = src.load_model(ref), src.load_tokenizer(ref)
    ids = [reference_ids(tok, p) for p in prompts]
    with torch.inference_mode():
        logits = [model(torch.tensor([i])).logits[0].float().numpy() for i in ids]
        eval_ids = tok(EVAL_TEXT)["input_ids"]
        ppl_ref = model(torch.tensor([eval_ids])).logits[0].float().numpy()
    return ref, ids, logits, eval_ids, (model, tok, ppl_ref)


def build_genai(model: Any, tok: Any, threads: int, tag: str = "") -> Path | None:
    """onnxruntime-genai's int4 CPU model from the same (dequantized) weights, via its model builder."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    out = CACHE / f"genai-int4{tag}"
    if (out / "genai_config.json").exists():
        return out
    hf = CACHE / f"hf{tag or '-smollm2'}"
    if not (hf / "config.json").exists():
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    log("building onnxruntime-genai int4 model ...")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(CACHE / "genai-cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        log(f"onnxruntime-genai builder failed: {r.stderr[-800:]}")
        shutil.rmtree(out, ignore_errors=True)
        return None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="", help="comma-separated substrings of the variant labels to run "
                    "(default: all)")
    args = ap.parse_args()
    wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
    variants = [(label, flags) for label, flags in VARIANTS if not wanted or any(w in label for w in wanted)]
    tag = "" if args.source == "smollm2-135m-instruct" else "-" + "".join(c if c.isalnum() or c in ".-" else "-"
                                                                           for c in args.source)
    CACHE.mkdir(parents=True, exist_ok=True)
    from edgekit.export.prompts import PROMPTS

    log("reference: loading the PyTorch model ...")
    ref, prompt_ids, ref_logits, eval_ids, (model, tok, ppl_ref_logits) = reference(args.source,
                                                                                    [p for _, p in PROMPTS])
    lp = log_softmax(ppl_ref_logits)
    ppl_ref = float(np.exp(-np.mean([lp[i, eval_ids[i + 1]] for i in range(len(eval_ids) - 1)])))
    speed_ids = tok.apply_chat_template(SPEED_PROMPT, add_generation_prompt=True, tokenize=True)
    speed_ids = list(speed_ids["input_ids"] if hasattr(speed_ids, "keys") else speed_ids)

    engines: dict[str, Any] = {}
    sizes: dict[str, float] = {}
    for label, flags in variants:
        bundle = CACHE / ("bundle" + tag + "-" + "".join(c if c.isalnum() else "-" for c in label))
        if not (bundle / "edgekit.json").exists():
            log(f"exporting {label} ...")
            subprocess.run([sys.executable, "-m", "edgekit", "export", args.source, "-o", str(bundle), "--force",
                            "--no-parity", *flags],
                           check=True, stderr=subprocess.DEVNULL)
        engines[f"edgekit {label}"] = EdgekitEngine(bundle, args.threads)
        sizes[f"edgekit {label}"] = dir_mb(bundle)
    gguf_path = ref.folder / ref.gguf_file if ref.gguf_file else None
    try:
        if gguf_path is not None:
            engines[LLAMA_CPP] = LlamaCppEngine(gguf_path, args.threads)
            sizes[LLAMA_CPP] = dir_mb(gguf_path)
    except ImportError:
        log("llama-cpp-python not installed: skipping the llama.cpp row")
    genai = build_genai(model, tok, args.threads, tag)
    if genai is not None:
        engines["onnxruntime-genai int4"] = GenaiEngine(genai, args.threads)
        sizes["onnxruntime-genai int4"] = dir_mb(genai)

    log("quality (teacher-forced logits vs PyTorch) ...")
    rows: dict[str, dict[str, Any]] = {}
    for name, eng in engines.items():
        rows[name] = {"size_mb": sizes[name], **quality(eng, prompt_ids, ref_logits, eval_ids)}
        log(f"  {name}: top-1 {rows[name]['top1']:.1%}, KL {rows[name]['kl']:.2e}, ppl {rows[name]['ppl']:.2f}")
    speeds: dict[str, list[tuple[float, float]]] = {n: [] for n in engines}
    for eng in engines.values():  # warm-up
        eng.speed(speed_ids, 8)
    for r in range(args.runs):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            speeds[name].append(engines[name].speed(speed_ids, args.new_tokens))
        log(f"run {r + 1}/{args.runs}: " + ", ".join(f"{n.split(' (')[0]} {s[-1][1]:.0f}" for n, s in speeds.items()))
    for name, s in speeds.items():
        rows[name]["ttft_ms"] = statistics.median(x[0] for x in s)
        rows[name]["decode_tok_s"] = statistics.median(x[1] for x in s)
    llama = rows.get(LLAMA_CPP)
    for row in rows.values():
        row["vs_llama_cpp"] = row["decode_tok_s"] / llama["decode_tok_s"] if llama else None
    result = {"benchmark": "compress", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "settings": {"source": args.source, "threads": args.threads, "runs": args.runs,
                           "new_tokens": args.new_tokens, "prompt_tokens": len(speed_ids),
                           "fidelity": f"teacher-forced on the {len(PROMPTS)} parity prompts "
                                       f"({sum(map(len, prompt_ids))} positions)",
                           "reference_perplexity": ppl_ref},
              "rows": rows, "raw_speeds": speeds}
    for pkg in ("llama_cpp_python", "onnxruntime_genai"):
        try:
            from importlib import metadata

            result["machine"]["versions"][pkg] = metadata.version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001 - absent peers are simply not listed
            pass
    save_results("compress" + tag, result, render, lambda r: plot(r, "compress" + tag))


def render(r: dict) -> str:
    s = r["settings"]
    lines = [f"# Compression benchmark ({r['date']})", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; {s['threads']} threads; {s['runs']} "
             f"interleaved runs, medians; {s['new_tokens']} greedy tokens after a {s['prompt_tokens']}-token prompt. "
             f"Fidelity: {s['fidelity']} against the PyTorch model (its perplexity on the eval text: "
             f"{s['reference_perplexity']:.2f}).",
             f"Versions: {', '.join(f'{k} {v}' for k, v in r['machine']['versions'].items())}", "",
             "| engine | size MB | TTFT ms | decode tok/s | vs llama.cpp | top-1 | KL | perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        vs = f"{row['vs_llama_cpp']:.2f}x" if row.get("vs_llama_cpp") else "-"
        lines.append(f"| {name} | {row['size_mb']:.0f} | {row['ttft_ms']:.0f} | {row['decode_tok_s']:.1f} | {vs} | "
                     f"{row['top1']:.1%} | {row['kl']:.2e} | {row['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, out: str = "compress") -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in r["rows"].items():
        color = "#2b7bba" if name.startswith("edgekit") else "#d95f02"
        a.scatter(row["size_mb"], row["top1"] * 100, color=color)
        a.annotate(name.replace("edgekit ", ""), (row["size_mb"], row["top1"] * 100), fontsize=7)
        b.scatter(row["decode_tok_s"], row["top1"] * 100, color=color)
        b.annotate(name.replace("edgekit ", ""), (row["decode_tok_s"], row["top1"] * 100), fontsize=7)
    a.set_xlabel("size on disk (MB)")
    b.set_xlabel("decode tok/s")
    for ax in (a, b):
        ax.set_ylabel("top-1 agreement with PyTorch (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{r['settings']['source']}: quality vs size and speed (blue: edgekit, orange: peers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=110)


if __name__ == "__main__":
    main()
