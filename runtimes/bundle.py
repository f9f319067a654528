"""The bundle: a folder of ONNX graphs + tokenizer + ``edgekit.json``, the contract between export and runtime.

The runtime reads only this folder (never a Hugging Face config or a model name). ``export`` writes bundles through
``BundleWriter`` so that a failed or interrupted export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgekit.runtimes.errors import BundleError, ExportError

FORMAT_NAME = "edgekit-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "edgekit.json"

ModelKind = Literal["ar", "diffusion"]
MODEL_KINDS: tuple[str, ...] = ("ar", "diffusion")


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle and the names of its inputs and outputs."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class KVCacheLayout:
    """Shape and naming of the per-layer KV cache: tensors are [batch, kv_heads, seq, head_dim] (BNSH)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    layout: str = "BNSH"
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the runtime needs to know; ``stop_ids`` end generation (EOS and the chat turn-end token)."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    turn_end_id: int | None = None
    mask_id: int | None = None
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer file (Hugging Face ``tokenizers`` JSON) and how prompts are built."""

    file: str = "tokenizer.json"
    chat_template: str | None = None
    add_special_tokens: bool = True
    special_token_strings: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeSpec:
    """How the runtime runs the graphs: execution providers in order of preference (from the device profile the
    bundle was exported for; the caller can override them) and onnxruntime graph transformers to skip (one that
    mishandles a graph, e.g. QDQ propagation on a W8A8 graph)."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    disabled_optimizers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Quantization:
    """How the weights were compressed: a row of export's table of methods, as data (never prose to parse back).
    ``tolerance`` names the parity tolerance that applies (a key of edgekit.parity.TOLERANCES)."""

    method: str  # gguf | rtn | hqq | gptq
    bits: int
    block_size: int
    accuracy_level: int
    tolerance: str
    format: str = "nbits"  # nbits (MatMulNBits) | qdq (DequantizeLinear + MatMul)
    activations: str = "float"  # float | int8 (static, calibrated)
    kv_cache: str = "fp32"
    embedding: str = "float32"
    lm_head: str = "8-bit"
    source_types: Mapping[str, int] = field(default_factory=dict)  # GGUF tensor types carried over


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime knows about a bundle; serialised as ``edgekit.json``."""

    kind: ModelKind
    architecture: str
    model_type: str
    precision: str
    max_context: int
    vocab_size: int
    graphs: Mapping[str, GraphSpec]
    tokens: SpecialTokens
    tokenizer: TokenizerSpec
    kv_cache: KVCacheLayout | None = None
    generation: Mapping[str, Any] = field(default_factory=dict)  # default settings of the model's generation loop
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    quantization: Quantization | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    parity: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "edgekit.json") -> Manifest:
        try:
            d = dict(data)
            d["graphs"] = {k: _graph_from(v) for k, v in d["graphs"].items()}
            d["tokens"] = SpecialTokens(**{**d["tokens"], "stop_ids": tuple(d["tokens"].get("stop_ids", ()))})
            d["tokenizer"] = TokenizerSpec(**d["tokenizer"])
            if d.get("kv_cache") is not None:
                d["kv_cache"] = KVCacheLayout(**d["kv_cache"])
            rt = d.get("runtime") or {}
            d["runtime"] = RuntimeSpec(**{k: tuple(v) for k, v in rt.items()})
            if d.get("quantization") is not None:
                d["quantization"] = Quantization(**d["quantization"])
            return cls(**d)
        except (KeyError, TypeError, AttributeError) as e:
            raise BundleError(
                f"{where} is malformed ({type(e).__name__}: {e}). HINT: re-export the bundle with this edgekit version."
            ) from None


def _graph_from(v: Mapping[str, Any]) -> GraphSpec:
    return GraphSpec(file=v["file"], inputs=tuple(v["inputs"]), outputs=tuple(v["outputs"]))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check ``edgekit.json`` (format name and version); does not hash the payload files."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(
            f"Bundle '{root}' does not exist or is not a folder. HINT: create one with 'edgekit export SRC -o {root}'."
        )
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(
            f"'{root}' has no {MANIFEST_FILE}, so it is not an edgekit bundle (or it is a partial one). "
            "HINT: re-run 'edgekit export' into a fresh folder."
        )
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}). HINT: re-export the bundle.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise BundleError(f"{mpath} is not an edgekit manifest (format={data.get('format')!r}, want '{FORMAT_NAME}').")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise BundleError(
            f"Bundle '{root}' has format_version {version!r}, but this edgekit reads versions 1..{FORMAT_VERSION}. "
            "HINT: upgrade edgekit ('pip install -U edgekit') or re-export the bundle with this version."
        )
    manifest = Manifest.from_dict(data, where=str(mpath))
    if manifest.kind not in MODEL_KINDS:
        raise BundleError(f"{mpath} has kind {manifest.kind!r}; known kinds: {', '.join(MODEL_KINDS)}.")
    return manifest


def verify_files(bundle_dir: str | os.PathLike[str], manifest: Manifest, check_hashes: bool = True) -> None:
    """Refuse a bundle with a missing file or (when ``check_hashes``) a file whose SHA-256 differs."""
    root = Path(bundle_dir)
    missing = [name for name in manifest.files if not (root / name).is_file()]
    if missing:
        raise BundleError(
            f"Bundle '{root}' is incomplete: missing {', '.join(missing)}. HINT: copy the whole folder or re-export."
        )
    if not check_hashes:
        return
    bad = [name for name, digest in manifest.files.items() if sha256_file(root / name) != digest]
    if bad:
        raise BundleError(
            f"Bundle '{root}' failed its integrity check: SHA-256 of {', '.join(bad)} does not match {MANIFEST_FILE}. "
            "The file was modified or truncated. HINT: re-copy or re-export the bundle."
        )


def load_manifest(bundle_dir: str | os.PathLike[str], check_hashes: bool = True) -> Manifest:
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest, check_hashes=check_hashes)
    return manifest


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write ``edgekit.json`` atomically (temp file + rename)."""
    path = Path(bundle_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def hash_payload(bundle_dir: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of every file in the bundle except the manifest, keyed by relative path."""
    root = Path(bundle_dir)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")
    }


@contextmanager
def staging_dir(target: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it is renamed to ``target``, on failure removed.

    The rename is the last step, so an interrupted export leaves ``target`` untouched (absent or the old bundle).
    """
    target = Path(target)
    if target.exists() and not force:
        raise ExportError(
            f"Output folder '{target}' already exists. HINT: pass --force to replace it, or choose another -o path."
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"Output path '{target}' exists and is a file, not a folder. HINT: choose another -o path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
