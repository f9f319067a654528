"""``edgekit serve``'s WebSocket route (WS /v1/ws): one request object per connection, the answer's chunks as they
are made (the same as SSE), then "[DONE]"; {"type": "stop"} ends the answer early. Text frames, or binary frames
holding UTF-8 JSON; any other binary frame closes the connection with 1003 (unsupported data)."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket, WebSocketDisconnect

from edgekit import limits
from edgekit.openai_api import APIError, ResponseBuilder
from edgekit.serve import _check_auth, _chunks, _Job, _state


class BinaryFrame(Exception):
    """A binary frame that is not UTF-8 text."""


async def receive(ws: WebSocket) -> bytes:
    """The next message's bytes (a text frame's, or a binary frame's when it is UTF-8)."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is not None:
        return message["text"].encode("utf-8", "surrogatepass")
    data = message.get("bytes") or b""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise BinaryFrame from None
    return data


async def websocket(ws: WebSocket) -> None:
    state = _state(ws)
    try:
        _check_auth(state, ws.headers, ws.query_params)
    except APIError:
        await ws.close(code=1008, reason="invalid API key")
        return
    await ws.accept()
    try:
        msg = limits.parse_json(await receive(ws))
        route = msg.pop("type", "chat.completions") if isinstance(msg, dict) else None
        if route not in ("chat.completions", "completions"):
            raise APIError(400, f"'type' must be 'chat.completions' or 'completions', got {route!r}.", "type")
        state.require_ready()
        greq = state.parse({**msg, "stream": True}, "chat" if route == "chat.completions" else "completions")
        job = _Job(state, greq)
    except APIError as e:
        await ws.send_json(e.body())
        await ws.close(code=1008 if e.status < 500 else 1011)
        return
    except (WebSocketDisconnect, RuntimeError):
        limits.log_disconnect("WebSocket, before its request")
        return
    except BinaryFrame:
        await ws.close(code=1003, reason="frames must be UTF-8 JSON")
        return

    stopped_by_client = False

    async def listen() -> None:
        nonlocal stopped_by_client
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, BinaryFrame):
            while True:
                raw = await receive(ws)
                try:  # a malformed message is answered and ignored; it does not end the answer
                    m = limits.parse_json(raw)
                except APIError as e:
                    await ws.send_json(e.body())
                    continue
                if isinstance(m, dict) and m.get("type") == "stop":
                    stopped_by_client = True
                    job.cancel()
        job.cancel()  # the client went away

    listener = asyncio.ensure_future(listen())
    builder = ResponseBuilder(greq)
    try:
        async for obj in _chunks(job, greq, builder):
            if stopped_by_client and obj.get("choices") and obj["choices"][0].get("finish_reason") == "cancelled":
                obj["choices"][0]["finish_reason"] = "stop"
            await ws.send_json(obj)
        await ws.send_text("[DONE]")
        await ws.close()
    except (WebSocketDisconnect, RuntimeError):
        limits.log_disconnect("WebSocket, during its answer")
        job.cancel()
    finally:
        listener.cancel()
