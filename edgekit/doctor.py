"""``edgekit doctor``: what this machine is (Jetson model and L4T release, a desktop GPU, or a CPU), what onnxruntime,
CUDA and TensorRT it has, its memory, the matching device profile, and for a bundle what will run where and whether
it fits. Everything is read from files under ``root`` (``/`` on a real machine, a faked tree in tests)."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.export.device import DeviceProfile, list_profiles, load_profile

KV_BYTES = {"float32": 4, "float16": 2}


@dataclass
class Machine:
    arch: str
    jetson_model: str | None = None  # /proc/device-tree/model
    l4t_release: str | None = None  # /etc/nv_tegra_release, e.g. "R36.4.3"
    gpu: str | None = None  # a desktop GPU's name (/proc/driver/nvidia/gpus/*/information)
    cpu: str | None = None
    memory_total_mb: float | None = None
    memory_available_mb: float | None = None
    cuda: str | None = None
    tensorrt: str | None = None
    providers: list[str] = field(default_factory=list)
    profile: str | None = None
    bundle: dict[str, Any] | None = None

    def table(self) -> str:
        rows = [("machine", self.jetson_model or self.gpu or self.cpu or "unknown"), ("arch", self.arch),
                ("L4T", self.l4t_release or "-"), ("memory", _mb(self.memory_total_mb, self.memory_available_mb)),
                ("CUDA", self.cuda or "not found"), ("TensorRT", self.tensorrt or "not found"),
                ("onnxruntime", ", ".join(p.replace("ExecutionProvider", "") for p in self.providers) or "-"),
                ("profile", self.profile or "none matches (pass --device to export)")]
        if self.bundle:
            b = self.bundle
            rows += [("bundle", f"{b['path']} ({b['precision']}, {b['target']} flavour, "
                                f"{b['size_mb']:.0f} MB on disk)"),
                     ("runs on", b["runs_on"] + (f"  (the bundle prefers {b['preferred']})" if b["fallback"] else "")),
                     ("needs", f"{b['needs_mb']:.0f} MB for one stream at max context {b['max_context']} "
                               f"({'fits' if b['fits'] else 'does NOT fit'} the {b['available_mb']:.0f} MB "
                               "available)"),
                     ("serving", f"{b['serve_needs_mb']:.0f} MB for {b['serve_rows']} KV row(s) at max context "
                                 f"(edgekit serve --max-batch + --prefix-cache-entries; "
                                 f"{'fits' if b['serve_fits'] else 'does NOT fit'})")]
            if b["engine_cache"] is not None:
                rows.append(("engines", b["engine_cache"]))
        return "\n".join(f"{k:<12} {v}" for k, v in rows)


def _mb(total: float | None, available: float | None) -> str:
    if total is None:
        return "unknown"
    return f"{total / 1024:.1f} GB" + (f" ({available / 1024:.1f} GB available)" if available is not None else "")


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def inspect(root: Path = Path("/"), providers: list[str] | None = None, arch: str | None = None,
            bundle: Path | None = None, serve_rows: int = 16) -> Machine:
    """Read the machine under ``root``; ``providers``/``arch`` default to this process's onnxruntime and CPU.
    ``serve_rows``: the KV rows a server of ``bundle`` holds (its --max-batch plus --prefix-cache-entries)."""
    if providers is None:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    m = Machine(arch=arch or platform.machine(), providers=providers)
    model = _read(root, "proc/device-tree/model")
    if model and "jetson" in model.lower():
        m.jetson_model = model.strip("\x00\n ")
    tegra = _read(root, "etc/nv_tegra_release")
    if tegra and (hit := re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", tegra)):
        m.l4t_release = f"R{hit.group(1)}.{hit.group(2)}"
    for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
        hit = re.search(r"^Model:\s*(.+)$", _read(root, str(info.relative_to(root))) or "", re.M)
        m.gpu = m.gpu or (hit.group(1).strip() if hit else None)
    cpuinfo = _read(root, "proc/cpuinfo") or ""
    hit = re.search(r"^(model name|Hardware)\s*:\s*(.+)$", cpuinfo, re.M)
    m.cpu = hit.group(2).strip() if hit else None
    meminfo = _read(root, "proc/meminfo") or ""
    for key, attr in (("MemTotal", "memory_total_mb"), ("MemAvailable", "memory_available_mb")):
        if hit := re.search(rf"^{key}:\s*(\d+)\s*kB", meminfo, re.M):
            setattr(m, attr, int(hit.group(1)) / 1024)
    m.cuda = _cuda(root)
    m.tensorrt = _tensorrt(root)
    profile = match_profile(m)
    m.profile = profile.name if profile else None
    if bundle is not None:
        m.bundle = _bundle(bundle, m, serve_rows)
    return m


def _cuda(root: Path) -> str | None:
    raw = _read(root, "usr/local/cuda/version.json")
    if raw:
        try:
            return str(json.loads(raw)["cuda"]["version"])
        except (ValueError, KeyError, TypeError):
            pass
    hit = re.search(r"CUDA Version\s+([\d.]+)", _read(root, "usr/local/cuda/version.txt") or "")
    return hit.group(1) if hit else None


def _tensorrt(root: Path) -> str | None:
    for arch in ("aarch64-linux-gnu", "x86_64-linux-gnu"):
        header = _read(root, f"usr/include/{arch}/NvInferVersion.h")
        if header:
            parts = [re.search(rf"#define NV_TENSORRT_{k}\s+(\d+)", header) for k in ("MAJOR", "MINOR", "PATCH")]
            if all(parts):
                return ".".join(p.group(1) for p in parts if p)
    return None


def match_profile(m: Machine) -> DeviceProfile | None:
    """The device profile whose name words all appear in the machine's name (closest memory wins); a CPU profile
    by architecture when no accelerator is found."""
    profiles = [load_profile(n) for n in list_profiles()]
    name, family = ((m.jetson_model, "jetson") if m.jetson_model else (m.gpu, "gpu") if m.gpu
                  else ({"x86_64": "x86", "amd64": "x86"}.get(m.arch.lower(), "arm"), "cpu"))
    text = (name or "").lower()
    fits = [p for p in profiles if p.kind == family and all(w in text for w in _words(p))]
    if not fits:
        return None
    most = max(len(_words(p)) for p in fits)
    best = [p for p in fits if len(_words(p)) == most]
    total = (m.memory_total_mb or 0) / 1024
    return min(best, key=lambda p: abs(p.memory_gb - total))


def _words(p: DeviceProfile) -> list[str]:
    """A profile's identifying words: its name without sizes and 'generic'/'cpu' (e.g. jetson, orin, nano)."""
    return [w for w in p.name.split("-") if not re.fullmatch(r"\d+gb", w) and w not in ("generic", "cpu")]


def _bundle(path: Path, m: Machine, serve_rows: int) -> dict[str, Any]:
    from edgekit.runtimes.backend import TENSORRT, BackendOptions, engine_cache_dir
    from edgekit.runtimes.bundle import load_manifest

    man = load_manifest(path, check_hashes=False)
    recorded = list(man.runtime.providers)
    usable = [p for p in recorded if p in m.providers] or ["CPUExecutionProvider"]  # the runtime's rule
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    kv = man.kv_cache
    kv_mb = (2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * man.max_context * KV_BYTES.get(kv.dtype, 4) / 2**20
             if kv else 0.0)
    # + onnxruntime's arena and the process (measured ~250-300 MB on CPU); a KV row is allocated at max context on
    # a GPU (and grows to it on the CPU), one per batch slot and per prefix-cache entry
    needs = size + kv_mb + 300
    serve_needs = size + serve_rows * kv_mb + 300
    engines = None
    if TENSORRT in recorded:  # the TensorRT EP builds engines into a cache beside the bundle
        cache = engine_cache_dir(path, BackendOptions())
        built = sorted(cache.glob("*.engine")) if cache.is_dir() else []
        engines = (f"{len(built)} TensorRT engine(s) in {cache}" if built else
                   f"none built yet in {cache} (the first run builds them: minutes on an Orin)")
    available_mb = m.memory_available_mb or m.memory_total_mb or 0.0
    return {"path": str(path), "precision": man.precision, "target": man.runtime.target, "engine_cache": engines,
            "size_mb": size, "runs_on": usable[0],
            "preferred": recorded[0] if recorded else None, "fallback": bool(recorded) and recorded[0] != usable[0],
            "needs_mb": needs, "max_context": man.max_context, "available_mb": available_mb,
            "fits": needs <= available_mb, "serve_rows": serve_rows, "serve_needs_mb": serve_needs,
            "serve_fits": serve_needs <= available_mb}
