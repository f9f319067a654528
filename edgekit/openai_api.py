"""OpenAI wire format: validate chat/completions request bodies, build responses, stream chunks and error bodies.

Accepted fields: model, messages | prompt, stream, stream_options.include_usage, max_tokens | max_completion_tokens,
n (must be 1), and the generation fields in ``FIELDS`` that the served model takes (its ``option_names``: AR
bundles take temperature, top_p, top_k, seed, stop, repetition_penalty, presence_penalty, frequency_penalty,
logit_bias; diffusion bundles temperature, top_p, top_k, seed, gen_length (default: max_tokens), block_length,
diffusion_steps, remasking, threshold, entropy_bound, position_decay, cache). A generation field the model does not
take is refused with 400, never silently ignored (non-zero penalties and a non-empty logit_bias on a diffusion
bundle too), and so are n > 1, logprobs, tools / tool_choice / functions and response_format other than text. Other
fields (user, metadata, ...) are ignored. Here only types and shapes are checked; the model's ``params`` checks
ranges (one set of bounds), and its errors become 400s. Unset fields take the bundle's generation defaults (greedy
for SmolLM2), not OpenAI's temperature 1.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]
FieldType = Literal["number", "integer", "string"]
# fields that would change the answer and are not implemented, with the values that mean "off" (accepted)
PACE_RANGE = (1.0, 1000.0)  # stream_options.pace_tokens_per_s bounds
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "best_of": (1,), "echo": (False,), "suffix": ("",),
    "min_p": (0, 0.0),
}
# request field -> its type; the option of the same name goes to the model's params()
FIELDS: dict[str, FieldType] = {
    "temperature": "number", "top_p": "number", "top_k": "integer", "seed": "integer",
    "repetition_penalty": "number", "gen_length": "integer", "block_length": "integer",
    "diffusion_steps": "integer", "remasking": "string", "threshold": "number", "entropy_bound": "number",
    "position_decay": "number", "cache": "string",
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
    options: dict[str, Any]  # max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty
    pace_tokens_per_s: float | None = None  # stream_options.pace_tokens_per_s: a steady cadence; None: as made


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
    if n not in (None, 1):
        raise _bad(f"Only n=1 is supported, got {n}.", "n")
    for key, off in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and not any(value == o and type(value) is type(o) for o in off):
            raise _bad(f"'{key}' is not supported by this server (it would change the answer), got {_short(value)}.",
                       key, "unsupported_parameter")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise _bad("Only response_format {'type': 'text'} is supported.", "response_format", "unsupported_parameter")
    options: dict[str, Any] = {key: _typed(body, key, kind) for key, kind in FIELDS.items()}
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
    for key in options:
        if key not in option_names:
            raise _bad(f"'{key}' is not supported by '{served_model}' (a {model_kind or 'model'} bundle takes: "
                       f"{', '.join(sorted(option_names))}).", key, "unsupported_parameter")
    return GenerationRequest(endpoint, served_model, prompt, stream, include_usage, options,
                             float(pace) if pace is not None else None)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content}.", "messages", "invalid_type")
    prompt = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise _bad(f"messages[{i}] needs a role of system, user, assistant or developer; got {m!r}.",
                       f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
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
    def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def full(self, text: str, finish_reason: str, usage: dict[str, Any]) -> dict[str, Any]:
        if self.req.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base(self.object), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.req.endpoint == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.req.endpoint == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}
