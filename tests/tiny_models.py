"""Builds tiny random-weight Hugging Face models of the real architectures, saved with save_pretrained.

A byte-level BPE tokenizer is trained on a few lines (English, Chinese, emoji) so multi-byte characters span
several tokens, and it carries a ChatML chat template, like SmolLM2's.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Why is the sky blue? Rayleigh scattering.",
    "def reverse(s): return s[::-1]  # Python code with numbers 12345 and symbols !?",
    "请用一句话介绍一下长城。长城是中国古代的军事防御工程。你好，世界！",
    "Summer emoji: 🌞🌊🍉😀 and hearts ❤️ 👍🏽 — café naïve résumé.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
]


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


def make_model(arch: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random ``arch`` model plus tokenizer into ``folder`` and return it."""
    import transformers

    tok = make_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    gemma = dict(head_dim=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    # Each config keeps the features of the family's real checkpoints, shrunk; where a real value would not
    # bite on a 2-4 layer model with random weights (soft-caps of 50/30, windows of 4096), a smaller one does.
    per_arch = {
        "LlamaForCausalLM": ("LlamaConfig", dict(tie_word_embeddings=True)),
        "Qwen2ForCausalLM": ("Qwen2Config", dict(tie_word_embeddings=False)),
        "MistralForCausalLM": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
        "Phi3ForCausalLM": ("Phi3Config", dict(tie_word_embeddings=False, pad_token_id=tok.pad_token_id)),
        # Qwen3: per-head q/k RMSNorm, tied embeddings (the small checkpoints)
        "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
        # Gemma: (1 + w) RMSNorm, sqrt(hidden) embedding scale, GELU-tanh MLP
        "GemmaForCausalLM": ("GemmaConfig", dict(head_dim=16, hidden_act="gelu_pytorch_tanh",
                                                 tie_word_embeddings=True)),
        # Gemma 2: sandwich norms, alternating sliding/full layers, attention and final soft-capping,
        # query_pre_attn_scalar different from head_dim
        "Gemma2ForCausalLM": ("Gemma2Config", dict(**gemma, num_hidden_layers=3, sliding_window=8,
                                                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                                   final_logit_softcapping=3.0)),
        # Gemma 3 (text): q/k norm, local/global layers with two RoPE bases (the global one linearly scaled,
        # as in the 4B+ checkpoints)
        "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(
            **gemma, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
        # SmolLM3: every 4th layer without RoPE (NoPE)
        "SmolLM3ForCausalLM": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=True)),
        # Granite 3: the four multipliers of granite-3.x-2b-instruct
        "GraniteForCausalLM": ("GraniteConfig", dict(tie_word_embeddings=True, embedding_multiplier=12.0,
                                                     attention_multiplier=0.015625, residual_multiplier=0.22,
                                                     logits_scaling=8.0)),
        # OLMo 2: norms on the branch outputs only, q/k norm over the whole projection
        "Olmo2ForCausalLM": ("Olmo2Config", dict(tie_word_embeddings=False)),
        # OLMo 3: OLMo 2 plus three sliding-window layers per full one
        "Olmo3ForCausalLM": ("Olmo3Config", dict(num_hidden_layers=4, sliding_window=8, tie_word_embeddings=False)),
        "GPT2LMHeadModel": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4)),
    }
    if arch == "Phi3ForCausalLM:longrope":  # Phi-3.5 / Phi-4-mini: LongRoPE factors, partial rotary (0.75)
        arch = "Phi3ForCausalLM"
        half = int(64 * 0.75) // 2  # head_dim 64: onnxruntime needs rotary_dim / 2 to be a multiple of 8
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                "short_factor": [1.0 + 0.1 * j for j in range(half)],
                "long_factor": [2.0 + 0.5 * j for j in range(half)]}
        overrides = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.75,
                         original_max_position_embeddings=32, rope_parameters=rope, **overrides)
    config_cls, extra = per_arch[arch]
    return _save(arch, getattr(transformers, config_cls)(**{**common, **extra, **overrides}), tok, folder, seed)


def _save(arch: str, config, tok, folder: Path, seed: int) -> Path:
    """Build ``arch`` from ``config`` with seeded random weights; save it and the tokenizer into ``folder``."""
    import torch
    import transformers

    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_mlm(arch: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random masked LM (BERT family) with the byte-level BPE tokenizer plus a mask token."""
    import transformers

    tok = make_tokenizer()
    tok.add_special_tokens({"mask_token": "<|mask|>"})
    n = len(tok)
    common = dict(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, initializer_range=0.2, pad_token_id=tok.pad_token_id)
    per_arch = {
        "BertForMaskedLM": ("BertConfig", {}),
        "RobertaForMaskedLM": ("RobertaConfig", {}),
        "ModernBertForMaskedLM": ("ModernBertConfig", dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                           cls_token_id=tok.bos_token_id, sep_token_id=tok.eos_token_id,
                                                           local_attention=16)),
        "DistilBertForMaskedLM": ("DistilBertConfig", dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4)),
    }
    config_cls, extra = per_arch[arch]
    kw = {**common, **extra, **overrides}
    if arch == "DistilBertForMaskedLM":
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            kw.pop(k)
    return _save(arch, getattr(transformers, config_cls)(**kw), tok, folder, seed)


FIXTURES = Path(__file__).parent / "fixtures"


def make_llada(folder: Path, seed: int = 0) -> Path:
    """A tiny LLaDA-style model whose modeling code lives in the folder (loaded with trust_remote_code)."""
    import json
    import shutil
    import sys

    import torch

    sys.path.insert(0, str(FIXTURES / "tiny_llada"))
    try:
        from configuration_tiny_llada import TinyLLaDAConfig
        from modeling_tiny_llada import TinyLLaDAModelLM
    finally:
        sys.path.pop(0)
    tok = make_tokenizer()
    tok.add_special_tokens({"mask_token": "<|mdm_mask|>"})
    config = TinyLLaDAConfig(vocab_size=len(tok), mask_token_id=tok.mask_token_id, initializer_range=0.2)
    torch.manual_seed(seed)
    model = TinyLLaDAModelLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    for f in ("configuration_tiny_llada.py", "modeling_tiny_llada.py"):
        shutil.copy(FIXTURES / "tiny_llada" / f, folder / f)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["LLaDAModelLM"]  # the class name LLaDA-8B declares; auto_map points at the fixture
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny_llada.TinyLLaDAConfig",
                       "AutoModel": "modeling_tiny_llada.TinyLLaDAModelLM",
                       "AutoModelForMaskedLM": "modeling_tiny_llada.TinyLLaDAModelLM"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder
