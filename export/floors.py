"""The oldest onnxruntime a bundle runs on: a table of the ops and attributes edgekit writes -> the first release that
runs them (correctly), with where that was read, and the floor of a bundle's graphs (the highest of them).

Read from onnxruntime's sources and pull requests (release branch cuts: 1.20 by 2024-10-17, 1.21 by 2025-02-21, 1.22
by 2025-04-22, 1.23 about late July 2025), and checked on the 1.20.1 and 1.23.2 CPU wheels where a test says so
(tests/test_floors.py). Some limits show only when a node runs, not when the model loads (an 8-bit MatMulNBits on
an ARM CPU before 1.23: "nbits_ == 4 was false"), so the floor is recorded in the bundle and checked at load, not
left to the session. Where x86 and ARM CPUs differ, the later release is the floor (a bundle travels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgekit.runtimes.bundle import release
from edgekit.runtimes.errors import ConfigError

Release = tuple[int, ...]

OLDEST: Release = (1, 20)  # what the runtime itself needs (pyproject's onnxruntime>=1.20)
GATHER_8BIT: Release = (1, 23)
NBITS_8BIT: Release = (1, 23)
BATCHED_BIAS: Release = (1, 21, 1)


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


@dataclass(frozen=True)
class Floor:
    """``op`` (of ``domain``) needs onnxruntime >= ``release`` when ``when(node)`` holds (always, if None)."""

    domain: str
    op: str
    release: Release
    what: str
    source: str
    when: Callable[[onnx.NodeProto], bool] | None = None


MS = "com.microsoft"
FLOORS: tuple[Floor, ...] = (
    Floor(MS, "GroupQueryAttention", (1, 20), "GroupQueryAttention with several new tokens on a past (a prompt on "
          "a cached prefix)", "onnxruntime PR #21523 (CPU continuous decoding; 1.18's CPU kernel assumed no past)"),
    Floor(MS, "GroupQueryAttention", (1, 20), "GroupQueryAttention softcap", "onnxruntime PR #21683",
          lambda n: any(a.name == "softcap" and a.f for a in n.attribute)),
    Floor(MS, "GatherBlockQuantized", (1, 20), "GatherBlockQuantized", "onnxruntime PR #21630"),
    Floor(MS, "GatherBlockQuantized", GATHER_8BIT, "GatherBlockQuantized bits=8", "onnxruntime PR #25214 (the "
          "bits attribute; 1.20-1.22 refuse the node at load: 'This is an invalid model')",
          lambda n: _attr(n, "bits", 4) == 8),
    Floor(MS, "MatMulNBits", (1, 17), "MatMulNBits", "onnxruntime PR #17890"),
    Floor(MS, "MatMulNBits", NBITS_8BIT, "MatMulNBits bits=8", "onnxruntime PRs #24384/#24491 (x86 CPU, 1.22), "
          "#25110 (ARM64 CPU, 1.23: 1.22 fails at run with 'Only 4b quantization is supported'), #24509 (CUDA, 1.22)",
          lambda n: _attr(n, "bits", 4) == 8),
    Floor(MS, "MultiHeadAttention", BATCHED_BIAS, "MultiHeadAttention with a [B, 1, S, T] attention bias",
          "onnxruntime PR #21710 (broadcast bias, 1.20) and PR #24017 (wrong offsets for B > 1 until 1.21.1)",
          lambda n: len(n.input) > 5 and bool(n.input[5])),
    Floor(MS, "RotaryEmbedding", (1, 17), "RotaryEmbedding rotary_embedding_dim", "onnxruntime PR #19112"),
    Floor("", "DequantizeLinear", (1, 19), "blockwise (int4) DequantizeLinear", "onnxruntime PRs #20362, #20901",
          lambda n: _attr(n, "block_size") > 0),
)


def parse(text: str, what: str = "onnxruntime version") -> Release:
    """'1.20' or '1.21.1' -> (1, 20) / (1, 21, 1) (the runtime's ``bundle.release``), or a ConfigError naming it."""
    found = release(text.strip()) if isinstance(text, str) else ()
    if not found:
        raise ConfigError(f"{what} must look like 1.20 or 1.21.1, got {text!r}.")
    return found


def show(release: Release) -> str:
    return ".".join(map(str, release))


def of_graph(model: onnx.ModelProto) -> tuple[Release, list[str]]:
    """The graph's floor and what sets it (every op of the table at that release)."""
    need, why = OLDEST, []
    for node in model.graph.node:
        for f in FLOORS:
            if (node.domain or "") == f.domain and node.op_type == f.op and (f.when is None or f.when(node)):
                if f.release > need:
                    need, why = f.release, []
                if f.release == need and f.what not in why:
                    why.append(f.what)
    return need, why


def of_files(paths: Iterable[Path]) -> tuple[Release, str]:
    """The floor of a bundle's graph files and its reason ('' at the runtime's own floor)."""
    need, why = OLDEST, []
    for path in paths:
        release, reasons = of_graph(onnx.load(str(path), load_external_data=False))
        if release > need:
            need, why = release, []
        if release == need:
            why += [r for r in reasons if r not in why]
    return need, "; ".join(why)
