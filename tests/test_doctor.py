"""`edgekit doctor` on faked filesystem roots: a Jetson, a desktop GPU box and a plain CPU machine."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from edgekit.cli import main
from edgekit.doctor import inspect, jetpack

TEGRA = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC\n"
TRT_HEADER = "#define NV_TENSORRT_MAJOR 10\n#define NV_TENSORRT_MINOR 3\n#define NV_TENSORRT_PATCH 0\n"


def fake_root(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    return tmp


def jetson(tmp: Path, model: str, mem_kb: int) -> Path:
    return fake_root(tmp, {
        "proc/device-tree/model": model + "\x00",
        "etc/nv_tegra_release": TEGRA,
        "proc/meminfo": f"MemTotal:       {mem_kb} kB\nMemFree:  100 kB\nMemAvailable:   {mem_kb // 2} kB\n",
        "proc/cpuinfo": "processor : 0\nmodel name : ARMv8 Processor rev 1 (v8l)\n",
        "usr/local/cuda/version.json": '{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}',
        "usr/include/aarch64-linux-gnu/NvInferVersion.h": TRT_HEADER,
    })


def test_a_jetson_orin_nx(tmp_path):
    root = jetson(tmp_path, "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15_995_084)
    m = inspect(root, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], arch="aarch64")
    assert m.jetson_model.startswith("NVIDIA Jetson Orin NX") and m.l4t_release == "R36.4.3"
    assert (m.cuda, m.tensorrt, m.profile) == ("12.6.68", "10.3.0", "jetson-orin-nx-16gb")
    assert round(m.memory_total_mb / 1024, 1) == 15.3 and m.arch == "aarch64"


def test_orin_nano_and_agx_pick_their_profiles(tmp_path):
    nano = inspect(jetson(tmp_path / "n", "NVIDIA Jetson Orin Nano Developer Kit", 7_800_000), providers=[],
                   arch="aarch64")
    agx = inspect(jetson(tmp_path / "a", "NVIDIA Jetson AGX Orin Developer Kit", 64_000_000), providers=[],
                  arch="aarch64")
    assert (nano.profile, agx.profile) == ("jetson-orin-nano-8gb", "jetson-agx-orin-64gb")


def test_a_desktop_gpu_and_a_plain_cpu(tmp_path):
    gpu = fake_root(tmp_path / "g", {"proc/driver/nvidia/gpus/0000:01:00.0/information":
                                     "Model: \t\t NVIDIA GeForce RTX 4090\nIRQ: 130\n",
                                     "proc/meminfo": "MemTotal: 65000000 kB\n"})
    m = inspect(gpu, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], arch="x86_64")
    assert m.gpu == "NVIDIA GeForce RTX 4090" and m.profile == "rtx-4090" and m.jetson_model is None
    plain = fake_root(tmp_path / "c", {"proc/meminfo": "MemTotal: 16000000 kB\n"})
    cpu = inspect(plain, providers=["CPUExecutionProvider"], arch="x86_64")
    assert cpu.profile == "generic-x86-cpu" and cpu.cuda is None and cpu.tensorrt is None


def test_what_a_bundle_runs_on_and_whether_it_fits(llama_bundle, tmp_path):
    root = jetson(tmp_path, "NVIDIA Jetson Orin Nano Developer Kit", 7_800_000)
    m = inspect(root, providers=["CPUExecutionProvider"], arch="aarch64", bundle=llama_bundle)
    assert m.bundle["runs_on"] == "CPUExecutionProvider" and m.bundle["fits"]
    small = fake_root(tmp_path / "tiny", {"proc/meminfo": "MemTotal: 100000 kB\nMemAvailable: 50000 kB\n"})
    assert not inspect(small, providers=["CPUExecutionProvider"], arch="x86_64", bundle=llama_bundle).bundle["fits"]
    r = CliRunner().invoke(main, ["doctor", str(llama_bundle), "--root", str(root)])
    assert r.exit_code == 0 and "R36.4.3" in r.output and "jetson-orin-nano-8gb" in r.output and "fits" in r.output


def test_doctor_counts_every_kv_row_a_server_holds(llama_bundle, tmp_path):
    """A server allocates (--max-batch + --prefix-cache-entries) KV rows at max context: memory that fits one
    stream may not fit them (it said "fits" for an 8 GB Orin Nano that then ran out of memory)."""
    one = inspect(fake_root(tmp_path / "a", {}), providers=["CPUExecutionProvider"], arch="aarch64",
                  bundle=llama_bundle, serve_rows=16).bundle
    kv_row = (one["serve_needs_mb"] - one["needs_mb"]) / 15
    assert kv_row > 0
    between = (one["needs_mb"] + one["serve_needs_mb"]) / 2
    root = fake_root(tmp_path / "b", {"proc/meminfo": f"MemTotal: {int(between * 2048)} kB\n"
                                                      f"MemAvailable: {int(between * 1024)} kB\n"})
    b = inspect(root, providers=["CPUExecutionProvider"], arch="aarch64", bundle=llama_bundle, serve_rows=16).bundle
    assert b["fits"] and not b["serve_fits"]
    r = CliRunner().invoke(main, ["doctor", str(llama_bundle), "--root", str(root), "--max-batch", "1",
                                  "--prefix-cache-entries", "0"])
    assert r.exit_code == 0 and "for 1 KV row(s)" in r.output and "does NOT fit" not in r.output, r.output


TRT_ENTERPRISE = ("#define TRT_MAJOR_ENTERPRISE 10\n#define TRT_MINOR_ENTERPRISE 13\n#define TRT_PATCH_ENTERPRISE 3\n"
                  "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE\n#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE\n"
                  "#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE\n")
DPKG_CUDNN = ("Package: libcudnn9-cuda-13\nStatus: install ok installed\nVersion: 9.12.0.46-1\n\n"
              "Package: libnvinfer10\nStatus: deinstall ok config-files\nVersion: 10.0.0.1-1+cuda12.2\n")
JETPACKS = {  # JetPack -> (L4T revision line, TensorRT header, cuDNN file, the versions doctor must read)
    "6.0": ("# R36 (release), REVISION: 3.0, GCID: 36191598\n", TRT_HEADER.replace("10", "8").replace("3", "6"),
            ("usr/include/aarch64-linux-gnu/cudnn_version_v8.h",
             "#define CUDNN_MAJOR 8\n#define CUDNN_MINOR 9\n#define CUDNN_PATCHLEVEL 4\n"), ("8.6.0", "8.9.4")),
    "6.2": (TEGRA, TRT_HEADER, ("usr/include/aarch64-linux-gnu/cudnn_version_v9.h",
                                "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 3\n#define CUDNN_PATCHLEVEL 0\n"),
            ("10.3.0", "9.3.0")),
    "7.0": ("# R38 (release), REVISION: 2.0, GCID: 41844464\n", TRT_ENTERPRISE, ("var/lib/dpkg/status", DPKG_CUDNN),
            ("10.13.3", "9.12.0")),
}


def test_doctor_on_jetpack_6_0_6_2_and_7(tmp_path):
    """L4T -> JetPack, TensorRT from its headers (>= 10.11 defines the version through other macros) or packages,
    cuDNN from its headers or packages; a tensorrt-flavour bundle on a TensorRT older than the op set it was checked
    against is called out; the bundle's onnxruntime floor is compared with this onnxruntime."""
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent
    from tiny_models import make_model

    src = make_model("LlamaForCausalLM", tmp_path / "src")
    trt = export_bundle(ExportConfig(source=str(src), output=tmp_path / "trt", target="tensorrt"), progress=Silent())
    for jp, (tegra, header, (cudnn_file, cudnn_text), (want_trt, want_cudnn)) in JETPACKS.items():
        root = jetson(tmp_path / jp, "NVIDIA Jetson AGX Orin Developer Kit", 64_000_000)
        fake_root(root, {"etc/nv_tegra_release": tegra, "usr/include/aarch64-linux-gnu/NvInferVersion.h": header,
                         cudnn_file: cudnn_text})
        m = inspect(root, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], arch="aarch64",
                    bundle=trt.path)
        assert (jetpack(m.l4t_release), m.tensorrt, m.cudnn) == (jp, want_trt, want_cudnn), (jp, m)
        text = m.table()
        assert f"(JetPack {jp})" in text and "cuDNN        " + want_cudnn in text
        assert (": ok" in m.bundle["tensorrt"]) == (jp != "6.0"), m.bundle["tensorrt"]
        assert m.bundle["onnxruntime"].startswith(">= 1.20") and ": ok" in m.bundle["onnxruntime"]
        # the tensorrt flavour needs TensorRT 10.3: L4T R36.4 (JetPack 6.1) or later, whatever headers are found
        assert m.bundle["l4t"].startswith(">= R36.4") and ("needs TensorRT 10.3" in m.bundle["l4t"]) == (jp == "6.0")
        assert ("needs L4T" in text) and ("ok (R" in m.bundle["l4t"]) == (jp != "6.0")
    # JetPack 5 (L4T R35): its onnxruntime-gpu wheels end at 1.18, below every bundle's floor (the runtime's 1.20)
    root = jetson(tmp_path / "5.1.3", "NVIDIA Jetson AGX Orin Developer Kit", 64_000_000)
    fake_root(root, {"etc/nv_tegra_release": "# R35 (release), REVISION: 5.0, GCID: 35550185\n"})
    m = inspect(root, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], arch="aarch64", bundle=trt.path)
    assert "wheels end at 1.18, the bundle needs >= 1.20" in m.bundle["l4t"] and "TensorRT 10.3" in m.bundle["l4t"]
    plain = inspect(fake_root(tmp_path / "cpu", {}), providers=["CPUExecutionProvider"], arch="x86_64",
                    bundle=trt.path)
    assert plain.bundle["l4t"] is None  # (not a Jetson)


def test_providers_that_cannot_load_are_not_counted():
    from edgekit.doctor import _loads

    assert _loads("CPUExecutionProvider")
    assert not _loads("NoSuchExecutionProvider")
    m = inspect(Path("/nonexistent-root"))  # this process's onnxruntime: what it lists, tried
    assert "CPUExecutionProvider" in m.providers and not set(m.providers) & set(m.unusable)
