"""``export_bundle``: source -> plan -> PyTorch model -> graphs -> bundle folder, checked before it is published.

Configuration flows one way: the CLI builds an ``ExportConfig`` and calls this function; nothing here reads argv or
the environment. The bundle is assembled in a staging folder and renamed into place only when complete. What differs
between model kinds is the registry record's exporter module (``decoder`` or ``diffusion``), called through one
``build`` function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from edgekit.export import floors, source
from edgekit.export import manifest as mf
from edgekit.export.plan import ExportConfig, Plan, make_plan
from edgekit.export.progress import Progress
from edgekit.export.reference import TorchReference
from edgekit.export.registry import lookup
from edgekit.runtimes import bundle as bdl
from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.staging import staging_dir

__all__ = ["ExportConfig", "ExportResult", "Verifier", "export_bundle"]


class Report(Protocol):
    """What a verifier returns (edgekit.parity's report)."""

    @property
    def passed(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...

    def table(self) -> str: ...

    def files(self) -> dict[str, bytes]: ...  # files to add to the bundle (the stored reference)


# (loaded bundle, the PyTorch reference (shared with the quality report), hf_tokenizer, progress) -> parity report
Verifier = Callable[[Any, Any, Any, Progress], Report]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: bdl.Manifest
    parity: Report | None = None  # the verifier's report, when one ran


def export_bundle(cfg: ExportConfig, verify: Verifier | None = None, progress: Progress | None = None) -> ExportResult:
    """Export ``cfg.source`` to a bundle at ``cfg.output``; run ``verify`` (parity) on it before publishing."""
    ref = source.resolve(cfg.source)
    arch, config = source.read_architecture(ref, cfg.trust_remote_code)
    spec = lookup(arch, config)
    plan = make_plan(cfg, ref, config, spec)  # validates every option and checks the memory fit before heavy work
    exporter = importlib.import_module(spec.exporter)
    progress = progress or Progress(total=3 + exporter.STAGES + bool(verify) + bool(plan.prune))
    if plan.fit is not None and plan.device is not None:
        progress.note(f"fits {plan.device.name}: {plan.fit.line()} of {plan.fit.budget_mb / 1024:.2f} GB")
    with staging_dir(cfg.output, force=cfg.force) as stage:
        with progress.stage(f"Loading {ref.label}"):
            model = source.load_model(ref, cfg.trust_remote_code, spec.auto_classes)
            tokenizer = source.load_tokenizer(ref, cfg.trust_remote_code)
        reference = TorchReference(model)  # its prompt forwards are shared by the quality report and parity
        built: mf.Built = exporter.build(plan, ref, model, tokenizer, stage, progress, reference)
        floor = onnxruntime_floor(plan, stage, built)
        with progress.stage("Writing the bundle"):
            tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
            manifest = mf.build(plan, ref, arch, model, tokenizer, built)
            manifest = replace(manifest, runtime=replace(manifest.runtime, min_onnxruntime=floors.show(floor[0]),
                                                         min_onnxruntime_for=floor[1]))
            manifest = replace(manifest, files=bdl.hash_payload(stage))  # the one hash of the payload
            bdl.write_manifest(stage, manifest)
        with progress.stage("Checking the bundle loads" + ("; quality vs the uncompressed model" if built.check
                                                            else "")):
            runtime = load(stage, verify_hashes=False)  # (just hashed)
            if built.check is not None:
                manifest = replace(manifest, extra={**manifest.extra, **built.check(runtime, stage)})
        report = None
        if verify is not None:
            with progress.stage("Parity against the PyTorch model"):
                report = verify(runtime, reference.for_bundle(runtime.manifest), tokenizer, progress)
            added = report.files()
            for name, data in added.items():
                (stage / name).write_bytes(data)
            manifest = replace(manifest, parity=report.to_dict(),
                               files={**manifest.files, **{n: bdl.sha256_file(stage / n) for n in added}})
        bdl.write_manifest(stage, manifest)
    return ExportResult(cfg.output, manifest, report)


def onnxruntime_floor(plan: Plan, stage: Path, built: mf.Built) -> tuple[floors.Release, str]:
    """The oldest onnxruntime the written graphs run on (and what sets it); refused when the plan promised an older
    one and no exact alternative was taken."""
    need, why = floors.of_files(sorted({stage / g.file for g in built.graphs.values()}))
    if plan.onnxruntime is not None and need > plan.onnxruntime:
        raise ConfigError(f"The graph needs onnxruntime >= {floors.show(need)} for {why}, beyond the onnxruntime "
                          f"{floors.show(plan.onnxruntime)} asked for (--onnxruntime or the device profile), and "
                          "edgekit has no exact alternative for it. HINT: drop --accuracy-level 4 (8-bit "
                          "MatMulNBits), or export for a newer onnxruntime.")
    return need, why

