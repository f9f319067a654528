"""Tool calls for the OpenAI API: checking ``tools`` / ``tool_choice``, the grammar a forced call is decoded under,
and reading the calls back out of the answer (whole, or as it streams).

The model writes calls in the Hermes / Qwen2.5 markup, one per ``<tool_call>`` block holding
``{"name": ..., "arguments": {...}}`` (the bundle's chat template teaches it; templates without tool support get the
generic rendering of ``runtimes.tokenizer.tool_messages``). Under ``tool_choice`` ``required`` or a named function
the answer is constrained to such blocks whose ``arguments`` match the function's ``parameters`` schema, so they
always parse and validate; under ``auto`` the model decides, and what it writes is parsed (a malformed block stays
text).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgekit.runtimes.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128
# the separators the model was shown (json.dumps' defaults, as templates write calls)
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolError(ValueError):
    """A malformed ``tools`` / ``tool_choice``; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """``tools`` as OpenAI defines them: [{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}], names unique; a ToolError naming the bad field."""
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' must be a non-empty list of at most {MAX_TOOLS} tools.", "tools")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f"{where} must be {{'type': 'function', 'function': {{...}}}}, got {_short(tool)}.", where)
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}.",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}.function.name {name!r} is given twice.", f"{where}.function.name")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must be a JSON schema of type 'object', got "
                            f"{_short(params)}.", f"{where}.function.parameters")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolError(f"{where}.function.description must be a string.", f"{where}.function.description")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def check_choice(choice: Any, tools: list[dict[str, Any]] | None) -> str | None:
    """``tool_choice`` as a mode: "none", "auto", "required" or a function's name (None: no tools)."""
    if choice is None:
        return "auto" if tools else None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError(f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                            f"{{'name': ...}}}}, got {choice!r}.", "tool_choice")
        if choice == "none":
            return "none"
        if not tools:
            raise ToolError(f"'tool_choice' {choice!r} needs 'tools'.", "tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolError(f"'tool_choice' must name a function as {{'type': 'function', 'function': {{'name': ...}}}}, "
                        f"got {_short(choice)}.", "tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    if name not in names:
        raise ToolError(f"'tool_choice' names the function {name!r}, which is not in 'tools' "
                        f"({', '.join(names) or 'none given'}).", "tool_choice.function.name")
    return name


def call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of ``tool``: its name, and arguments that match its parameters."""
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def markers(vocab: Any) -> tuple[str, str]:
    """``<tool_call>`` and ``</tool_call>`` as Lark terms for this vocabulary: the special token where the model has
    one (Qwen2.5's, what it was trained to write), the text otherwise."""
    def term(text: str) -> str:
        token = vocab.special_token(text) if vocab is not None else None
        return f"<[{token}]>" if token is not None else json.dumps(text)

    return term(TOOL_CALL_OPEN), term(TOOL_CALL_CLOSE)


def call_grammar(tools: list[dict[str, Any]], mode: str, parallel: bool,
                 marks: tuple[str, str] = (json.dumps(TOOL_CALL_OPEN), json.dumps(TOOL_CALL_CLOSE))) -> str:
    """The Lark grammar of the answer under ``required`` (any of the tools) or a named function: one ``<tool_call>``
    block, or several one per line when ``parallel``; ``marks``: the block's opening and closing terms
    (``markers``)."""
    chosen = tools if mode == "required" else [t for t in tools if t["function"]["name"] == mode]
    schemas = [call_schema(t) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = json.dumps({**schema, "x-guidance": _CALL_JSON})
    start = 'start: call ("\\n" call)*' if parallel and mode == "required" else "start: call"
    return f'{start}\ncall: {marks[0]} "\\n" args "\\n" {marks[1]}\nargs: %json {body}\n'


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def wire(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)


def _read_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _bare_call(text: str, names: Sequence[str]) -> ToolCall | None:
    """An answer that is nothing but one call's JSON, of a known function (small models often drop the tags)."""
    call = _read_call(text.strip()) if text.strip().startswith("{") else None
    return call if call is not None and call.name in names else None


def parse_calls(text: str, names: Sequence[str] = ()) -> tuple[str | None, list[ToolCall]]:
    """The answer's content (None when only calls remain) and its well-formed tool calls; an unterminated last
    block (the answer hit max_tokens) is parsed if its JSON is complete; an answer that is only a call's JSON of one
    of the functions ``names`` is that call."""
    bare = _bare_call(text, names)
    if bare is not None:
        return None, [bare]
    calls: list[ToolCall] = []
    rest: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = _read_call(m.group(1))
        if call is None:
            continue
        rest.append(text[pos:m.start()])
        calls.append(call)
        pos = m.end()
    tail = text[pos:]
    at = tail.find(TOOL_CALL_OPEN)
    if at >= 0:
        call = _read_call(tail[at + len(TOOL_CALL_OPEN):].strip())
        if call is not None:
            calls.append(call)
            tail = tail[:at]
    rest.append(tail)
    content = "".join(rest).strip()
    return (content or None) if calls else text, calls


class CallStream:
    """Reads a streamed answer: ``feed(text)`` yields ("content", text) for text outside tool calls (held back while
    it could be the start of ``<tool_call>``) and ("call", ToolCall) for each block as it closes; ``close()`` flushes
    the rest (an unclosed block whose JSON is complete is still a call). An answer that opens with ``{`` is held
    until it ends: it may be a bare call of one of ``names``."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = list(names)
        self.buf = ""
        self.inside = False
        self.calls: list[ToolCall] = []
        self.started = False  # any non-blank text seen
        self.bare = False  # the answer opened with '{': held whole

    def feed(self, text: str) -> Iterator[tuple[str, Any]]:
        self.buf += text
        if not self.started and self.buf.strip():
            self.started, self.bare = True, self.buf.lstrip().startswith("{") and bool(self.names)
        if self.bare or not self.started:
            return
        while True:
            if not self.inside:
                at = self.buf.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buf, TOOL_CALL_OPEN)
                    out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                    if out:
                        yield "content", out
                    return
                if at:
                    yield "content", self.buf[:at]
                self.buf, self.inside = self.buf[at + len(TOOL_CALL_OPEN):], True
            end = self.buf.find(TOOL_CALL_CLOSE)
            if end < 0:
                return
            call = _read_call(self.buf[:end].strip())
            body = self.buf[:end]
            self.buf, self.inside = self.buf[end + len(TOOL_CALL_CLOSE):], False
            if call is None:
                yield "content", TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
            else:
                self.calls.append(call)
                yield "call", call

    def close(self) -> Iterator[tuple[str, Any]]:
        if self.bare:
            call = _bare_call(self.buf, self.names)
            self.bare = False
            if call is not None:
                self.calls.append(call)
                self.buf = ""
                yield "call", call
                return
            yield from self.feed("")
        if self.inside:
            call = _read_call(self.buf.strip())
            if call is not None:
                self.calls.append(call)
                yield "call", call
            else:
                yield "content", TOOL_CALL_OPEN + self.buf
        elif self.buf:
            yield "content", self.buf
        self.buf, self.inside = "", False


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def streamed_call_chunks(call: ToolCall, index: int) -> Sequence[dict[str, Any]]:
    """A closed call as OpenAI streams one: a first delta with the id, type, name and empty arguments, then the
    arguments."""
    return ({"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
            {"index": index, "function": {"arguments": call.arguments}})


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
