"""onnxruntime sessions: execution providers from the bundle (or the caller), threads, and graph I/O checks."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.runtimes import flavour
from edgekit.runtimes.bundle import GraphSpec, KVCacheLayout, RuntimeSpec, bundle_file, release
from edgekit.runtimes.errors import BundleError, ConfigError, OnnxruntimeVersionError, did_you_mean

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass(frozen=True)
class BackendOptions:
    """How sessions are created. ``providers=None``: the bundle's recorded order; ``threads=None``: ORT decides;
    ``spin=False``: onnxruntime's worker threads sleep between runs instead of busy-waiting (a server whose HTTP side
    shares the cores wants that; None: onnxruntime's default, spinning)."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None
    spin: bool | None = None
    engine_cache: Path | None = None  # TensorRT engine + timing caches [a folder beside the bundle]
    # KV buffers as onnxruntime OrtValues bound by pointer (None: on a GPU; True on the CPU runs the GPU's code path)
    device_buffers: bool | None = None


TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"


def engine_cache_dir(bundle_dir: Path, options: BackendOptions) -> Path:
    """Where the TensorRT EP keeps the bundle's engines and timing cache: beside the bundle (``<bundle>.trt-cache``),
    since building an engine on an Orin takes minutes and the bundle folder itself is hashed content."""
    return options.engine_cache or bundle_dir.parent / f"{bundle_dir.name}.trt-cache"


def provider_list(providers: Sequence[str], runtime: RuntimeSpec, bundle_dir: Path,
                  options: BackendOptions) -> list[tuple[str, dict[str, str]]]:
    """(provider, options) pairs for onnxruntime: the options the bundle recorded for each provider, plus, for the
    TensorRT EP, the engine and timing cache paths where this bundle is run."""
    out = []
    for name in providers:
        opts = dict(runtime.provider_options.get(name, {}))
        if name == TENSORRT:
            cache = str(engine_cache_dir(bundle_dir, options))
            opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=cache,
                        trt_timing_cache_enable="True", trt_timing_cache_path=cache)
        out.append((name, opts))
    return out


# the decoder graph's inputs TensorRT reads as shape tensors (logits_to_keep is a Slice start): their profile entries
# are value ranges (min, opt, max) in place of dims, as onnxruntime's TensorRT EP reads them
TRT_SHAPE_INPUTS = ("logits_to_keep",)
SERVE_PREFIX_ROWS = 8  # the rows edgekit serve keeps for its prefix cache by default (--prefix-cache-entries)


def tensorrt_profiles(layout: KVCacheLayout, max_context: int, max_batch: int,
                      prefix_rows: int = SERVE_PREFIX_ROWS) -> dict[str, str]:
    """The TensorRT EP's explicit optimization profile for a decoder graph (``trt_profile_{min,opt,max}_shapes``):
    one profile from one row of one token on an empty past to ``max_batch + prefix_rows`` rows (a batch's step runs
    every row up to the highest active one, prefix-cache rows included) of up to ``max_context`` positions, tuned
    for decoding ``max_batch`` rows of one token. One profile, because onnxruntime's TensorRT EP keeps its execution
    context on profile 0 (onnxruntime PR #31624, open): shapes outside it would fail or rebuild the engine.
    ``logits_to_keep`` is a shape tensor for TensorRT: its entry is its value, 1 (decoding) to ``max_context`` (a
    chunk's every position)."""
    C, B, kvh, hd = max_context, max_batch, layout.num_kv_heads, layout.head_dim
    rows = max_batch + max(prefix_rows, 0)
    pasts = [n.format(layer=i) for i in range(layout.num_layers) for n in (layout.past_key, layout.past_value)]
    dims = lambda t: "x".join(map(str, t))  # noqa: E731
    shapes = {"min": ((1, 1), (1, 1), (1, kvh, 0, hd), 1), "opt": ((B, 1), (B, C // 2), (B, kvh, C // 2 - 1, hd), 1),
              "max": ((rows, C), (rows, C), (rows, kvh, C - 1, hd), C)}  # (input_ids, attention_mask, past, kept)
    return {f"trt_profile_{key}_shapes": ",".join([f"input_ids:{dims(ids)}", f"attention_mask:{dims(mask)}",
                                                   *(f"{n}:{dims(past)}" for n in pasts),
                                                   *(f"{n}:{kept}" for n in TRT_SHAPE_INPUTS)])
            for key, (ids, mask, past, kept) in shapes.items()}


def tensorrt_rows(runtime: RuntimeSpec) -> int | None:
    """The most rows the bundle's recorded TensorRT profile covers (None: no profile recorded)."""
    spec = runtime.provider_options.get(TENSORRT, {}).get("trt_profile_max_shapes", "")
    hit = re.search(r"(?:^|,)input_ids:(\d+)x", spec)
    return int(hit.group(1)) if hit else None


def check_rows(runtime: RuntimeSpec, rows: int, providers: Sequence[str]) -> None:
    """Refuse a batch of more KV rows than the TensorRT profile the bundle records, when TensorRT runs it."""
    most = tensorrt_rows(runtime)
    if TENSORRT in providers and most is not None and rows > most:
        raise ConfigError(f"This batch needs {rows} KV rows (max batch + prefix-cache entries), but the bundle's "
                          f"TensorRT profile covers {most}. HINT: lower --max-batch / --prefix-cache-entries, or "
                          f"re-export with --batch {max(rows - SERVE_PREFIX_ROWS, 1)} (the profile adds "
                          f"{SERVE_PREFIX_ROWS} prefix-cache rows).")


def running_onnxruntime() -> tuple[int, ...]:
    """This process's onnxruntime release, e.g. (1, 20, 1) (a dev or rc suffix ignored)."""
    version = flavour.module().__version__
    return tuple(int(m.group()) for p in version.split(".")[:3] if (m := re.match(r"\d+", p)))


def check_onnxruntime(runtime: RuntimeSpec, bundle_dir: Path) -> None:
    """Refuse a bundle whose graphs need a newer onnxruntime than this one, naming both and the fix (an older
    release may refuse the graph, or worse, load it and fail or compute wrong values when a node runs)."""
    need, have = release(runtime.min_onnxruntime), running_onnxruntime()
    if have < need:
        ours = ".".join(map(str, have[:2]))
        raise OnnxruntimeVersionError(
            f"Bundle '{bundle_dir}' needs onnxruntime >= {runtime.min_onnxruntime} (for "
            f"{runtime.min_onnxruntime_for or 'its graphs'}); this is onnxruntime {flavour.module().__version__}. "
            f"HINT: upgrade onnxruntime (on a Jetson: the onnxruntime-gpu wheel of a newer JetPack), or re-export the "
            f"bundle for this onnxruntime: 'edgekit export ... --onnxruntime {ours}' (or --device with its profile).")


def available_providers() -> list[str]:
    return list(flavour.module().get_available_providers())


def choose_providers(requested: Sequence[str] | None, recorded: Sequence[str] = ("CPUExecutionProvider",)) -> list[str]:
    """The caller's providers (each must exist), else the bundle's recorded preference filtered by what this
    onnxruntime build has (with a warning when the first choice is missing), else CPU."""
    available = available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ConfigError(
                f"Execution provider {unknown[0]!r} is not available in this onnxruntime build. "
                f"Available: {', '.join(available)}.{did_you_mean(unknown[0], available)}")
        return list(requested)
    usable = [p for p in recorded if p in available] or ["CPUExecutionProvider"]
    if recorded and recorded[0] not in available:
        clash = flavour.clash()
        print(f"warning: the bundle prefers {recorded[0]}, which this onnxruntime build lacks; running on "
              f"{usable[0]}. " + (clash or "HINT: install the onnxruntime build for this device ('edgekit[gpu]', or "
                                  "the Jetson's platform wheel), or pass --provider."), file=sys.stderr)
    return usable


def create_session(bundle_dir: Path, graph: GraphSpec, options: BackendOptions, runtime: RuntimeSpec,
                   inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> ort.InferenceSession:
    """A session for one graph of a bundle. ``inputs``/``outputs``: names the caller will feed and fetch; they must
    be in the manifest's graph spec, and the spec must be what the graph really has."""
    missing = [n for n in inputs if n not in graph.inputs] + [n for n in outputs if n not in graph.outputs]
    if missing:
        raise BundleError(f"The manifest's graph '{graph.file}' lacks the I/O name(s) {', '.join(missing[:4])} this "
                          "runtime needs. HINT: re-export the bundle with this edgekit version.")
    path = bundle_file(bundle_dir, graph.file, "graph")
    ort = flavour.module()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads is not None:
        if options.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {options.threads}.")
        so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    if options.spin is False:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    for key, value in runtime.session_config.items():
        so.add_session_config_entry(key, value)
    providers = choose_providers(options.providers, runtime.providers)
    try:
        session = ort.InferenceSession(str(path), so, providers=provider_list(providers, runtime, bundle_dir, options),
                                       disabled_optimizers=list(runtime.disabled_optimizers) or None)
    except Exception as e:  # onnxruntime raises several unrelated types for a corrupt or foreign graph
        raise BundleError(
            f"onnxruntime cannot load '{path}': {str(e).strip().splitlines()[0][:300]}. "
            "HINT: the ONNX file is corrupt or was made for another onnxruntime; re-export the bundle.") from None
    have = (tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()))
    if have != (tuple(graph.inputs), tuple(graph.outputs)):
        raise BundleError(f"Graph '{path}' does not match its manifest entry: it has inputs {list(have[0])[:4]}... "
                          f"and outputs {list(have[1])[:3]}..., the manifest says {list(graph.inputs)[:4]}... and "
                          f"{list(graph.outputs)[:3]}.... HINT: re-export the bundle.")
    return session


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def check_dims(session: ort.InferenceSession, where: str, expected: dict[str, dict[int, int]],
               dtypes: dict[str, str] | None = None) -> None:
    """Refuse a graph whose declared tensor dims (where the graph fixes them) or element types disagree with what the
    manifest says: ``expected`` maps a tensor name to {axis: size}; ``dtypes`` a name to "float32"/"float16"."""
    args = {a.name: a for a in (*session.get_inputs(), *session.get_outputs())}
    for name, axes in expected.items():
        shape = args[name].shape
        for axis, size in axes.items():
            got = shape[axis] if -len(shape) <= axis < len(shape) else None
            if isinstance(got, int) and got != size:
                raise BundleError(f"Bundle manifest disagrees with graph '{where}': '{name}' has size {got} on axis "
                                  f"{axis}, the manifest says {size}. HINT: the manifest or the graph was altered; "
                                  "re-export the bundle.")
    for name, dtype in (dtypes or {}).items():
        if args[name].type != ORT_TYPES.get(dtype, dtype):
            raise BundleError(f"Bundle manifest disagrees with graph '{where}': '{name}' is {args[name].type}, the "
                              f"manifest says {dtype}. HINT: re-export the bundle.")


def run_graph(session: ort.InferenceSession, outputs: Sequence[str], feeds: dict, where: str) -> list:
    """``session.run``, with onnxruntime's failures (a graph that disagrees with its manifest in a way the load
    checks cannot see) as a BundleError."""
    try:
        return session.run(list(outputs), feeds)
    except Exception as e:  # onnxruntime raises its own unrelated types
        raise _run_failed(e, where) from None


def run_bound(session: ort.InferenceSession, io: ort.IOBinding, where: str) -> None:
    """``run_with_iobinding``, with onnxruntime's failures as a BundleError (as ``run_graph``)."""
    try:
        session.run_with_iobinding(io)
    except Exception as e:  # onnxruntime raises its own unrelated types
        raise _run_failed(e, where) from None


def _run_failed(e: Exception, where: str) -> BundleError:
    return BundleError(f"onnxruntime failed running graph '{where}': {str(e).strip().splitlines()[0][:300]}. "
                       "HINT: the bundle may be damaged or made for another onnxruntime; re-export it.")


def device_of(session: ort.InferenceSession) -> str:
    """Where the session computes, as IO binding names it: "cuda" when a GPU provider leads, else "cpu"."""
    first = (session.get_providers() or ["CPUExecutionProvider"])[0]
    return "cuda" if first in (CUDA, TENSORRT) else "cpu"
