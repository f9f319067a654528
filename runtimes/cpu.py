"""The CPU's instruction sets as onnxruntime's kernels see them, recorded with a bundle and with each verify report.

onnxruntime's int8 CPU kernels (MatMulNBits at accuracy level 4, QGEMM) are picked at run time by the CPU's features:
AVX-512 VNNI, AVX-VNNI, AVX2, or NEON dot-product / i8mm on ARM. The features are read from numpy's own run-time
CPU dispatch table (cpuid on x86, hwcaps on ARM), so they are what this process can execute (an emulated CPU
included), not what /proc/cpuinfo of a host says. AMX and AVX-VNNI are not in numpy's table and come from
/proc/cpuinfo where it exists.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any

# the features that decide which int8 kernels run, in the order of preference of onnxruntime's MLAS dispatch
X86_INT8 = (("amx", "AMX_INT8"), ("avx512vnni", "AVX512VNNI"), ("avxvnni", "AVX_VNNI"), ("avx512", "AVX512BW"),
            ("avx2", "AVX2"), ("sse4.1", "SSE41"))
ARM_INT8 = (("i8mm", "ASIMD_I8MM"), ("dotprod", "ASIMDDP"), ("neon", "ASIMD"))
SHOWN = ("AVX2", "FMA3", "F16C", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512BF16", "AVX_VNNI", "AMX_INT8",
         "ASIMD", "ASIMDDP", "ASIMDHP", "ASIMDFHM", "ASIMD_I8MM", "SVE")


def _numpy_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # numpy 2
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__  # type: ignore[no-redef]
    return dict(__cpu_features__)


def _proc_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    hit = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
    return set(hit.group(2).split()) if hit else set()


def _model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    hit = re.search(r"^(model name|Hardware|CPU part)\s*:\s*(.+)$", text, re.M)
    return hit.group(2).strip() if hit else None


def features() -> list[str]:
    """The int8/float-kernel-relevant features this process can execute, e.g. ['AVX2', 'FMA3', 'AVX512F', ...]."""
    found = {k for k, v in _numpy_features().items() if v}
    flags = _proc_flags()
    # /proc/cpuinfo is the host's (an emulator or a masked container may offer less): trusted only where it agrees
    # with what numpy found on a feature both see
    if ("avx512f" in flags) == ("AVX512F" in found) and ("avx2" in flags) == ("AVX2" in found):
        found |= {name for flag, name in (("amx_int8", "AMX_INT8"), ("avx_vnni", "AVX_VNNI")) if flag in flags}
    if ("asimddp" in flags) == ("ASIMDDP" in found) and "i8mm" in flags:
        found.add("ASIMD_I8MM")
    return [f for f in SHOWN if f in found]


def int8_kernels(feats: list[str] | None = None) -> str:
    """The family of onnxruntime's int8 CPU kernels this CPU gets: 'avx512vnni', 'avx2', 'dotprod', ..."""
    feats = features() if feats is None else feats
    table = ARM_INT8 if platform.machine().lower() in ("aarch64", "arm64") else X86_INT8
    return next((name for name, key in table if key in feats), "generic")


def describe() -> dict[str, Any]:
    """What a bundle's provenance and a verify report record of the CPU."""
    feats = features()
    return {"arch": platform.machine(), "model": _model(), "features": feats, "int8_kernels": int8_kernels(feats)}
