"""Architecture registry: one frozen record per supported Hugging Face architecture.

Architecture knowledge lives here as data; code that truly differs between families is a small hook
(how to pull one layer's weights out of a state dict) referenced from the record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np

from edgekit.export.gguf import BlockQuantLinear
from edgekit.runtimes.errors import UnsupportedModelError, did_you_mean

Matrix = Union[np.ndarray, BlockQuantLinear]  # noqa: UP007 (runtime alias)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer in the layout the graph builder wants; matrices are [out, in] like torch Linear,
    either dense float arrays or block-quantized weights carried over from a GGUF file."""

    input_norm: np.ndarray  # [H]
    qkv: Matrix  # [(n_heads + 2 * kv_heads) * head_dim, H], rows ordered q, k, v
    qkv_bias: np.ndarray | None
    o: Matrix  # [H, n_heads * head_dim]
    post_norm: np.ndarray  # [H]
    gate_up: Matrix  # [2 * I, H], rows ordered gate, up
    down: Matrix  # [H, I]


StateDict = Mapping[str, Any]


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _opt(sd: StateDict, key: str) -> np.ndarray | None:
    return _np(sd[key]) if key in sd else None


def llama_layer(sd: StateDict, i: int) -> LayerWeights:
    """Llama / Mistral / Qwen2: separate q, k, v (Qwen2 with biases), separate gate and up."""
    p = f"model.layers.{i}."
    qkv = np.concatenate([_np(sd[p + f"self_attn.{n}_proj.weight"]) for n in "qkv"])
    biases = [_opt(sd, p + f"self_attn.{n}_proj.bias") for n in "qkv"]
    qkv_bias = np.concatenate(biases) if all(b is not None for b in biases) else None
    return LayerWeights(
        input_norm=_np(sd[p + "input_layernorm.weight"]),
        qkv=qkv,
        qkv_bias=qkv_bias,
        o=_np(sd[p + "self_attn.o_proj.weight"]),
        post_norm=_np(sd[p + "post_attention_layernorm.weight"]),
        gate_up=np.concatenate([_np(sd[p + "mlp.gate_proj.weight"]), _np(sd[p + "mlp.up_proj.weight"])]),
        down=_np(sd[p + "mlp.down_proj.weight"]),
    )


def phi3_layer(sd: StateDict, i: int) -> LayerWeights:
    """Phi-3: q, k, v already packed in ``qkv_proj``; gate and up packed in ``gate_up_proj``."""
    p = f"model.layers.{i}."
    return LayerWeights(
        input_norm=_np(sd[p + "input_layernorm.weight"]),
        qkv=_np(sd[p + "self_attn.qkv_proj.weight"]),
        qkv_bias=None,
        o=_np(sd[p + "self_attn.o_proj.weight"]),
        post_norm=_np(sd[p + "post_attention_layernorm.weight"]),
        gate_up=_np(sd[p + "mlp.gate_up_proj.weight"]),
        down=_np(sd[p + "mlp.down_proj.weight"]),
    )


@dataclass(frozen=True)
class ArchSpec:
    """What edgekit knows about one architecture. ``kind`` is the bundle kind it exports to; ``exporter`` the
    module whose ``build`` writes its graphs; ``auto_classes`` the transformers classes that load it, in order."""

    architecture: str  # Hugging Face class name, as in config.json "architectures"
    kind: Literal["ar", "diffusion"]
    family: str
    exporter: str
    auto_classes: tuple[str, ...]
    compressible: bool  # precisions other than fp32, pruning and device profiles apply
    layer_weights: Callable[[StateDict, int], LayerWeights] | None = None  # AR decoders built by export.onnx_graph
    activation: str = "silu"
    sliding_window_attr: str | None = None  # config attribute holding a local attention window, if any
    sliding_window_flag: str | None = None  # config attribute that switches the window on (Qwen2)


def decoder(architecture: str, family: str, layer_weights: Callable[[StateDict, int], LayerWeights],
            **kw: Any) -> ArchSpec:
    """An AR decoder, exported by edgekit's fused-op graph builder."""
    return ArchSpec(architecture, "ar", family, "edgekit.export.decoder", ("AutoModelForCausalLM",), True,
                    layer_weights, **kw)


def masked_lm(architecture: str, family: str) -> ArchSpec:
    """A masked LM run as a diffusion LM, exported whole with torch.onnx (remote-code dLLMs register AutoModel)."""
    return ArchSpec(architecture, "diffusion", family, "edgekit.export.diffusion",
                    ("AutoModelForMaskedLM", "AutoModel"), False)


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.architecture: spec
    for spec in (
        decoder("LlamaForCausalLM", "llama", llama_layer),
        decoder("MistralForCausalLM", "mistral", llama_layer, sliding_window_attr="sliding_window"),
        decoder("Qwen2ForCausalLM", "qwen2", llama_layer, sliding_window_attr="sliding_window",
                sliding_window_flag="use_sliding_window"),
        decoder("Phi3ForCausalLM", "phi3", phi3_layer, sliding_window_attr="sliding_window"),
        # masked LMs (the base of several chat dLLMs)
        masked_lm("ModernBertForMaskedLM", "modernbert"),
        masked_lm("BertForMaskedLM", "bert"),
        masked_lm("RobertaForMaskedLM", "roberta"),
        masked_lm("DistilBertForMaskedLM", "distilbert"),
        # LLaDA-style dLLMs ship their modeling code (trust_remote_code); LLaDA-8B names its class LLaDAModelLM
        masked_lm("LLaDAModelLM", "llada"),
    )
}


def lookup(architecture: str) -> ArchSpec:
    """Return the registry record, or raise an error listing what is supported."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"Unsupported architecture '{architecture}'. Supported: {supported}."
            f"{did_you_mean(architecture, ARCHITECTURES)}"
        ) from None
