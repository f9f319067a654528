"""Tokenizer (Hugging Face ``tokenizers`` JSON), chat-template rendering, and a streaming detokenizer.

The streaming detokenizer only ever returns complete UTF-8 text: a token that ends inside a multi-byte character
(common for CJK and emoji under byte-level BPE) is held back until the character is complete.
"""

from __future__ import annotations

import json
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

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders a ``tools`` list itself (Qwen2.5's does; SmolLM2's does not: tools then
        get the generic rendering of ``tool_messages``)."""
        return bool(self.spec.chat_template) and "tools" in (self.spec.chat_template or "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The chat through the bundle's template. ``tools``: OpenAI-style tool definitions; messages may then hold
        assistant ``tool_calls`` and ``tool`` results. A template that does not render tools gets them the generic
        way (``tool_messages``)."""
        if self._template is None:
            raise ConfigError(
                "This bundle has no chat template, so it cannot take a list of messages. HINT: pass a plain prompt."
            )
        messages = [dict(m) for m in messages]
        if not self.renders_tools and (tools or any(_has_tool_parts(m) for m in messages)):
            messages, tools = tool_messages(messages, tools or ()), None
        _check_messages(messages)
        specials = {k: v for k, v in self.spec.special_token_strings.items() if v is not None}
        extra = {"tools": [dict(t) for t in tools]} if tools else {}
        return _render(self._template, messages=[_template_message(m) for m in messages],
                       add_generation_prompt=add_generation_prompt, **extra, **specials)

    def encode_prompt(self, prompt: Prompt, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids for a plain prompt string, or for a chat (list of {role, content}) through the template (with
        ``tools``, OpenAI-style tool definitions, for a chat)."""
        if isinstance(prompt, str):
            if tools:
                raise ConfigError("tools need a chat (a list of messages), not a plain prompt.")
            ids = self.encode(prompt, add_special_tokens=self.spec.add_special_tokens)
        elif isinstance(prompt, Sequence):
            # like transformers' apply_chat_template: the template writes the special tokens itself
            ids = self.encode(self.render_chat(prompt, tools=tools), add_special_tokens=False)
        else:
            raise ConfigError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}.")
        if not ids:
            raise ConfigError("The prompt is empty after tokenization. HINT: pass some text.")
        return ids


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # Hermes / Qwen2.5's tool-call markup
_GENERIC_TOOLS = (
    "You may call functions to answer. The functions, as JSON schemas:\n{tools}\n"
    "To call one, answer with one line per call, each exactly\n"
    + TOOL_CALL_OPEN + '\n{{"name": <function name>, "arguments": <arguments object>}}\n' + TOOL_CALL_CLOSE
    + "\nand nothing else.")


def _has_tool_parts(m: Mapping[str, Any]) -> bool:
    return m.get("role") == "tool" or bool(m.get("tool_calls"))


def _arguments(args: Any) -> Any:
    """A call's arguments as an object (OpenAI sends them as JSON text; text that is not JSON stays text)."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            pass
    return args


def _call_text(call: Mapping[str, Any]) -> str:
    fn = call.get("function", call)
    body = {"name": fn.get("name"), "arguments": _arguments(fn.get("arguments", {}))}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The generic rendering of tools for a template that has none: the tool list and the call format in the system
    message, assistant calls as ``<tool_call>`` lines, tool results as user turns in ``<tool_response>`` tags (the
    Hermes format Qwen2.5 and many fine-tunes were trained on)."""
    out: list[dict[str, Any]] = []
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        head = _GENERIC_TOOLS.format(tools=listing)
        if messages and messages[0].get("role") == "system":
            out.append({"role": "system", "content": f"{messages[0].get('content') or ''}\n\n{head}".strip()})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": head})
    for m in messages:
        if m.get("role") == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{m.get('content') or ''}\n{calls}".strip()})
        else:
            out.append(dict(m))
    return out


def _template_message(m: Mapping[str, Any]) -> dict[str, Any]:
    """A message as chat templates expect it: tool-call arguments as objects (OpenAI sends them as JSON text)."""
    out = dict(m)
    if m.get("tool_calls"):
        calls = []
        for call in m["tool_calls"]:
            fn = dict(call.get("function") or {})
            if "arguments" in fn:
                fn["arguments"] = _arguments(fn["arguments"])
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    if out.get("content") is None:
        out["content"] = ""
    return out


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ConfigError("messages is empty. HINT: pass at least one {'role': 'user', 'content': '...'}.")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        if content is None and isinstance(m, Mapping) and (m.get("tool_calls") or m.get("role") == "tool"):
            continue
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(content, str):
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
    env.filters["tojson"] = _tojson  # (transformers' version: plain JSON, not jinja's HTML-escaped one)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise BundleError(f"The bundle's chat template does not compile: {e}. HINT: re-export the bundle.") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


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
