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
from edgekit.runtimes import flavour
from edgekit.runtimes.bundle import release
from edgekit.runtimes.flavour import INSTALL

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
    cudnn: str | None = None
    providers: list[str] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)  # providers onnxruntime lists but cannot load (their libraries)
    onnxruntime: str = ""  # "" when no onnxruntime wheel is installed
    wheels: list[tuple[str, str]] = field(default_factory=list)  # the onnxruntime wheels installed (name, version)
    clash: str | None = None  # two or more of them together: which runs, and the repair
    profile: str | None = None
    bundle: dict[str, Any] | None = None

    def table(self) -> str:
        rows = [("machine", self.jetson_model or self.gpu or self.cpu or "unknown"), ("arch", self.arch),
                ("L4T", (self.l4t_release or "-") + (f"  (JetPack {jp})" if (jp := jetpack(self.l4t_release)) else "")),
                ("memory", _mb(self.memory_total_mb, self.memory_available_mb)),
                ("CUDA", self.cuda or "not found"), ("cuDNN", self.cudnn or "not found"),
                ("TensorRT", self.tensorrt or "not found"),
                ("onnxruntime", (f"{self.onnxruntime} ({', '.join(n for n, _ in self.wheels) or 'wheel unknown'}): "
                                 + (", ".join(p.replace("ExecutionProvider", "") for p in self.providers) or "-") + (
                    f"  (listed but cannot load: {', '.join(self.unusable)})" if self.unusable else ""))
                 if self.onnxruntime else f"not installed. HINT: {INSTALL}"),
                *([("wheels", self.clash)] if self.clash else []),
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
            rows.append(("needs ort", b["onnxruntime"]))
            if b["l4t"]:
                rows.append(("needs L4T", b["l4t"]))
            if b["tensorrt"]:
                rows.append(("needs TRT", b["tensorrt"]))
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
    try:
        ort = flavour.module()
    except flavour.OnnxruntimeMissingError:
        ort = None
    unusable: list[str] = []
    if providers is None:
        providers = list(ort.get_available_providers()) if ort else []
        unusable = [p for p in providers if not _loads(p)]
    wheels = flavour.installed()
    m = Machine(arch=arch or platform.machine(), providers=[p for p in providers if p not in unusable],
                unusable=unusable, onnxruntime=ort.__version__ if ort else "", wheels=wheels,
                clash=flavour.clash(wheels))
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
    m.cudnn = _cudnn(root)
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


def _defines(header: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*#define\s+(\w+)\s+(\S+)", header, re.M))


def _macro_version(header: str, names: tuple[str, ...]) -> str | None:
    """'10.3.0' from ``#define`` lines, following one name to another (TensorRT >= 10.11 defines NV_TENSORRT_MAJOR as
    TRT_MAJOR_ENTERPRISE, defined beside it)."""
    defs, parts = _defines(header), []
    for name in names:
        value = defs.get(name)
        for _ in range(3):  # a few levels of indirection
            if value is None or value.isdigit():
                break
            value = defs.get(value)
        if value is None or not value.isdigit():
            return None
        parts.append(value)
    return ".".join(parts)


def _dpkg(root: Path, pattern: str) -> str | None:
    """The version of the first installed Debian package whose name matches ``pattern`` (JetPack installs CUDA,
    cuDNN and TensorRT as packages), e.g. '10.3.0' from '10.3.0.30-1+cuda12.5'."""
    for block in (_read(root, "var/lib/dpkg/status") or "").split("\n\n"):
        name = re.search(r"^Package:\s*(\S+)", block, re.M)
        version = re.search(r"^Version:\s*(\d+(?:\.\d+){1,2})", block, re.M)
        installed = "install ok installed" in block or "Status:" not in block
        if name and version and installed and re.fullmatch(pattern, name.group(1)):
            return version.group(1)
    return None


def _tensorrt(root: Path) -> str | None:
    for arch in ("aarch64-linux-gnu", "x86_64-linux-gnu"):
        header = _read(root, f"usr/include/{arch}/NvInferVersion.h") or ""
        if found := _macro_version(header, tuple(f"NV_TENSORRT_{k}" for k in ("MAJOR", "MINOR", "PATCH"))):
            return found
    return _dpkg(root, r"libnvinfer\d+|tensorrt")


def _cudnn(root: Path) -> str | None:
    names = ("CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL")
    for rel in ("usr/include/cudnn_version.h", "usr/include/aarch64-linux-gnu/cudnn_version_v9.h",
                "usr/include/x86_64-linux-gnu/cudnn_version_v9.h", "usr/include/aarch64-linux-gnu/cudnn_version_v8.h",
                "usr/local/cuda/include/cudnn_version.h"):
        if found := _macro_version(_read(root, rel) or "", names):
            return found
    return _dpkg(root, r"libcudnn\d+(-cuda-\d+)?")


# L4T release -> JetPack (NVIDIA's release notes); the Orin profiles' onnxruntime floor is JetPack 6's oldest wheel
JETPACK = (("R38.2", "7.0"), ("R36.4.3", "6.2"), ("R36.4.4", "6.2.1"), ("R36.4", "6.1"), ("R36.3", "6.0"),
           ("R36.2", "6.0 DP"), ("R35.6", "5.1.4"), ("R35.5", "5.1.3"), ("R35.4", "5.1.2"))


# L4T major -> the newest onnxruntime-gpu wheel its JetPack gets (Jetson Zoo: JetPack 5's end at 1.18; the Jetson AI
# Lab jp6/cu126 index: 1.23 as last read), and the oldest L4T whose TensorRT parses the tensorrt flavour (10.3: R36.4)
NEWEST_WHEEL = {"R35": (1, 18), "R36": (1, 23)}
TENSORRT_L4T = ("R36.4", "6.1", "10.3")


def l4t_release(text: str) -> tuple[int, ...]:
    """'R36.4.3' -> (36, 4, 3)."""
    return tuple(int(p) for p in re.findall(r"\d+", text or ""))


def jetpack(l4t: str | None) -> str | None:
    """The JetPack release of an L4T release ('R36.4.3' -> '6.2'), or None when unknown."""
    if not l4t:
        return None
    return next((jp for prefix, jp in JETPACK if l4t == prefix or l4t.startswith(prefix + ".")), None)


# a one-node ONNX model (Identity, opset 13, IR 7: every onnxruntime loads it), so that doctor needs no onnx package
IDENTITY = "CAc6NwoQCgF4EgF5IghJZGVudGl0eRIBZ1oPCgF4EgoKCAgBEgQKAggBYg8KAXkSCgoICAESBAoCCAFCBAoAEA0="


def _loads(provider: str) -> bool:
    """Whether onnxruntime really creates a session on ``provider`` (it lists GPU providers whose libraries, CUDA or
    cuDNN or TensorRT, are missing, then falls back to the CPU with a warning)."""
    if provider == "CPUExecutionProvider":
        return True
    import base64

    import onnxruntime as ort

    graph = base64.b64decode(IDENTITY)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        session = ort.InferenceSession(graph, so, providers=[provider, "CPUExecutionProvider"])
    except Exception:  # onnxruntime raises several unrelated types when a provider's library cannot load
        return False
    return provider in session.get_providers()


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


def _l4t_need(m: Machine, floor: str, tensorrt: bool, gpu: bool) -> str | None:
    """On a Jetson, what L4T a GPU bundle needs and whether this one has it: its JetPack's onnxruntime-gpu wheels
    must reach the bundle's onnxruntime floor, and a tensorrt-flavour graph needs TensorRT 10.3 (L4T R36.4)."""
    if not (m.jetson_model and m.l4t_release and gpu):
        return None
    have = l4t_release(m.l4t_release)
    newest = NEWEST_WHEEL.get(f"R{have[0]}") if have else None
    need = release(floor)
    problems = []
    if newest is not None and need > newest:
        problems.append(f"its JetPack's onnxruntime-gpu wheels end at {'.'.join(map(str, newest))}, the bundle needs "
                        f">= {floor} (re-export with --onnxruntime {'.'.join(map(str, newest))} where it allows, or "
                        "upgrade JetPack)")
    if tensorrt and have < l4t_release(TENSORRT_L4T[0]):
        problems.append(f"the tensorrt flavour needs TensorRT {TENSORRT_L4T[2]}, L4T >= {TENSORRT_L4T[0]} (JetPack "
                        f"{TENSORRT_L4T[1]}); use the cuda flavour (--target cuda) here, or upgrade JetPack")
    need_l4t = TENSORRT_L4T[0] if tensorrt else "R36 (JetPack 6)"
    return f">= {need_l4t}: " + ("; ".join(problems) if problems else f"ok ({m.l4t_release})")


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
    floor, have = man.runtime.min_onnxruntime, release(m.onnxruntime)
    ort_line = (f">= {floor}" + (f" (for {man.runtime.min_onnxruntime_for})" if man.runtime.min_onnxruntime_for else "")
                + (": no onnxruntime installed" if not m.onnxruntime else f": ok ({m.onnxruntime})"
                   if have >= release(floor) else
                   f": this onnxruntime {m.onnxruntime} is too old; re-export with --onnxruntime "
                   f"{'.'.join(map(str, have[:2]))} or upgrade"))
    l4t_line = _l4t_need(m, man.runtime.min_onnxruntime, TENSORRT in recorded,
                         any(p in recorded for p in ("CUDAExecutionProvider", TENSORRT)))
    trt_line = None
    if TENSORRT in recorded:  # the tensorrt flavour's op set is TensorRT 10.3's (export/tensorrt.py)
        ok = m.tensorrt is not None and release(m.tensorrt) >= (10, 3)
        trt_line = (">= 10.3 (the op set its graph was checked against)" + (f": ok ({m.tensorrt})" if ok else
                    f": {m.tensorrt or 'no TensorRT'} here; the TensorRT EP will not build it (CUDA or the CPU runs "
                    "it instead)"))
    return {"onnxruntime": ort_line, "tensorrt": trt_line, "l4t": l4t_line, "path": str(path),
            "precision": man.precision,
            "target": man.runtime.target, "engine_cache": engines,
            "size_mb": size, "runs_on": usable[0],
            "preferred": recorded[0] if recorded else None, "fallback": bool(recorded) and recorded[0] != usable[0],
            "needs_mb": needs, "max_context": man.max_context, "available_mb": available_mb,
            "fits": needs <= available_mb, "serve_rows": serve_rows, "serve_needs_mb": serve_needs,
            "serve_fits": serve_needs <= available_mb}
