"""Tokenizer (Hugging Face ``tokenizers`` JSON), chat-template rendering, and a streaming detokenizer.

The streaming detokenizer only ever returns complete UTF-8 text: a token that ends inside a multi-byte character
(common for CJK and emoji under byte-level BPE) is held back until the character is complete.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Union

from tokenizers import Tokenizer as _HFTokenizer

from edgekit.runtimes.bundle import TokenizerSpec
from edgekit.runtimes.errors import BundleError, ConfigError

Message = Mapping[str, Any]
Prompt = Union[str, Sequence[Message]]  # noqa: UP007 (a runtime alias; | needs 3.10+ objects)


class Tokenizer:
    """Encode/decode plus prompt building from a bundle's tokenizer spec."""

    def __init__(self, path: Path, spec: TokenizerSpec) -> None:
        try:
            self._tk = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust tokenizer raises a bare Exception on a bad file
            raise BundleError(f"Cannot read tokenizer '{path}': {e}. HINT: re-export the bundle.") from None
        self.spec = spec
        self._template = None
        if spec.chat_template:
            self._template = _compile_template(spec.chat_template)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ConfigError(
                "This bundle has no chat template, so it cannot take a list of messages. HINT: pass a plain prompt."
            )
        _check_messages(messages)
        specials = {k: v for k, v in self.spec.special_token_strings.items() if v is not None}
        return _render(self._template, messages=[dict(m) for m in messages],
                       add_generation_prompt=add_generation_prompt, **specials)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for a plain prompt string, or for a chat (list of {role, content}) through the template."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_special_tokens=self.spec.add_special_tokens)
        elif isinstance(prompt, Sequence):
            # like transformers' apply_chat_template: the template writes the special tokens itself
            ids = self.encode(self.render_chat(prompt), add_special_tokens=False)
        else:
            raise ConfigError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}.")
        if not ids:
            raise ConfigError("The prompt is empty after tokenization. HINT: pass some text.")
        return ids


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ConfigError("messages is empty. HINT: pass at least one {'role': 'user', 'content': '...'}.")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(
                f"messages[{i}] must be a mapping with string 'role' and 'content', got {m!r}."
            )


def _compile_template(source: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"The chat template rejected the messages: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise BundleError(f"The bundle's chat template does not compile: {e}. HINT: re-export the bundle.") from None


TEMPLATE_BUDGET = 2_000_000  # template lines a chat rendering may execute (real templates: a few thousand)


class _OverBudget(Exception):
    pass


def _render(template: Any, **context: Any) -> str:
    """Render a sandboxed chat template with a bound on its work; its refusals become ConfigErrors."""
    import jinja2

    left = [TEMPLATE_BUDGET]

    def count(frame: Any, event: str, arg: Any) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise _OverBudget
        return count

    def tracer(frame: Any, event: str, arg: Any) -> Any:  # only the template's own compiled code is counted
        return count if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        text = template.render(**context)
    except _OverBudget:
        raise ConfigError(f"The bundle's chat template did more than {TEMPLATE_BUDGET:,} steps of work rendering "
                          "these messages and was stopped. HINT: the template may be hostile; re-export the bundle "
                          "with a known template.") from None
    except ConfigError:
        raise
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"The bundle's chat template (tokenizer.chat_template) could not render these messages "
                          f"({type(e).__name__}: {str(e)[:200]}). HINT: a bundle from a stranger may be hostile; "
                          "re-export it with the model's own template.") from None
    finally:
        sys.settrace(previous)
    if len(text) > MAX_PROMPT_CHARS:
        raise ConfigError(f"The chat template rendered {len(text):,} characters, above {MAX_PROMPT_CHARS:,}.")
    return text


MAX_PROMPT_CHARS = 16 << 20


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that are always complete UTF-8.

    Decodes a small sliding window (from the last emitted boundary) rather than the whole text each time, and
    holds back a piece that ends in U+FFFD, the mark of an unfinished multi-byte character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index have been emitted

    def put(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation), dropping incomplete bytes."""
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :].rstrip("\ufffd")


class StopStrings:
    """Holds back text that could be the start of a stop string; reports where a stop string matched."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
