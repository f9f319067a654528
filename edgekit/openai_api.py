"""OpenAI wire format: validate chat/completions request bodies, build responses, stream chunks and error bodies.

Accepted fields: model, messages | prompt, stream, stream_options.include_usage, max_tokens | max_completion_tokens,
n (1-8), logprobs / top_logprobs, response_format (text, json_object, json_schema), tools / tool_choice /
parallel_tool_calls (chat), the output-constraint extensions (``CONSTRAINT_FIELDS``: regex, grammar (Lark or
llama.cpp's GBNF), json_schema (llama.cpp's name), vLLM's guided_json / guided_regex / guided_grammar /
guided_choice) and the generation fields in ``FIELDS`` that the served model takes (its ``option_names``: AR bundles
take temperature, top_p, top_k, seed, stop, repetition_penalty, presence_penalty, frequency_penalty, logit_bias and
the constraints; diffusion bundles temperature, top_p, top_k, seed, gen_length (default: max_tokens), block_length,
diffusion_steps, remasking, threshold, entropy_bound, position_decay, cache). A field the model does not take is
refused with 400, never silently ignored (non-zero penalties, a non-empty logit_bias, logprobs or a constraint on a
diffusion bundle too), and so are functions / function_call, best_of, echo, suffix, min_p. Other fields (user,
metadata, ...) are ignored. Here only types and shapes are checked; the model's ``params`` checks ranges (one set of
bounds) and the server compiles constraints, and their errors become 400s naming the field. Unset fields take the
bundle's generation defaults (greedy for SmolLM2), not OpenAI's temperature 1.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from edgekit.tools import ToolError, check_choice, check_tools

Endpoint = Literal["chat", "completions"]
FieldType = Literal["number", "integer", "string"]
# fields that would change the answer and are not implemented, with the values that mean "off" (accepted)
PACE_RANGE = (1.0, 1000.0)  # stream_options.pace_tokens_per_s bounds
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": ([],), "function_call": ("none",), "best_of": (1,), "echo": (False,), "suffix": ("",),
    "min_p": (0, 0.0),
}
MAX_N = 8
TOP_LOGPROBS_MAX = {"chat": 20, "completions": 5}  # OpenAI's bounds (the legacy completions API allows 5)
# extension fields naming an output constraint -> the model option they set (llama.cpp's and vLLM's names)
CONSTRAINT_FIELDS = {"regex": "regex", "grammar": "grammar", "json_schema": "json_schema", "guided_json": "json_schema",
                     "guided_regex": "regex", "guided_grammar": "grammar", "guided_choice": "regex"}
# request field -> its type; the option of the same name goes to the model's params()
FIELDS: dict[str, FieldType] = {
    "temperature": "number", "top_p": "number", "top_k": "integer", "seed": "integer",
    "repetition_penalty": "number", "gen_length": "integer", "block_length": "integer",
    "diffusion_steps": "integer", "remasking": "string", "threshold": "number", "entropy_bound": "number",
    "position_decay": "number", "cache": "string", "speculate": "string",
}


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    endpoint: Endpoint
    model: str
    prompt: Any  # a string (completions) or a list of {role, content} (chat)
    stream: bool
    include_usage: bool
    options: dict[str, Any]  # max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty, ...
    pace_tokens_per_s: float | None = None  # stream_options.pace_tokens_per_s: a steady cadence; None: as made
    n: int = 1
    logprobs: bool = False  # answer with log-probabilities (options["logprobs"]: how many alternatives)
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt (not under tool_choice "none")
    tool_mode: str | None = None  # "auto", "required" or a function name: parse calls out of the answer
    constraint_param: str | None = None  # the field the output constraint came from (names it in errors)
    parallel_tool_calls: bool = True
    return_token_ids: bool = False  # vLLM's extension: each choice's generated token ids, the prompt's

    @property
    def forces_call(self) -> bool:
        """tool_choice "required" or a named function: the answer is decoded under the calls' grammar."""
        return self.tool_mode not in (None, "auto")


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _typed(body: dict[str, Any], key: str, want: FieldType) -> Any:
    v = body.get(key)
    if v is None:
        return None
    ok = {"number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "integer": isinstance(v, int) and not isinstance(v, bool),
          "string": isinstance(v, str)}[want]
    if not ok:
        raise _bad(f"'{key}' must be a{'n' if want == 'integer' else ''} {want}, got {v!r}.", key, "invalid_type")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}; got {part!r}.",
                           f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}.",
               f"messages[{i}].content", "invalid_type")


def parse(body: Any, endpoint: Endpoint, served_model: str, option_names: frozenset[str], max_tokens_cap: int,
          model_kind: str = "") -> GenerationRequest:
    """Validate a request body's shape; raise APIError(400) naming the field, the value and what is allowed."""
    if not isinstance(body, dict):
        raise _bad(f"The request body must be a JSON object, got {type(body).__name__}.", None, "invalid_type")
    model = body.get("model", served_model)
    if model != served_model:
        raise APIError(400, f"The model '{model}' does not exist here. This server serves '{served_model}'.",
                       "model", "model_not_found")
    prompt = _messages(body) if endpoint == "chat" else _prompt(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {stream!r}.", "stream", "invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
    include_usage = bool(stream_options.get("include_usage", False))
    pace = stream_options.get("pace_tokens_per_s")
    if pace is not None:
        if not stream:
            raise _bad("'stream_options.pace_tokens_per_s' paces a stream; it needs \"stream\": true.",
                       "stream_options.pace_tokens_per_s")
        if not (isinstance(pace, (int, float)) and not isinstance(pace, bool) and math.isfinite(pace)
                and PACE_RANGE[0] <= pace <= PACE_RANGE[1]):
            raise _bad(f"'stream_options.pace_tokens_per_s' must be a number in [{PACE_RANGE[0]:g}, "
                       f"{PACE_RANGE[1]:g}] (tokens per second), got {_short(pace)}.",
                       "stream_options.pace_tokens_per_s")

    n = _typed(body, "n", "integer")
    if n is not None and not 1 <= n <= MAX_N:
        raise _bad(f"'n' must be between 1 and {MAX_N}, got {n}.", "n")
    for key, off in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and not any(value == o and type(value) is type(o) for o in off):
            raise _bad(f"'{key}' is not supported by this server (it would change the answer), got {_short(value)}.",
                       key, "unsupported_parameter")
    options: dict[str, Any] = {key: _typed(body, key, kind) for key, kind in FIELDS.items()}
    constraint, constraint_param = _constraint(body)
    logprobs = _logprobs(body, endpoint)
    tools, tool_mode = (_tools(body) if endpoint == "chat" else (None, None))
    if endpoint != "chat" and (body.get("tools") or body.get("tool_choice") not in (None, "none")):
        raise _bad("'tools' are for /v1/chat/completions.", "tools", "unsupported_parameter")
    if tool_mode not in (None, "none", "auto"):
        if constraint:
            raise _bad(f"'tool_choice' {tool_mode!r} constrains the answer to a tool call; it cannot be combined "
                       f"with '{constraint_param}'.", "tool_choice")
        if "grammar" not in option_names:
            raise _bad(f"'tool_choice' {tool_mode!r} constrains the answer, which a {model_kind or 'model'} bundle "
                       "cannot do (use 'auto').", "tool_choice", "unsupported_parameter")
        constraint_param = "tools"  # (the call's grammar is built for the model's vocabulary: serve._Job)
    options.update(constraint)
    if logprobs is not None:
        options["logprobs"] = logprobs
    for key in ("presence_penalty", "frequency_penalty"):  # (0: off, accepted by every model kind)
        options[key] = value if (value := _typed(body, key, "number")) not in (0, 0.0) else None
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise _bad(f"'logit_bias' must be an object of token id -> bias in [-100, 100], got {_short(bias)}.",
                   "logit_bias", "invalid_type")
    options["logit_bias"] = bias or None
    max_tokens = _typed(body, "max_completion_tokens", "integer")
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", "integer")
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise _bad(f"'max_tokens' is {max_tokens}, above this server's cap of {max_tokens_cap}.", "max_tokens")
    options["max_new_tokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise _bad(f"'stop' must be a non-empty string or a list of up to 4 of them, got {stop!r}.", "stop")
    options["stop"] = tuple(stop) if stop else None
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("speculate") == "off" and "speculate" not in option_names:
        del options["speculate"]  # (off: accepted by every model kind)
    for key in options:
        if key not in option_names:
            field = constraint_param if key in ("json_schema", "json_object", "regex", "grammar") else key
            raise _bad(f"'{field}' is not supported by '{served_model}' (a {model_kind or 'model'} bundle takes: "
                       f"{', '.join(sorted(option_names))}).", field, "unsupported_parameter")
    return GenerationRequest(endpoint, served_model, prompt, stream, include_usage, options,
                             float(pace) if pace is not None else None, n or 1, logprobs is not None,
                             tools if tool_mode != "none" else None, tool_mode if tool_mode != "none" else None,
                             constraint_param, _parallel(body), _flag(body, "return_token_ids"))


def _constraint(body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The output constraint a request asks for, as model options, and the field it came from (at most one)."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise _bad("response_format.json_schema must be an object {name, schema, strict?, description?}.",
                           "response_format.json_schema", "invalid_type")
            if spec.get("name") is not None and not isinstance(spec["name"], str):
                raise _bad("response_format.json_schema.name must be a string.", "response_format.json_schema.name")
            schema = spec.get("schema", {})
            if not isinstance(schema, (dict, bool)):
                raise _bad(f"response_format.json_schema.schema must be a JSON schema (an object), got "
                           f"{_short(schema)}.", "response_format.json_schema.schema", "invalid_type")
            found.append(("response_format.json_schema.schema", {"json_schema": schema}))
        elif kind != "text":
            raise _bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {_short(kind)}.",
                       "response_format.type")
    for key, option in CONSTRAINT_FIELDS.items():
        value = body.get(key)
        if value is None:
            continue
        if key == "guided_choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise _bad("'guided_choice' must be a non-empty list of non-empty strings.", key, "invalid_type")
            value = "|".join(re.escape(c) for c in value)
        elif option == "json_schema":
            if not isinstance(value, (dict, str)):
                raise _bad(f"'{key}' must be a JSON schema (an object), got {_short(value)}.", key, "invalid_type")
        elif not isinstance(value, str) or not value:
            raise _bad(f"'{key}' must be a non-empty string, got {_short(value)}.", key, "invalid_type")
        found.append((key, {option: value}))
    if len(found) > 1:
        raise _bad(f"Give one output constraint, got {' and '.join(k for k, _ in found)}.", found[1][0])
    return (found[0][1], found[0][0]) if found else ({}, None)


def _logprobs(body: dict[str, Any], endpoint: Endpoint) -> int | None:
    """How many alternatives each token's log-probability entry lists; None: no log-probabilities."""
    top_max = TOP_LOGPROBS_MAX[endpoint]
    value = body.get("logprobs")
    if endpoint == "completions":  # (the legacy API: logprobs is the count)
        if value is None or value is False:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top_max:
            raise _bad(f"'logprobs' must be an integer in [0, {top_max}], got {_short(value)}.", "logprobs")
        return value
    if value is not None and not isinstance(value, bool):
        raise _bad(f"'logprobs' must be a boolean, got {_short(value)}.", "logprobs", "invalid_type")
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= top_max):
        raise _bad(f"'top_logprobs' must be an integer in [0, {top_max}], got {_short(top)}.", "top_logprobs")
    if top and not value:
        raise _bad("'top_logprobs' needs \"logprobs\": true.", "top_logprobs")
    return (top or 0) if value else None


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    try:
        tools = check_tools(body["tools"]) if body.get("tools") not in (None, []) else None
        return tools, check_choice(body.get("tool_choice"), tools)
    except ToolError as e:
        raise _bad(str(e), e.param) from None


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be a boolean, got {_short(value)}.", key, "invalid_type")
    return value


def _parallel(body: dict[str, Any]) -> bool:
    value = body.get("parallel_tool_calls", True)
    if not isinstance(value, bool):
        raise _bad(f"'parallel_tool_calls' must be a boolean, got {_short(value)}.", "parallel_tool_calls",
                   "invalid_type")
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content}.", "messages", "invalid_type")
    prompt: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise _bad(f"messages[{i}] needs a role of system, user, assistant, developer or tool; got {_short(m)}.",
                       f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise _bad(f"messages[{i}].tool_calls must be a list of {{id, type: 'function', function: {{name, "
                           "arguments}}}}.", f"messages[{i}].tool_calls", "invalid_type")
            content = m.get("content")
            prompt.append({"role": role, "content": None if content is None else _text_content(content, i),
                           "tool_calls": calls})
        elif role == "tool":
            entry = {"role": "tool", "content": _text_content(m.get("content"), i)}
            if isinstance(m.get("tool_call_id"), str):
                entry["tool_call_id"] = m["tool_call_id"]
            if isinstance(m.get("name"), str):
                entry["name"] = m["name"]
            prompt.append(entry)
        else:
            prompt.append({"role": role, "content": _text_content(m.get("content"), i)})
    return prompt


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string (batches of prompts are not supported).", "prompt",
                   "invalid_type")
    return prompt


def logprob_entry(vocab: Any, entry: Any, endpoint: Endpoint) -> dict[str, Any]:
    """One token's log-probability entry in OpenAI's chat shape (token, logprob, bytes, top_logprobs); the legacy
    completions shape is assembled from these by ``completion_logprobs``."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = vocab.token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {**one(entry.token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


class ResponseBuilder:
    """Builds the response objects and stream chunks of one request."""

    def __init__(self, req: GenerationRequest) -> None:
        self.req = req
        self.created = int(time.time())
        prefix = "chatcmpl" if req.endpoint == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.object = "chat.completion" if req.endpoint == "chat" else "text_completion"

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached: int, prefilled: int | None = None
              ) -> dict[str, Any]:
        """OpenAI's usage; ``prefilled`` (an edgekit extension): prompt positions actually run through the model
        over every choice (n choices of one prompt share one prefill)."""
        out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens,
                               "prompt_tokens_details": {"cached_tokens": cached}}
        if prefilled is not None:
            out["prefilled_tokens"] = prefilled
        return out

    def _logprobs(self, entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
        if entries is None or not self.req.logprobs:
            return None
        if self.req.endpoint == "chat":
            return {"content": entries, "refusal": None}
        return completion_logprobs(entries, offset)

    def choice(self, index: int, text: str, finish_reason: str, entries: list[dict[str, Any]] | None = None,
               calls: list[Any] | None = None, token_ids: list[int] | None = None) -> dict[str, Any]:
        """One finished choice; ``calls``: the tool calls parsed out of ``text`` (chat); ``token_ids``: with
        return_token_ids."""
        ids = {"token_ids": token_ids} if self.req.return_token_ids and token_ids is not None else {}
        if self.req.endpoint != "chat":
            return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": self._logprobs(entries),
                    **ids}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [c.wire() for c in calls]
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"index": index, "message": message, "finish_reason": finish_reason,
                "logprobs": self._logprobs(entries), **ids}

    def full(self, choices: list[dict[str, Any]], usage: dict[str, Any], prompt_ids: list[int] | None = None
             ) -> dict[str, Any]:
        extra = {"prompt_token_ids": prompt_ids} if self.req.return_token_ids and prompt_ids is not None else {}
        return {**self._base(self.object), "choices": choices, "usage": usage, **extra}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False, index: int = 0,
              entries: list[dict[str, Any]] | None = None, tool_calls: list[dict[str, Any]] | None = None,
              offset: int = 0) -> dict[str, Any]:
        if self.req.endpoint == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": self._logprobs(entries)}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason,
                  "logprobs": self._logprobs(entries, offset)}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.req.endpoint == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}
