"""The built-in prompt set shared by parity and quality reports."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.tokenizer import Prompt

# The built-in prompt set: plain text and chat, English, Chinese, emoji, code, a multi-turn conversation.
PROMPTS: tuple[tuple[str, Prompt], ...] = (
    ("sky", [{"role": "user", "content": "Why is the sky blue?"}]),
    ("plain", "The capital of France is"),
    ("chinese", [{"role": "user", "content": "请用一句话介绍一下长城。"}]),
    ("emoji", [{"role": "user", "content": "Reply with three emoji that describe summer 🌞"}]),
    ("code", [{"role": "user", "content": "Write a Python function that reverses a string."}]),
    ("math", [{"role": "user", "content": "What is 17 times 23? Think step by step."}]),
    ("multi_turn", [
        {"role": "user", "content": "My name is Ada and I like tea."},
        {"role": "assistant", "content": "Nice to meet you, Ada! Tea is lovely."},
        {"role": "user", "content": "What is my name, and what do I like?"},
    ]),
    ("system", [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Explain what a KV cache is in a transformer."},
    ]),
    ("story", "Once upon a time, in a small village by the sea,"),
)


def read_user_text(path: str | None, default: str, what: str, min_words: int = 10) -> str:
    """A user's UTF-8 text file (calibration or evaluation text), or ``default`` when no path is given."""
    if path is None:
        return default
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read the {what} '{path}': {e}. HINT: pass a UTF-8 text file.") from None
    if len(text.split()) < min_words:
        raise ConfigError(f"The {what} '{path}' is too short ({len(text.split())} words); give it a paragraph.")
    return text


def reference_ids(hf_tokenizer: Any, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt through transformers' tokenizer (chat template for message lists)."""
    if isinstance(prompt, str):
        return list(hf_tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    out = hf_tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def prompt_ids(hf_tokenizer: Any, has_template: bool = True) -> list[list[int]]:
    """Ids of every built-in prompt (chats flattened to text for tokenizers without a chat template)."""
    out = []
    for _, prompt in PROMPTS:
        if not isinstance(prompt, str) and not has_template:
            prompt = "\n".join(m["content"] for m in prompt)
        out.append(reference_ids(hf_tokenizer, prompt))
    return out
