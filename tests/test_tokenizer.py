"""Tokenizer and streaming detokenizer: complete UTF-8 only (Chinese, emoji), chat template equal to transformers'."""

from __future__ import annotations

import pytest

from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.tokenizer import StreamingDetokenizer

TEXTS = [
    "长城是中国古代的军事防御工程。你好，世界！",
    "Summer emoji: 🌞🌊🍉😀 and ❤️ 👍🏽 — café",
    "mixed 中文 and emoji 🍉 in one line\nwith a newline",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_yields_only_complete_utf8(llama_bundle, text):
    tok = load(llama_bundle).tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode("utf-8")) / 4  # multi-byte characters really span several tokens
    detok = StreamingDetokenizer(tok)
    pieces = [detok.put(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert sum(1 for p in pieces if p == "") > 0  # some tokens ended mid-character and were held back


def test_byte_split_emoji_is_held_until_complete(llama_bundle):
    tok = load(llama_bundle).tokenizer
    emoji = "😀"
    ids = tok.encode(emoji, add_special_tokens=False)
    assert len(ids) >= 2
    detok = StreamingDetokenizer(tok)
    assert [detok.put(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.put(ids[-1]) == emoji


def test_special_tokens_are_not_streamed(llama_bundle):
    model = load(llama_bundle)
    end = model.tokenizer.token_to_id("<|im_end|>")
    detok = StreamingDetokenizer(model.tokenizer)
    assert detok.put(end) == "" and detok.flush() == ""


def test_chat_template_matches_transformers(llama_bundle, tiny_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model(), local_files_only=True)
    ours = load(llama_bundle).tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 🌞"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again?"}]
    assert ours.render_chat(msgs) == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ours.encode_prompt(msgs) == list(ids)
    assert ours.encode_prompt("plain text 中文") == hf("plain text 中文")["input_ids"]


@pytest.mark.parametrize("bad", [[], [{"role": "user"}], [{"role": 1, "content": "x"}], "", 42])
def test_bad_prompts(llama_bundle, bad):
    with pytest.raises(ConfigError):
        load(llama_bundle).tokenizer.encode_prompt(bad)
