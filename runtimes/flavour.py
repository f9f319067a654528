"""Which onnxruntime wheel is installed, and the one import of it the runtime makes.

onnxruntime ships one Python module, ``onnxruntime``, in several wheels: ``onnxruntime`` (CPU), ``onnxruntime-gpu``
(CUDA + TensorRT), the DirectML/OpenVINO/QNN builds, and on a Jetson the platform's own ``onnxruntime-gpu`` wheel
(the Jetson AI Lab index for its JetPack). edgekit's base install depends on none of them (``edgekit[cpu]`` and
``edgekit[gpu]`` pick one; on a Jetson the platform wheel is installed first and edgekit after it). Two of them
installed together write the same files: whichever was installed last wins, and uninstalling one removes files the
other needs, so a CPU wheel pulled in beside the GPU one silently takes the GPU providers away. This module finds
that case and says how to repair it.
"""

from __future__ import annotations

from importlib import metadata
from types import ModuleType

from edgekit.runtimes.errors import ConfigError

WHEELS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
          "onnxruntime-training", "ort-nightly", "ort-nightly-gpu")
INSTALL = ("pip install 'edgekit[cpu]' (CPU), pip install 'edgekit[gpu]' (CUDA/TensorRT), or on a Jetson the "
           "onnxruntime-gpu wheel for its JetPack (README: 'On a Jetson')")


class OnnxruntimeMissingError(ConfigError):
    """No onnxruntime wheel is installed (the base install carries none)."""

    http_status = 500
    code = "internal_error"


def installed() -> list[tuple[str, str]]:
    """The onnxruntime wheels installed in this environment, as (name, version), in WHEELS order."""
    out = []
    for name in WHEELS:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return out


def clash(wheels: list[tuple[str, str]] | None = None) -> str | None:
    """A sentence naming two or more onnxruntime wheels installed together and the repair, or None."""
    wheels = installed() if wheels is None else wheels
    if len(wheels) < 2:
        return None
    names = " and ".join(f"{n} {v}" for n, v in wheels)
    keep = next((n for n, _ in wheels if n != "onnxruntime"), wheels[0][0])
    return (f"{names} are installed together; they share one 'onnxruntime' module, so the files of whichever was "
            f"installed last are the ones running. HINT: pip uninstall -y {' '.join(n for n, _ in wheels)} && pip "
            f"install {keep} (or the 'edgekit[cpu]' / 'edgekit[gpu]' extra; on a Jetson, the wheel for its JetPack).")


def module() -> ModuleType:
    """``import onnxruntime``, or an OnnxruntimeMissingError naming the ways to install one."""
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxruntimeMissingError(f"onnxruntime is not installed ({e}); edgekit's base install carries no "
                                      f"onnxruntime wheel. HINT: {INSTALL}.") from None
    return onnxruntime
