"""onnxruntime sessions: execution providers from the bundle (or the caller), threads, and graph I/O checks."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgekit.runtimes.bundle import GraphSpec, RuntimeSpec, bundle_file
from edgekit.runtimes.errors import BundleError, ConfigError, did_you_mean


@dataclass(frozen=True)
class BackendOptions:
    """How sessions are created. ``providers=None``: the bundle's recorded order; ``threads=None``: ORT decides."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


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
        print(f"warning: the bundle prefers {recorded[0]}, which this onnxruntime build lacks; running on "
              f"{usable[0]}. HINT: install the onnxruntime build for this device, or pass --provider.",
              file=sys.stderr)
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
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads is not None:
        if options.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {options.threads}.")
        so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers = choose_providers(options.providers, runtime.providers)
    try:
        session = ort.InferenceSession(str(path), so, providers=providers,
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
    return "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
