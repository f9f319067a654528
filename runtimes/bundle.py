"""The bundle: a folder of ONNX graphs + tokenizer + ``edgekit.json``, the contract between export and runtime.

The runtime reads only this folder (never a Hugging Face config or a model name). ``export`` writes bundles through
``staging.staging_dir`` so that a failed or interrupted export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgekit.runtimes import schema
from edgekit.runtimes.errors import BundleError
from edgekit.runtimes.unmasking import CACHE_MODES

FORMAT_NAME = "edgekit-bundle"
FORMAT_VERSION = 2  # 2: block attention and diffusion graphs as typed records (1 kept them in an untyped bag)
MIN_FORMAT_VERSION = 2
MANIFEST_FILE = "edgekit.json"
MAX_MANIFEST_BYTES = 16 << 20  # ours are ~100 KB (chat template and parity report included)
KV_DTYPES: tuple[str, ...] = ("float32", "float16")
TARGETS: tuple[str, ...] = ("cpu", "cuda", "tensorrt")  # graph flavours (export.targets holds their records)
# what an untrusted manifest may set per provider and in the session config (nothing naming files or changing loading)
PROVIDER_OPTION_KEYS: dict[str, frozenset[str]] = {
    "TensorrtExecutionProvider": frozenset({"trt_fp16_enable", "trt_int8_enable", "trt_profile_min_shapes",
                                            "trt_profile_opt_shapes", "trt_profile_max_shapes",
                                            "trt_max_workspace_size", "trt_builder_optimization_level"}),
    "CUDAExecutionProvider": frozenset({"arena_extend_strategy", "enable_cuda_graph", "do_copy_in_default_stream"}),
}
SESSION_CONFIG_KEYS = frozenset({"ep.cuda.fpa_intb_gemm", "session.qdq_matmulnbits_accuracy_level"})

# the special-token strings a chat template may refer to by name (transformers' names); nothing else may be passed
SPECIAL_TOKEN_NAMES: tuple[str, ...] = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "cls_token",
                                        "sep_token")
ModelKind = Literal["ar", "diffusion", "block_diffusion"]
MODEL_KINDS: tuple[str, ...] = ("ar", "diffusion", "block_diffusion")


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
    # the graph writes present K/V straight into its outputs, so one max-length buffer bound as both past and
    # present is updated in place (GroupQueryAttention's shared-buffer mode); older bundles copy the past per step
    shared_buffer: bool = False


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
    """How the runtime runs the graphs: the graph's target flavour (cpu, cuda, tensorrt), execution providers in
    order of preference (from the target; the caller can override them), each provider's options as recorded at
    export (the TensorRT EP's fp16 flag and optimization profiles from the bundle's max context and batch; the
    engine and timing cache paths are added where the bundle is run), onnxruntime session config entries, graph
    transformers to skip (one that mishandles a graph), and the oldest onnxruntime its graphs run on (derived at
    export from the ops and attributes they hold; ``min_onnxruntime_for`` names them), checked at load."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    disabled_optimizers: tuple[str, ...] = ()
    target: str = "cpu"
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    session_config: Mapping[str, str] = field(default_factory=dict)
    min_onnxruntime: str = "1.20"
    min_onnxruntime_for: str = ""


@dataclass(frozen=True)
class Quantization:
    """How the weights were compressed: a row of export's table of methods, as data (never prose to parse back).
    ``tolerance`` names the parity tolerance that applies (a key of edgekit.report.TOLERANCES)."""

    method: str  # gguf | rtn | hqq | gptq
    bits: int
    block_size: int
    accuracy_level: int
    tolerance: str
    format: str = "nbits"  # nbits (MatMulNBits) | qdq (DequantizeLinear + MatMul)
    activations: str = "float"  # float | int8 (MatMulNBits accuracy level 4: int8 activations per block)
    kv_cache: str = "fp32"
    embedding: str = "float32"
    lm_head: str = "8-bit"
    source_types: Mapping[str, int] = field(default_factory=dict)  # GGUF tensor types carried over


@dataclass(frozen=True)
class BlockAttention:
    """A block-diffusion graph's attention: bidirectional inside blocks of absolute positions, causal across them.
    The block length of a run is a graph input; ``block_lengths`` are those the model was trained with (the default
    ``block_length`` among them). ``token_shift``: token i is predicted at position i - 1 (AR-adapted models, Fast-dLLM
    v2 style)."""

    block_length: int
    block_lengths: tuple[int, ...]
    token_shift: bool = False


DIFFUSION_ATTENTION: tuple[str, ...] = ("bidirectional", "prompt_isolated")


@dataclass(frozen=True)
class DiffusionGraphs:
    """How a full-bidirectional dLLM's graphs run: ``attention`` (prompt-isolated models' prompt positions do not
    attend to the answer, and their whole-sequence graph takes the prompt length), the cache modes its graphs support
    (``denoise_encode``/``denoise_block`` graphs for prefix/dual) and the position id of the first token in them."""

    attention: str = "bidirectional"
    cache_modes: tuple[str, ...] = ("none",)
    position_offset: int = 0


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
    block_attention: BlockAttention | None = None  # block-diffusion bundles
    diffusion: DiffusionGraphs | None = None  # full-bidirectional diffusion bundles
    extra: Mapping[str, Any] = field(default_factory=dict)  # shown to people (device fit, quality report), never read
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Parse an untrusted manifest: every field typed and in range, or a BundleError naming it."""
        r = schema.Reader(data, where)
        vocab = r.int("vocab_size", lo=1, hi=1 << 24)
        tokens, tokenizer = r.obj("tokens"), r.obj("tokenizer")
        kv, quant, runtime, blocks, diffusion = (r.obj(k, False) for k in ("kv_cache", "quantization", "runtime",
                                                                            "block_attention", "diffusion"))
        assert tokens is not None and tokenizer is not None
        token_id = dict(required=False, lo=0, hi=vocab - 1)
        return cls(
            kind=r.str("kind", choices=MODEL_KINDS),
            architecture=r.str("architecture", max_len=200),
            model_type=r.str("model_type", max_len=200),
            precision=r.str("precision", max_len=64),
            max_context=r.int("max_context", lo=1, hi=1 << 22),
            vocab_size=vocab,
            graphs=r.each("graphs", lambda g: GraphSpec(g.str("file", max_len=255), g.strings("inputs"),
                                                          g.strings("outputs"))),
            tokens=SpecialTokens(**{k: tokens.int(k, **token_id) for k in ("bos_id", "eos_id", "pad_id", "turn_end_id",
                                                                            "mask_id")},
                                 stop_ids=tokens.ints("stop_ids", 0, vocab - 1)),
            tokenizer=TokenizerSpec(
                file=tokenizer.str("file", max_len=255),
                chat_template=tokenizer.str("chat_template", required=False, max_len=1 << 18),
                add_special_tokens=tokenizer.bool("add_special_tokens", True),
                special_token_strings=_checked_keys(tokenizer, "special_token_strings", {"": tokenizer.mapping(
                    "special_token_strings", lambda v: v is None or isinstance(v, str), "an object of strings")},
                    {"": frozenset(SPECIAL_TOKEN_NAMES)})[""]),
            kv_cache=None if kv is None else _kv_layout(kv),
            generation=r.mapping("generation"),
            runtime=RuntimeSpec() if runtime is None else RuntimeSpec(
                providers=runtime.strings("providers", required=False) or RuntimeSpec().providers,
                disabled_optimizers=runtime.strings("disabled_optimizers", required=False),
                target=runtime.str("target", False, "cpu", choices=TARGETS),
                provider_options=_checked_keys(runtime, "provider_options", runtime.mapping(
                    "provider_options", _string_map, "an object of string objects"), PROVIDER_OPTION_KEYS),
                session_config=_checked_keys(runtime, "session_config", {"": runtime.mapping(
                    "session_config", lambda v: isinstance(v, str), "an object of strings")},
                    {"": SESSION_CONFIG_KEYS})[""],
                min_onnxruntime=_release(runtime, "min_onnxruntime"),
                min_onnxruntime_for=runtime.str("min_onnxruntime_for", False, "", max_len=1000)),
            quantization=None if quant is None else Quantization(
                method=quant.str("method", max_len=64), bits=quant.int("bits", lo=1, hi=16),
                block_size=quant.int("block_size", lo=1, hi=1 << 16), accuracy_level=quant.int("accuracy_level", hi=4),
                tolerance=quant.str("tolerance", max_len=64), format=quant.str("format", False, "nbits"),
                activations=quant.str("activations", False, "float"), kv_cache=quant.str("kv_cache", False, "fp32"),
                embedding=quant.str("embedding", False, "float32"), lm_head=quant.str("lm_head", False, "8-bit"),
                source_types=quant.mapping("source_types", lambda v: isinstance(v, int), "an object of counts")),
            files=r.mapping("files", schema.is_hex_digest, "an object of SHA-256 hex digests"),
            provenance=r.mapping("provenance"),
            parity=r.mapping("parity") or None,
            block_attention=None if blocks is None else _block_attention(blocks),
            diffusion=None if diffusion is None else DiffusionGraphs(
                attention=diffusion.str("attention", False, "bidirectional", choices=DIFFUSION_ATTENTION),
                cache_modes=diffusion.choices("cache_modes", CACHE_MODES) or ("none",),
                position_offset=diffusion.int("position_offset", False, 0, hi=1 << 20)),
            extra=r.mapping("extra"),
            format=r.str("format", choices=(FORMAT_NAME,)),
            format_version=r.int("format_version", lo=MIN_FORMAT_VERSION, hi=FORMAT_VERSION),
        )


def _checked_keys(r: schema.Reader, key: str, groups: dict[str, Any],
                  allowed: Mapping[str, frozenset[str]]) -> dict[str, Any]:
    for group, entries in groups.items():
        bad = [k for k in entries if k not in allowed.get(group, frozenset())]
        if bad:
            where = f"{key}.{group}" if group else key
            raise BundleError(f"{r.where}: '{where}' sets {bad[0]!r}, which a bundle may not set (allowed: "
                              f"{', '.join(sorted(allowed.get(group, ()))) or 'none'}). {schema.HINT}")
    return groups


def _block_attention(r: schema.Reader) -> BlockAttention:
    block = r.int("block_length", lo=1, hi=1 << 16)
    lengths = r.ints("block_lengths", 1, 1 << 16) or (block,)
    if block not in lengths:
        raise BundleError(f"{r.where}: 'block_length' {block} is not one of 'block_lengths' {list(lengths)}. "
                          f"{schema.HINT}")
    return BlockAttention(block, lengths, r.bool("token_shift", False))


def _release(r: schema.Reader, key: str) -> str:
    v = r.str(key, False, RuntimeSpec.min_onnxruntime, max_len=20)
    if not release(v):
        raise BundleError(f"{r.where}: '{key}' must be a release like 1.20 or 1.21.1, got {v!r}. {schema.HINT}")
    return v


def release(text: str) -> tuple[int, ...]:
    """'1.21.1' -> (1, 21, 1); () when it is not a release number (a dev build's suffix is ignored: '1.23.0.dev')."""
    parts = text.split("+")[0].split(".")[:3]
    return tuple(int(p) for p in parts) if len(parts) >= 2 and all(p.isdigit() for p in parts) else ()


def _string_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _kv_layout(r: schema.Reader) -> KVCacheLayout:
    names = {k: r.str(k, False, getattr(KVCacheLayout, k), max_len=200)
             for k in ("past_key", "past_value", "present_key", "present_value")}
    for k, v in names.items():
        if v.count("{layer}") != 1 or "{" in v.replace("{layer}", "") or "}" in v.replace("{layer}", ""):
            raise BundleError(f"{r.where}: '{k}' must hold '{{layer}}' exactly once and no other braces, got {v!r}. "
                              f"{schema.HINT}")
    return KVCacheLayout(num_layers=r.int("num_layers", lo=1, hi=4096), num_kv_heads=r.int("num_kv_heads", lo=1,
                                                                                           hi=4096),
                         head_dim=r.int("head_dim", lo=1, hi=1 << 14),
                         dtype=r.str("dtype", False, "float32", choices=KV_DTYPES),
                         layout=r.str("layout", False, "BNSH", choices=("BNSH",)),
                         shared_buffer=r.bool("shared_buffer", False), **names)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check ``edgekit.json`` (size, nesting, format name and version, every field); no payload hashing."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(
            f"Bundle '{root}' does not exist or is not a folder. HINT: create one with 'edgekit export SRC -o {root}'.")
    mpath = root / MANIFEST_FILE
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(
            f"'{root}' has no {MANIFEST_FILE} (or it is a link), so it is not an edgekit bundle (or it is a partial "
            "one). HINT: re-run 'edgekit export' into a fresh folder.")
    with open(mpath, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    data = schema.loads(raw, str(mpath), MAX_MANIFEST_BYTES)
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise BundleError(f"{mpath} is not an edgekit manifest (format={got!r}, want '{FORMAT_NAME}').")
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and 1 <= version < MIN_FORMAT_VERSION:
        raise BundleError(
            f"Bundle '{root}' has format_version {version}, written by an older edgekit; this edgekit reads versions "
            f"{MIN_FORMAT_VERSION}..{FORMAT_VERSION}. HINT: re-export the bundle with this edgekit version.")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise BundleError(
            f"Bundle '{root}' has format_version {version!r}, but this edgekit reads versions 1..{FORMAT_VERSION}. "
            "HINT: upgrade edgekit ('pip install -U edgekit') or re-export the bundle with this version.")
    return Manifest.from_dict(data, where=str(mpath))


def bundle_file(root: Path, name: str, what: str = "file") -> Path:
    """The path of a file the manifest names: a plain relative name inside the bundle (no '..', no absolute path,
    no link anywhere on the way), or a BundleError naming it."""
    parts = Path(name).parts
    if (not name or "\0" in name or "\\" in name or Path(name).is_absolute() or not parts
            or any(p in ("..", ".") for p in parts) or name != "/".join(parts)):
        raise BundleError(f"{MANIFEST_FILE} names {what} {name!r}, which is not a plain relative path inside the "
                          "bundle. HINT: a bundle from a stranger may be hostile; re-export it yourself.")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"Bundle '{root}': {what} {name!r} is (or goes through) a symbolic link; bundles hold "
                              "plain files only. HINT: copy the real files in (cp -L) or re-export.")
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{MANIFEST_FILE} names {what} {name!r}, which resolves outside the bundle.")
    return path


def verify_files(bundle_dir: str | os.PathLike[str], manifest: Manifest, check_hashes: bool = True) -> None:
    """Refuse a bundle whose file list is missing, leaves out a file the bundle holds or the manifest names (graphs,
    tokenizer), names a path outside the folder or a link, lacks a listed file, or (when ``check_hashes``) holds a
    file whose SHA-256 differs."""
    root = Path(bundle_dir)
    if not manifest.files:
        raise BundleError(f"Bundle '{root}': {MANIFEST_FILE} lists no files, so nothing could be verified. "
                          "HINT: re-export the bundle.")
    paths = {name: bundle_file(root, name) for name in manifest.files}
    named = [g.file for g in manifest.graphs.values()] + [manifest.tokenizer.file]
    present = set()
    for folder, dirs, names in os.walk(root):  # never follows links: a linked folder is reported, not walked
        here = Path(folder).relative_to(root)
        present |= {(here / n).as_posix() for n in names + [d for d in dirs if (Path(folder) / d).is_symlink()]}
    present.discard(MANIFEST_FILE)
    unlisted = sorted((set(named) | present) - set(manifest.files))
    if unlisted:
        raise BundleError(f"Bundle '{root}' holds or names files its manifest does not list (and so cannot verify): "
                          f"{', '.join(unlisted[:5])}. HINT: remove them, or re-export the bundle.")
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise BundleError(
            f"Bundle '{root}' is incomplete: missing {', '.join(missing)}. HINT: copy the whole folder or re-export.")
    if not check_hashes:
        return
    bad = [name for name, digest in manifest.files.items() if sha256_file(paths[name]) != digest]
    if bad:
        raise BundleError(
            f"Bundle '{root}' failed its integrity check: SHA-256 of {', '.join(bad)} does not match {MANIFEST_FILE}. "
            "The file was modified or truncated. HINT: re-copy or re-export the bundle.")


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
