"""Train, in minutes on a CPU, a small masked-diffusion LM and an AR model of the same size on a checkable task.

Task ("pairs"): the prompt lists K sums, e.g. "07,12,18,03=", and a correct answer gives, for each sum, two digits
that add up to it ("25" + "39" + "99" + "12" ...), then EOS padding. Most sums have several valid pairs, so the two
digits of a pair depend on each other: committing both in one step picks each from its own marginal and often
breaks the sum (one-step decoding loses accuracy), while pairs are independent of each other (parallel decoding can
commit across pairs). Answers are checked exactly.

Models (Hugging Face folders, cached under .cache/dllm/, not in git): a ModernBERT masked LM trained with the
masked-diffusion objective (mask ratio t ~ U(0, 1), cross-entropy on masked answer positions weighted by 1/t), and
a Llama causal LM of the same width/depth trained on next-token prediction; one character-level tokenizer.

    python benchmarks/train_dllm.py --steps 3000          # both models; prints accuracy as it goes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(".cache/dllm")
PAIRS = 6
GEN_LENGTH = 16  # 2 * PAIRS digits + EOS padding
VOCAB = ["[PAD]", "[MASK]", "[EOS]", *"0123456789", ",", "="]


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[PAD]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\[MASK\]|\[EOS\]|\[PAD\]|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", mask_token="[MASK]", eos_token="[EOS]")


def sample(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    """n (prompt, answer) pairs of strings; the answer excludes EOS padding."""
    prompts, answers = [], []
    for _ in range(n):
        sums = rng.integers(0, 19, PAIRS)
        digits = []
        for s in sums:
            a = int(rng.integers(max(0, s - 9), min(9, s) + 1))
            digits += [a, int(s) - a]
        prompts.append(",".join(f"{s:02d}" for s in sums) + "=")
        answers.append("".join(map(str, digits)))
    return prompts, answers


def correct(prompt: str, answer: str) -> bool:
    """Every pair of answer digits adds up to its sum (extra characters after the pairs are ignored)."""
    sums = [int(x) for x in prompt.rstrip("=").split(",")]
    digits = answer[: 2 * len(sums)]
    if len(digits) < 2 * len(sums) or not digits.isdigit():
        return False
    return all(int(digits[2 * i]) + int(digits[2 * i + 1]) == s for i, s in enumerate(sums))


def encode(tok, prompts: list[str], answers: list[str]):
    import torch

    eos = tok.eos_token_id
    rows = []
    for p, a in zip(prompts, answers):
        ids = tok(p + a, add_special_tokens=False)["input_ids"]
        rows.append(ids + [eos] * (len(tok(p)["input_ids"]) + GEN_LENGTH - len(ids)))
    return torch.tensor(rows)


def train(kind: str, steps: int, batch: int, seed: int, log_every: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = make_tokenizer()
    common = dict(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    if kind == "dllm":
        cfg = transformers.ModernBertConfig(**common, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                            cls_token_id=tok.eos_token_id, sep_token_id=tok.eos_token_id,
                                            global_attn_every_n_layers=1, local_attention=64)
        model = transformers.ModernBertForMaskedLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=4, bos_token_id=tok.eos_token_id,
                                       eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    cfg.architectures = [type(model).__name__]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    p_len = len(tok(sample(rng, 1)[0][0])["input_ids"])
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        x = encode(tok, *sample(rng, batch))  # [B, P + G]
        if kind == "dllm":
            t = torch.rand(batch, 1).clamp(min=1e-3)
            masked = torch.rand(batch, GEN_LENGTH) < t
            masked[masked.sum(1) == 0, 0] = True
            inp = x.clone()
            inp[:, p_len:][masked] = tok.mask_token_id
            labels = torch.full_like(x, -100)
            labels[:, p_len:][masked] = x[:, p_len:][masked]
            logits = model(input_ids=inp, attention_mask=torch.ones_like(inp)).logits
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [B, S]
            loss = (ce.sum(1, keepdim=True) / t).mean() / GEN_LENGTH
        else:
            labels = x.clone()
            labels[:, :p_len] = -100
            loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"[{kind}] step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    model.eval()
    out = CACHE / kind
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "task.json").write_text(json.dumps({"task": "pairs", "pairs": PAIRS, "gen_length": GEN_LENGTH,
                                               "steps": steps, "batch": batch, "seed": seed,
                                               "train_seconds": round(time.time() - start, 1)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["dllm", "ar"], default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    for kind in ("dllm", "ar"):
        if args.only in (None, kind):
            print(f"trained {kind} -> {train(kind, args.steps, args.batch, args.seed, max(1, args.steps // 20))}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
