"""Train, in minutes on a CPU, a small masked-diffusion LM and an AR model of the same size on a checkable task.

Task "pairs": the prompt lists K sums, e.g. "07,12,18,03=", and a correct answer gives, for each sum, two digits
that add up to it ("25" + "39" + "99" + "12" ...), then EOS padding. Most sums have several valid pairs, so the two
digits of a pair depend on each other: committing both in one step picks each from its own marginal and often
breaks the sum (one-step decoding loses accuracy), while pairs are independent of each other (parallel decoding can
commit across pairs). Answers are checked exactly.

Task "pairs_copy" (the default): like real text, an answer mixes tokens the context determines with a few free,
mutually dependent choices. The prompt is 4 segments of a two-digit sum and 8 digits, e.g. "07394857201290123456...=",
and the answer has, per segment, a pair of digits adding up to the sum followed by the 8 digits copied
("25" "39485720" "39" "90123456" ...): 40 tokens, then EOS padding to 48. The copied digits are certain (a confidence
threshold commits them in parallel), the pair digits are not (committing both of a pair at once breaks the sum).

Task "shuffle": the prompt is 8 digits, e.g. "31415926=", and any ordering of them is a correct answer: valid but
not unique, and every answer token depends on all the others (committing two at once can repeat a digit). Scored
for validity.

Models (Hugging Face folders, cached under .cache/dllm/<task>/, not in git): a ModernBERT masked LM trained with the
masked-diffusion objective (mask ratio t ~ U(0, 1), cross-entropy on masked answer positions weighted by 1/t), and
a Llama causal LM of the same width/depth trained on next-token prediction, and (``bdllm``) the same Llama trained
as a block-diffusion LM (BD3-LM / SDAR's two-stream objective: the noisy sequence x_t next to the clean x_0, x_t
attending to its own block of x_t and to earlier blocks of x_0, x_0 block-causal; loss on masked x_t positions
weighted 1/t, one noise level per sample, stratified over the batch; blocks of 4, 8 and 16 in turn so one model
serves all three; its config's block_diffusion_length(s) tell edgekit's export); one character-level tokenizer. With
``--init ar`` the block model starts from the trained AR model and keeps its token shift (Fast-dLLM v2 / SDAR adapt
AR checkpoints this way; config block_diffusion_token_shift): token i is predicted at position i - 1, a block's first
token from the clean previous block's last position. Measured here: from scratch, 2,500 steps learned the copies but
not the pair sums (1%); adapted from the AR model it keeps left-to-right dependencies (b given a: 100%) but in 2,000
steps did not learn right-to-left ones inside a block (a given b: chance), so it decodes correctly with a positional
prior (``position_decay``) that commits the earlier of two uncertain positions first. For
--prompt-isolated the dLLM is trained with prompt-isolated attention (prompt positions do not attend to the answer;
config.attention_prompt_isolated), which makes the prompt's KV cache exact. Measured here: the bidirectional dLLM
(3000 steps, ~31 min on 2 busy cores) decodes pairs_copy at 99-100% but routes the pair constraint through the
prompt positions, so
Fast-dLLM's approximate caches (stale prompt keys/values) drop it to 0%; the prompt-isolated one learned the copies
but not the pairs in 4000 steps (2.5%).

    python benchmarks/train_dllm.py --steps 3000 --only dllm; python benchmarks/train_dllm.py --steps 600 --only ar
    python benchmarks/train_dllm.py --only bdllm --init ar --steps 600 --lr 5e-4   # then --resume for more
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(".cache/dllm")
TASKS = {"pairs": {"pairs": 6, "copy": 0, "gen_length": 16},  # 12 digits + EOS padding
         "pairs_copy": {"pairs": 4, "copy": 8, "gen_length": 48},  # 4 x (2 + 8) = 40 digits + EOS padding
         "shuffle": {"pairs": 0, "copy": 0, "digits": 8, "gen_length": 12}}  # any order of the 8 digits + EOS
DEFAULT_TASK = "pairs_copy"
VOCAB = ["[PAD]", "[MASK]", "[EOS]", *"0123456789", ",", "=", "|"]


def folder(task: str, kind: str) -> Path:
    return CACHE / task / kind


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[PAD]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\[MASK\]|\[EOS\]|\[PAD\]|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", mask_token="[MASK]", eos_token="[EOS]")


def sample(rng: np.random.Generator, n: int, task: str = DEFAULT_TASK) -> tuple[list[str], list[str]]:
    """n (prompt, answer) pairs of strings; the answer excludes EOS padding."""
    k, copy = TASKS[task]["pairs"], TASKS[task]["copy"]
    prompts, answers = [], []
    if task == "shuffle":  # the 8 digits in any order: every answer token depends on all the others
        for _ in range(n):
            digits = "".join(map(str, rng.integers(0, 10, TASKS[task]["digits"])))
            prompts.append(digits + "=")
            answers.append("".join(rng.permutation(list(digits))))
        return prompts, answers
    for _ in range(n):
        sums = rng.integers(0, 19, k)
        text = "".join(map(str, rng.integers(0, 10, k * copy)))
        answer = ""
        for i, s in enumerate(sums):
            a = int(rng.integers(max(0, s - 9), min(9, s) + 1))
            answer += f"{a}{int(s) - a}" + text[i * copy:(i + 1) * copy]
        if copy:  # segments of sum + digits, so every answer token sits at a fixed offset from its source
            prompts.append("".join(f"{s:02d}" + text[i * copy:(i + 1) * copy] for i, s in enumerate(sums)) + "=")
        else:
            prompts.append(",".join(f"{s:02d}" for s in sums) + "=")
        answers.append(answer)
    return prompts, answers


def correct(prompt: str, answer: str) -> bool:
    """Every pair of digits adds up to its sum and every copied run matches the prompt's string (characters after
    the last segment are ignored)."""
    body = prompt.rstrip("=")
    if len(body) == TASKS["shuffle"]["digits"]:  # valid: a permutation of the prompt's digits (not a unique answer)
        return sorted(answer[: len(body)]) == sorted(body)
    if "," in body or len(body) == 2:
        sums, text, copy = [int(x) for x in body.split(",")], "", 0
    else:
        task = next(t for t in TASKS.values() if t["copy"] and len(body) == t["pairs"] * (2 + t["copy"]))
        copy = task["copy"]
        segs = [body[i:i + 2 + copy] for i in range(0, len(body), 2 + copy)]
        sums, text = [int(x[:2]) for x in segs], "".join(x[2:] for x in segs)
    seg = 2 + copy
    if len(answer) < seg * len(sums) or not answer[: seg * len(sums)].isdigit():
        return False
    for i, s in enumerate(sums):
        part = answer[i * seg:(i + 1) * seg]
        if int(part[0]) + int(part[1]) != s or part[2:] != text[i * copy:(i + 1) * copy]:
            return False
    return True


def encode(tok, prompts: list[str], answers: list[str], gen_length: int):
    import torch

    eos = tok.eos_token_id
    rows = []
    for p, a in zip(prompts, answers):
        ids = tok(p + a, add_special_tokens=False)["input_ids"]
        rows.append(ids + [eos] * (len(tok(p)["input_ids"]) + gen_length - len(ids)))
    return torch.tensor(rows)


def block_attention(n: int, block: int):
    """The two-stream training mask (BD3-LM / SDAR) for a sequence of ``n``: queries and keys are [x_t ; x_0];
    x_t attends to x_t of its own block and x_0 of earlier blocks, x_0 attends block-causally to x_0. As an additive
    [1, 1, 2n, 2n] float mask."""
    import torch

    blk = torch.arange(n) // block
    same, earlier = blk[:, None] == blk[None, :], blk[None, :] < blk[:, None]
    causal = blk[None, :] <= blk[:, None]
    allowed = torch.cat([torch.cat([same, earlier], 1), torch.cat([torch.zeros_like(same), causal], 1)], 0)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def shifted_sources(n: int, block: int):
    """With the AR token shift (Fast-dLLM v2): the index, in the two-stream logits [x_t ; x_0] of length 2n, of the
    logit that predicts token i: x_t's position i - 1 inside a block, and for a block's first token the clean
    stream's position i - 1 (the committed previous block's last logit, as the runtime has it)."""
    import torch

    i = torch.arange(n)
    return torch.where(i % block == 0, n + i - 1, i - 1).clamp(min=0)


def train(kind: str, steps: int, batch: int, seed: int, log_every: int, task: str = DEFAULT_TASK,
          resume: bool = False, prompt_isolated: bool = False, blocks: tuple[int, ...] = (4, 8, 16),
          init: str | None = None, lr: float = 2e-3) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = make_tokenizer()
    common = dict(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    name = kind
    if init and kind == "bdllm":  # adapt a trained AR model (Fast-dLLM v2 / SDAR start from AR checkpoints):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder(task, init))  # it keeps the token shift
        cfg = model.config
        cfg.block_diffusion_length, cfg.block_diffusion_lengths = blocks[0], list(blocks)
        cfg.block_diffusion_token_shift = True
    elif resume and (folder(task, name) / "config.json").exists():  # continue the saved model (new LR schedule)
        model = (transformers.AutoModelForMaskedLM if kind == "dllm" else transformers.AutoModelForCausalLM
                 ).from_pretrained(folder(task, name))
        cfg = model.config
    elif kind == "dllm":
        cfg = transformers.ModernBertConfig(**common, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                            cls_token_id=tok.eos_token_id, sep_token_id=tok.eos_token_id,
                                            global_attn_every_n_layers=1, local_attention=64)
        model = transformers.ModernBertForMaskedLM(cfg)
    else:  # the AR model, and the block-diffusion one: the same Llama, the latter flagged with its block length
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=4, bos_token_id=tok.eos_token_id,
                                       eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
        if kind == "bdllm":  # edgekit's export builds block-causal attention from these (the first is the default)
            cfg.block_diffusion_length, cfg.block_diffusion_lengths = blocks[0], list(blocks)
        model = transformers.LlamaForCausalLM(cfg)
    cfg.architectures = [type(model).__name__]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen_length = TASKS[task]["gen_length"]
    isolate = kind == "dllm" and prompt_isolated
    if isolate:
        from edgekit.export.diffusion import PromptIsolation

        cfg.attention_prompt_isolated = True  # tells edgekit's export to run (and cache) it that way
    p_len = len(tok(sample(rng, 1, task)[0][0])["input_ids"])
    n_total = p_len + gen_length
    two_stream = {b: block_attention(n_total, b) for b in blocks} if kind == "bdllm" else {}
    shift = bool(getattr(cfg, "block_diffusion_token_shift", False))
    sources = {b: shifted_sources(n_total, b) for b in blocks}
    positions = torch.arange(n_total).repeat(2)[None].expand(batch, -1)
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        x = encode(tok, *sample(rng, batch, task), gen_length)  # [B, P + G]
        if kind == "bdllm":  # x_t (answer tokens masked with probability t) next to the clean x_0, one noise level
            # per sample (stratified over the batch); loss on the masked x_t positions, weighted 1/t
            t = ((torch.arange(batch) + torch.rand(1)) / batch)[torch.randperm(batch), None].clamp(min=1e-3)
            masked = torch.rand(batch, gen_length) < t
            masked[masked.sum(1) == 0, 0] = True
            xt = x.clone()
            xt[:, p_len:][masked] = tok.mask_token_id
            block = blocks[step % len(blocks)]  # each block length in turn: one model serves them all
            logits = model(input_ids=torch.cat([xt, x], 1), attention_mask=two_stream[block].expand(
                batch, -1, -1, -1), position_ids=positions).logits
            logits = logits[:, sources[block]] if shift else logits[:, :n_total]
            labels = torch.full_like(x, -100)
            labels[:, p_len:][masked] = x[:, p_len:][masked]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            loss = (ce.sum(1, keepdim=True) / t).mean() / gen_length
        elif kind == "dllm":
            t = torch.rand(batch, 1).clamp(min=1e-3)
            masked = torch.rand(batch, gen_length) < t
            masked[masked.sum(1) == 0, 0] = True
            inp = x.clone()
            inp[:, p_len:][masked] = tok.mask_token_id
            labels = torch.full_like(x, -100)
            labels[:, p_len:][masked] = x[:, p_len:][masked]
            if isolate:  # the prompt does not attend to the answer: its keys/values never change (exact cache)
                with PromptIsolation(model, p_len) as m:
                    logits = m(input_ids=inp, attention_mask=torch.ones_like(inp)).logits
            else:
                logits = model(input_ids=inp, attention_mask=torch.ones_like(inp)).logits
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [B, S]
            loss = (ce.sum(1, keepdim=True) / t).mean() / gen_length
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
    out = folder(task, name)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    before = json.loads((out / "task.json").read_text()) if resume and (out / "task.json").exists() else {}
    (out / "task.json").write_text(json.dumps({
        "task": task, **TASKS[task], "steps": before.get("steps", 0) + steps, "batch": batch,
        "seed": seed, "runs": before.get("runs", 0) + 1, "init": init or before.get("init"),
        "train_seconds": round(before.get("train_seconds", 0) + time.time() - start, 1)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["dllm", "ar", "bdllm"], default=None)
    ap.add_argument("--blocks", default="4,8,16", help="bdllm: the block lengths it is trained for (the first is "
                    "its default)")
    ap.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK)
    ap.add_argument("--init", choices=["ar"], default=None, help="bdllm: start from the trained AR model (with its "
                    "token shift) instead of random weights")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--resume", action="store_true", help="continue training the saved model")
    ap.add_argument("--prompt-isolated", action="store_true", help="dLLM: the prompt does not attend to the answer")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    for kind in ("dllm", "ar", "bdllm"):
        if args.only in (None, kind):
            out = train(kind, args.steps, args.batch, args.seed, max(1, args.steps // 20), args.task, args.resume,
                        args.prompt_isolated, tuple(int(b) for b in args.blocks.split(",")), args.init, args.lr)
            print(f"trained {kind} -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
