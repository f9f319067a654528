"""What keeps ``edgekit serve`` standing against hostile clients: strict JSON (size, depth, number and string
checks), a deadline on reading headers and bodies, and OpenAI-format answers for every refusal."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from typing import Any

from edgekit.openai_api import APIError
from edgekit.runtimes.schema import walk

MAX_DEPTH = 64  # nesting a request body may have (a chat request: 5)
MAX_DIGITS = 100  # digits an integer may have


def _bad_json(message: str, code: str = "invalid_json") -> APIError:
    return APIError(400, message, code=code)


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _bad_json(f"The request holds an integer of {len(text)} digits; at most {MAX_DIGITS} are accepted.",
                        "invalid_value")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _bad_json(f"The request holds the number {text[:40]}, which is not finite.", "invalid_value")
    return value


def _constant(name: str) -> Any:
    raise _bad_json(f"{name} is not valid JSON.")


def parse_json(raw: bytes) -> Any:
    """Parse a request body strictly: valid UTF-8 JSON, no NaN/Infinity, integers of at most 100 digits, nesting
    of at most 64 levels, no lone UTF-16 surrogates in any string; else APIError(400)."""
    try:
        text = raw.decode("utf-8") if raw else "null"  # JSON is UTF-8 (json.loads would guess UTF-16 from a BOM)
        data = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise _bad_json(f"The request body nests deeper than this server parses ({MAX_DEPTH} levels).") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _bad_json(f"The request body is not valid JSON: {str(e)[:200]}.") from None
    check(data)
    return data


def check(data: Any) -> None:
    """Depth and string checks of parsed JSON."""
    for node, depth in walk(data):
        if depth > MAX_DEPTH:
            raise _bad_json(f"The request body nests deeper than {MAX_DEPTH} levels.")
        if isinstance(node, str):
            _text(node)


def _text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad_json("The request holds a string with a lone UTF-16 surrogate (e.g. \\ud800), which is not "
                        "text; send valid Unicode.", "invalid_value") from None


async def read_body(request: Any, limit: int, timeout_s: float) -> bytes:
    """The body, at most ``limit`` bytes, read within ``timeout_s`` (a slow sender gets 408)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.",
                       code="body_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s.", code="request_timeout",
                       type_="timeout_error") from None


def guarded_protocol(header_timeout_s: float) -> type:
    """uvicorn's httptools protocol with a deadline on each request's headers: a connection that trickles them
    (Slowloris) or sends nothing is closed, while streams of answers are unaffected."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Guarded(HttpToolsProtocol):
        _guard: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._guard is None:
                self._guard = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._guard is not None:
                self._guard.cancel()
                self._guard = None

        def _expire(self) -> None:
            self._guard = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # (uvicorn narrows the transport type)
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded


def log_disconnect(what: str) -> None:
    """One line for a client that went away (never a traceback)."""
    print(f"edgekit: client disconnected ({what})", file=sys.stderr, flush=True)
