"""Architecture registry: one frozen record per supported Hugging Face architecture.

Architecture knowledge lives here as data; code that truly differs between families is a small hook
(how to pull one layer's weights out of a state dict) referenced from the record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

import numpy as np

from edgekit.export.weights import BlockQuantLinear
from edgekit.runtimes.errors import UnsupportedModelError, did_you_mean

Matrix = Union[np.ndarray, BlockQuantLinear]  # noqa: UP007 (runtime alias)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer in the layout the graph builder wants; matrices are [out, in] like torch Linear,
    either dense float arrays or block-quantized weights carried over from a GGUF file. A norm that is None is
    absent from the family (OLMo 2 has no input norm; only Gemma 2/3 and OLMo 2 norm the branch outputs)."""

    input_norm: np.ndarray | None  # [H], before attention
    qkv: Matrix  # [(n_heads + 2 * kv_heads) * head_dim, H], rows ordered q, k, v
    qkv_bias: np.ndarray | None
    o: Matrix  # [H, n_heads * head_dim]
    post_norm: np.ndarray | None  # [H], before the MLP (Llama's "post_attention_layernorm")
    gate_up: Matrix  # [2 * I, H], rows ordered gate, up
    down: Matrix  # [H, I]
    q_norm: np.ndarray | None = None  # [head_dim] (per head: Qwen3, Gemma 3) or [n_heads * head_dim] (OLMo 2)
    k_norm: np.ndarray | None = None
    attn_out_norm: np.ndarray | None = None  # [H], on the attention output before the residual add
    mlp_out_norm: np.ndarray | None = None  # [H], on the MLP output before the residual add


StateDict = Mapping[str, Any]


@dataclass(frozen=True)
class Norms:
    """Where a family's RMSNorms sit: their state-dict names under ``model.layers.{i}.`` (None: not there)."""

    input: str | None = "input_layernorm"
    pre_mlp: str | None = "post_attention_layernorm"
    attn_out: str | None = None
    mlp_out: str | None = None


LLAMA_NORMS = Norms()
SANDWICH_NORMS = Norms(pre_mlp="pre_feedforward_layernorm", attn_out="post_attention_layernorm",
                       mlp_out="post_feedforward_layernorm")  # Gemma 2 / 3: every branch normed in and out
OLMO2_NORMS = Norms(input=None, pre_mlp=None, attn_out="post_attention_layernorm",
                    mlp_out="post_feedforward_layernorm")  # OLMo 2: norms on the branch outputs only


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _opt(sd: StateDict, key: str | None) -> np.ndarray | None:
    return _np(sd[key]) if key is not None and key in sd else None


def _norms(sd: StateDict, p: str, norms: Norms) -> dict[str, np.ndarray | None]:
    def get(name: str | None) -> np.ndarray | None:
        return None if name is None else _np(sd[p + name + ".weight"])

    return dict(input_norm=get(norms.input), post_norm=get(norms.pre_mlp), attn_out_norm=get(norms.attn_out),
                mlp_out_norm=get(norms.mlp_out), q_norm=_opt(sd, p + "self_attn.q_norm.weight"),
                k_norm=_opt(sd, p + "self_attn.k_norm.weight"))


def llama_layer(sd: StateDict, i: int, norms: Norms = LLAMA_NORMS) -> LayerWeights:
    """Separate q, k, v (with biases where the family has them) and separate gate and up projections."""
    p = f"model.layers.{i}."
    qkv = np.concatenate([_np(sd[p + f"self_attn.{n}_proj.weight"]) for n in "qkv"])
    biases = [b for n in "qkv" if (b := _opt(sd, p + f"self_attn.{n}_proj.bias")) is not None]
    qkv_bias = np.concatenate(biases) if len(biases) == 3 else None
    return LayerWeights(
        qkv=qkv, qkv_bias=qkv_bias, o=_np(sd[p + "self_attn.o_proj.weight"]),
        gate_up=np.concatenate([_np(sd[p + "mlp.gate_proj.weight"]), _np(sd[p + "mlp.up_proj.weight"])]),
        down=_np(sd[p + "mlp.down_proj.weight"]), **_norms(sd, p, norms),
    )


def phi3_layer(sd: StateDict, i: int, norms: Norms = LLAMA_NORMS) -> LayerWeights:
    """Phi-3: q, k, v already packed in ``qkv_proj``; gate and up packed in ``gate_up_proj``."""
    p = f"model.layers.{i}."
    return LayerWeights(
        qkv=_np(sd[p + "self_attn.qkv_proj.weight"]), qkv_bias=None, o=_np(sd[p + "self_attn.o_proj.weight"]),
        gate_up=_np(sd[p + "mlp.gate_up_proj.weight"]), down=_np(sd[p + "mlp.down_proj.weight"]),
        **_norms(sd, p, norms),
    )


@dataclass(frozen=True)
class GGUFLayout:
    """How one family's GGUF files name a layer's linears (llama.cpp's tensor names, without ``blk.{i}.``)."""

    qkv: tuple[str, ...] = ("attn_q", "attn_k", "attn_v")  # Phi-3: one packed attn_qkv
    gate_up: tuple[str, ...] = ("ffn_gate", "ffn_up")  # Phi-3: one packed ffn_up
    permute_qk: bool = False  # llama.cpp permuted the q/k rows (Llama, Mistral)


# Config fields a record can honour (the graph builder reads only those its record lists)
HONOURED = {
    "sliding_window": "local attention window (all layers, or those layer_types marks sliding)",
    "layer_types": "per-layer sliding/full attention pattern",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "query_pre_attn_scalar": "attention scale 1/sqrt(query_pre_attn_scalar)",
    "attention_multiplier": "attention scale",
    "embedding_multiplier": "embedding multiplier",
    "residual_multiplier": "residual branch multiplier",
    "logits_scaling": "logits divided by logits_scaling",
    "no_rope_layers": "layers without RoPE",
}


@dataclass(frozen=True)
class ArchSpec:
    """What edgekit knows about one architecture. ``kind`` is the bundle kind it exports to; ``exporter`` the
    module whose ``build`` writes its graphs; ``auto_classes`` the transformers classes that load it, in order.

    AR decoders (built by ``export.onnx_graph``) describe how they differ from Llama as data: ``norms`` (where
    the RMSNorms sit), ``norm_offset`` (Gemma stores w - 1), ``embed_scale`` ("sqrt_hidden": Gemma's
    embedding normalizer), ``activation`` and the config attribute naming it, ``honours``: the config fields
    (keys of ``HONOURED``) the family reads, and ``gguf_layout``: how its GGUF files are laid out, for the
    families whose GGUF blocks ``export.gguf`` carries over.
    """

    architecture: str  # Hugging Face class name, as in config.json "architectures"
    kind: Literal["ar", "diffusion"]
    family: str
    exporter: str
    auto_classes: tuple[str, ...]
    compressible: bool  # precisions other than fp32, pruning and device profiles apply
    layer_weights: Callable[[StateDict, int, Norms], LayerWeights] | None = None
    norms: Norms = LLAMA_NORMS
    norm_offset: float = 0.0
    embed_scale: str | None = None
    activation: str = "silu"
    activation_attr: str = "hidden_act"
    honours: frozenset[str] = frozenset()
    sliding_window_flag: str | None = None  # config attribute that switches the window on (Qwen2)
    gguf_layout: GGUFLayout | None = None  # its GGUF files' tensor layout; None: GGUF blocks are not carried over

    def layer(self, sd: StateDict, i: int) -> LayerWeights:
        """Layer ``i``'s weights from a state dict, norms offset to plain RMSNorm form (w' = offset + w)."""
        assert self.layer_weights is not None, "AR records name their layer hook"
        lw = self.layer_weights(sd, i, self.norms)
        if not self.norm_offset:
            return lw
        names = ("input_norm", "post_norm", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm")
        return replace(lw, **{n: getattr(lw, n) + self.norm_offset for n in names if getattr(lw, n) is not None})


def decoder(architecture: str, family: str, layer_weights: Callable[[StateDict, int, Norms], LayerWeights],
            honours: tuple[str, ...] = (), **kw: Any) -> ArchSpec:
    """An AR decoder, exported by edgekit's fused-op graph builder."""
    unknown = set(honours) - set(HONOURED)
    assert not unknown, f"unknown config fields {unknown}"
    return ArchSpec(architecture, "ar", family, "edgekit.export.decoder", ("AutoModelForCausalLM",), True,
                    layer_weights, honours=frozenset(honours), **kw)


def masked_lm(architecture: str, family: str) -> ArchSpec:
    """A masked LM run as a diffusion LM, exported whole with torch.onnx (remote-code dLLMs register AutoModel)."""
    return ArchSpec(architecture, "diffusion", family, "edgekit.export.diffusion",
                    ("AutoModelForMaskedLM", "AutoModel"), False)


WINDOWED = ("sliding_window", "layer_types")
GEMMA = dict(norm_offset=1.0, embed_scale="sqrt_hidden", activation="gelu_pytorch_tanh")
GGUF = GGUFLayout()
GGUF_PERMUTED = GGUFLayout(permute_qk=True)

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.architecture: spec
    for spec in (
        decoder("LlamaForCausalLM", "llama", llama_layer, gguf_layout=GGUF_PERMUTED),
        decoder("MistralForCausalLM", "mistral", llama_layer, WINDOWED, gguf_layout=GGUF_PERMUTED),
        decoder("Qwen2ForCausalLM", "qwen2", llama_layer, WINDOWED, sliding_window_flag="use_sliding_window",
                gguf_layout=GGUF),
        decoder("Qwen3ForCausalLM", "qwen3", llama_layer, WINDOWED, sliding_window_flag="use_sliding_window",
                gguf_layout=GGUF),
        decoder("Phi3ForCausalLM", "phi3", phi3_layer, WINDOWED,
                gguf_layout=GGUFLayout(qkv=("attn_qkv",), gate_up=("ffn_up",))),
        decoder("GemmaForCausalLM", "gemma", llama_layer, **GEMMA),
        decoder("Gemma2ForCausalLM", "gemma2", llama_layer, (*WINDOWED, "attn_logit_softcapping",
                "final_logit_softcapping", "query_pre_attn_scalar"), norms=SANDWICH_NORMS,
                activation_attr="hidden_activation", gguf_layout=GGUF, **GEMMA),
        decoder("Gemma3ForCausalLM", "gemma3", llama_layer, (*WINDOWED, "attn_logit_softcapping",
                "final_logit_softcapping", "query_pre_attn_scalar"), norms=SANDWICH_NORMS,
                activation_attr="hidden_activation", gguf_layout=GGUF, **GEMMA),
        decoder("SmolLM3ForCausalLM", "smollm3", llama_layer, (*WINDOWED, "no_rope_layers"),
                sliding_window_flag="use_sliding_window"),
        decoder("GraniteForCausalLM", "granite", llama_layer, ("attention_multiplier", "embedding_multiplier",
                "residual_multiplier", "logits_scaling")),
        decoder("Olmo2ForCausalLM", "olmo2", llama_layer, norms=OLMO2_NORMS),
        decoder("Olmo3ForCausalLM", "olmo3", llama_layer, WINDOWED, norms=OLMO2_NORMS),
        # masked LMs (the base of several chat dLLMs)
        masked_lm("ModernBertForMaskedLM", "modernbert"),
        masked_lm("BertForMaskedLM", "bert"),
        masked_lm("RobertaForMaskedLM", "roberta"),
        masked_lm("DistilBertForMaskedLM", "distilbert"),
        # LLaDA-style dLLMs ship their modeling code (trust_remote_code); LLaDA-8B names its class LLaDAModelLM
        masked_lm("LLaDAModelLM", "llada"),
    )
}

# the families whose GGUF files edgekit carries over (their records' family names are GGUF's general.architecture)
GGUF_FAMILIES: tuple[str, ...] = tuple(s.family for s in ARCHITECTURES.values() if s.gguf_layout is not None)

MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def lookup(architecture: str, config: Any = None) -> ArchSpec:
    """Return the registry record, or raise an error listing what is supported (naming MoE as the feature)."""
    experts = next((f"{f}={getattr(config, f)}" for f in MOE_FIELDS if getattr(config, f, None)), None)
    if experts is None and "moe" in architecture.lower():
        experts = "a mixture-of-experts architecture"
    if experts is not None:
        dense = ", ".join(sorted(a for a, s in ARCHITECTURES.items() if s.layer_weights is not None))
        raise UnsupportedModelError(
            f"'{architecture}' is a mixture-of-experts model ({experts}): edgekit's decoder graph has no expert "
            f"routing, so MoE models are not supported yet. Dense AR architectures supported: {dense}.")
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"Unsupported architecture '{architecture}'. Supported: {supported}."
            f"{did_you_mean(architecture, ARCHITECTURES)}"
        ) from None


def gguf_layout(model_type: str) -> GGUFLayout | None:
    """The GGUF layout on the record of the family a transformers ``model_type`` names (Gemma 3's text model says
    "gemma3_text"); None when edgekit does not carry that family's GGUF blocks over."""
    family = model_type.removesuffix("_text")
    return next((s.gguf_layout for s in ARCHITECTURES.values() if s.family == family and s.gguf_layout), None)
