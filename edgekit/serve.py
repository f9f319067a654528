"""``edgekit serve``: an OpenAI-compatible HTTP + WebSocket server for a bundle, with continuous batching.

Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/chat/completions, POST /v1/completions
(SSE streaming with ``stream: true``), WS /v1/ws (send one request object with "type": "chat.completions" or
"completions"; receive the same chunks as SSE, then "[DONE]"; send {"type": "stop"} to end early).
The model loads in the background: /health answers 503 until it is ready. The server never asks what kind of
model it serves: requests go through the model's ``params`` and the engine's batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from edgekit import limits
from edgekit.metrics import ServerMetrics
from edgekit.openai_api import APIError, GenerationRequest, ResponseBuilder, logprob_entry, parse
from edgekit.runtimes import load
from edgekit.runtimes.bundle import read_manifest
from edgekit.runtimes.engine import Engine, Event, Request
from edgekit.runtimes.errors import ConfigError, EdgekitError, QueueFullError
from edgekit.tools import CallStream, call_grammar, markers, parse_calls, streamed_call_chunks


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 32
    request_timeout: float = 60.0
    max_tokens_cap: int = 2048
    max_body_bytes: int = 1_000_000
    model_name: str | None = None
    threads: int | None = None
    spin: bool = False  # onnxruntime threads busy-wait between runs (they would take cores from the HTTP side)
    providers: tuple[str, ...] | None = None
    prefix_cache_entries: int = 8
    header_timeout: float = 10.0  # seconds a client has to send a request's headers
    body_timeout: float = 30.0  # ... and its body
    max_connections: int = 256  # open connections beyond this get 503
    speculate: str = "off"  # the default of requests that do not set "speculate" (AR bundles)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty, which would turn authentication off. HINT: pass a real key, or "
                              "leave --api-key out to serve without one.")
        if min(self.header_timeout, self.body_timeout) <= 0 or self.max_connections < 1:
            raise ConfigError(f"header/body timeouts must be > 0 and max_connections >= 1, got {self.header_timeout}, "
                              f"{self.body_timeout} and {self.max_connections}.")
        for name in ("max_batch", "max_tokens_cap", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        from edgekit.runtimes.speculative import check_mode

        check_mode(self.speculate)
        if self.max_queue < 0 or self.request_timeout <= 0:
            raise ConfigError(f"max_queue must be >= 0 and request_timeout > 0, got {self.max_queue} and "
                              f"{self.request_timeout}.")


class ServerState:
    """The loaded model and engine (None while loading), metrics, and a load error if any."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.name = cfg.model_name or cfg.bundle.resolve().name
        self.kind = read_manifest(cfg.bundle).kind  # fail fast on a path that is not a bundle
        self.model: Any = None
        self.engine: Engine | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: self.engine.running if self.engine else 0,
                                     lambda: self.engine.waiting if self.engine else 0)

    def load(self) -> None:
        try:
            model = load(self.cfg.bundle, providers=self.cfg.providers, threads=self.cfg.threads,
                         spin=self.cfg.spin)
            self.model = model  # (before the engine: a request is admitted once the engine is there)
            self.engine = Engine(model, self.cfg.max_batch, self.cfg.max_queue, self.cfg.prefix_cache_entries).start()
        except EdgekitError as e:
            self.error = str(e)
            print(f"error: {e}", file=sys.stderr, flush=True)

    def parse(self, body: Any, endpoint: Any) -> GenerationRequest:
        """Validate a request body against what the loaded model takes."""
        model = self.model
        names = model.option_names if model is not None else frozenset()
        greq = parse(body, endpoint, self.name, names, self.cfg.max_tokens_cap, self.kind)
        if self.cfg.speculate != "off" and "speculate" in names and "speculate" not in greq.options:
            greq = dataclasses.replace(greq, options={**greq.options, "speculate": self.cfg.speculate})
        return greq

    def require_ready(self) -> Engine:
        if self.error:
            raise APIError(500, f"The model failed to load: {self.error}", code="model_load_failed",
                           type_="server_error")
        if self.engine is None:
            raise APIError(503, "The model is still loading; retry shortly.", code="model_loading",
                           type_="server_error", headers={"Retry-After": "1"})
        return self.engine


# --- helpers -------------------------------------------------------------------------------------------------------
def _state(conn: HTTPRequest | WebSocket) -> ServerState:
    return conn.app.state.edgekit


def _check_auth(state: ServerState, headers: Any, query: Any = None) -> None:
    """With an API key, every endpoint but /health needs it, in the Authorization header (``query``: the WebSocket
    handshake may pass ``?api_key=``, since browsers cannot set headers there)."""
    key = state.cfg.api_key
    if key is None:
        return
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else (query.get("api_key", "") if query else "")
    if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode()):
        raise APIError(401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")


async def _read_json(request: HTTPRequest, cfg: ServeConfig) -> Any:
    try:
        raw = await limits.read_body(request, cfg.max_body_bytes, cfg.body_timeout)
    except ClientDisconnect:
        limits.log_disconnect("while sending its request")
        raise APIError(400, "The client disconnected while sending the request.", code="client_disconnected") from None
    return limits.parse_json(raw)


class _Job:
    """One submitted request (its ``n`` choices, each a request of the engine): one event queue on the event loop of
    (choice index, event), and metrics bookkeeping."""

    def __init__(self, state: ServerState, greq: GenerationRequest) -> None:
        self.state = state
        engine = state.require_ready()
        model = state.model
        try:
            ids = model.tokenizer.encode_prompt(greq.prompt, tools=greq.tools)
            options = greq.options
            if greq.forces_call:
                assert greq.tools is not None and greq.tool_mode is not None
                grammar = call_grammar(greq.tools, greq.tool_mode, greq.parallel_tool_calls, markers(model.vocab))
                options = {**options, "grammar": grammar}
            params = model.params(len(ids), **options)
            _compile(model, params, greq)
        except EdgekitError as e:
            raise api_error(e) from None
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def listener(i: int) -> Any:
            def on_event(ev: Event) -> None:  # engine thread: metrics here, so ended-by-disconnect requests count
                self._track(i, ev)
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
            return on_event

        self.reqs = [Request(ids, params, listener(i), timeout_s=state.cfg.request_timeout) for i in range(greq.n)]
        self.req = self.reqs[0]
        self.prompt_ids = ids
        self.open = set(range(greq.n))
        self._last_token_at: list[float | None] = [None] * greq.n
        try:
            engine.submit(*self.reqs)
        except QueueFullError as e:
            state.metrics.count(state.metrics.rejected, reason="queue_full")
            raise api_error(e) from None

    @property
    def finished(self) -> bool:
        return not self.open

    def cancel(self) -> None:
        if self.state.engine is not None:
            for i in self.open:
                self.state.engine.cancel(self.reqs[i])

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has ended."""
        try:
            while self.open:
                i, ev = await self.queue.get()
                if ev.type != "token":
                    self.open.discard(i)
                yield i, ev
        finally:
            self.cancel()

    def _track(self, i: int, ev: Event) -> None:
        m, req = self.state.metrics, self.reqs[i]
        if ev.type == "token":
            last = self._last_token_at[i]
            if last is None:
                m.observe(m.ttft, ev.at - req.enqueued_at)
                if req.admitted_at is not None:
                    m.observe(m.queue, req.admitted_at - req.enqueued_at)
            else:
                m.observe(m.itl, ev.at - last)
            self._last_token_at[i] = ev.at
        elif ev.type == "done" and ev.stats is not None:
            m.observe(m.e2e, ev.at - req.enqueued_at)
            if not ev.stats.shared_prompt:
                m.count(m.prompt_tokens, ev.stats.prompt_tokens)
                m.count(m.cached_tokens, ev.stats.reused_prompt_tokens)
            m.count(m.generation_tokens, ev.stats.generated_tokens)
            if ev.stats.drafted_tokens:
                m.count(m.drafted, ev.stats.drafted_tokens)
                m.count(m.accepted, ev.stats.accepted_tokens)
            m.count(m.requests, finish_reason=str(ev.finish_reason))
        elif ev.type == "error":
            m.count(m.requests, finish_reason="error")

    def usage(self, ends: dict[int, Event]) -> dict[str, Any]:
        """Usage over every choice: the prompt once, the completions summed, and the prompt positions prefilled."""
        gen = prefilled = drafted = accepted = 0
        cached = None
        for ev in ends.values():
            st = ev.stats
            if st is None:
                continue
            made = st.generated_tokens
            if st.finish_reason == "stop" and made and len(st.token_ids) < made:
                made = len(st.token_ids)  # the stop token itself is not part of the completion
            gen += made
            prefilled += st.prompt_tokens - st.reused_prompt_tokens
            drafted, accepted = drafted + st.drafted_tokens, accepted + st.accepted_tokens
            if cached is None and not st.shared_prompt:
                cached = st.reused_prompt_tokens
        usage = ResponseBuilder.usage(len(self.prompt_ids), gen, cached or 0, prefilled)
        if drafted:  # (an edgekit extension, like prefilled_tokens)
            usage["speculation"] = {"drafted_tokens": drafted, "accepted_tokens": accepted}
        return usage


def _compile(model: Any, params: Any, greq: GenerationRequest) -> None:
    """Compile the request's output constraint and its tools' parameter schemas now, so that what the engine cannot
    compile is a 400 naming the field."""
    from edgekit.runtimes.constraints import Constraint, ConstraintError

    try:
        constraint = getattr(params, "constraint", None)
        if constraint is not None:
            model.vocab.compile(constraint)
    except ConstraintError as e:
        raise APIError(400, f"{greq.constraint_param}: {e}", param=greq.constraint_param, code=e.code) from None
    for i, tool in enumerate(greq.tools or []):
        param = f"tools[{i}].function.parameters"
        try:
            model.vocab.compile(Constraint.json_schema(tool["function"]["parameters"]))
        except ConstraintError as e:
            raise APIError(400, f"{param}: {e}", param=param, code=e.code) from None


def api_error(e: EdgekitError) -> APIError:
    """The OpenAI-format answer to an edgekit error: status and code from its class."""
    kinds = {400: "invalid_request_error", 429: "rate_limit_error"}
    headers = {"Retry-After": "1"} if e.http_status == 429 else None
    return APIError(e.http_status, str(e), code=e.code, type_=kinds.get(e.http_status, "server_error"),
                    headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# --- HTTP handlers -------------------------------------------------------------------------------------------------
async def health(request: HTTPRequest) -> Response:
    state = _state(request)
    if state.error:
        return JSONResponse({"status": "error", "error": state.error}, status_code=500)
    if state.engine is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok", "model": state.name, "running": state.engine.running,
                         "waiting": state.engine.waiting})


async def metrics(request: HTTPRequest) -> Response:
    _check_auth(_state(request), request.headers)
    return PlainTextResponse(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


async def models(request: HTTPRequest) -> Response:
    state = _state(request)
    _check_auth(state, request.headers)
    return JSONResponse({"object": "list", "data": [
        {"id": state.name, "object": "model", "created": state.created, "owned_by": "edgekit"}]})


async def chat_completions(request: HTTPRequest) -> Response:
    return await _generate(request, "chat")


async def completions(request: HTTPRequest) -> Response:
    return await _generate(request, "completions")


async def _generate(request: HTTPRequest, endpoint: Any) -> Response:
    state = _state(request)
    _check_auth(state, request.headers)
    state.require_ready()
    body = await _read_json(request, state.cfg)
    greq = state.parse(body, endpoint)
    job = _Job(state, greq)
    builder = ResponseBuilder(greq)
    if greq.stream:
        return StreamingResponse(_sse_stream(job, greq, builder), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, job, builder)


def _paced(text: str, tokens: int) -> list[str]:
    """A committed piece split into ``tokens`` near-equal runs of characters (a dLLM block arrives as one piece)."""
    n = max(1, min(tokens, len(text)))
    cuts = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


class _Choice:
    """What one choice has sent so far: its text, log-probability entries, tool calls (chat with tools)."""

    def __init__(self, greq: GenerationRequest, vocab: Any) -> None:
        self.greq, self.vocab = greq, vocab
        self.first = True
        self.parts: list[str] = []
        self.entries: list[dict[str, Any]] | None = [] if greq.logprobs else None
        self.names = [t["function"]["name"] for t in greq.tools or []]
        self.calls = CallStream(self.names) if greq.tool_mode else None
        self.offset = 0  # characters sent (completions' text_offset)

    def take_entries(self, ev: Event) -> list[dict[str, Any]] | None:
        if self.entries is None:
            return None
        new = [logprob_entry(self.vocab, e, self.greq.endpoint) for e in ev.logprobs]
        self.entries.extend(new)
        return new

    def finish_reason(self, reason: str | None) -> str:
        reason = reason or "stop"
        return "tool_calls" if self.calls is not None and self.calls.calls and reason == "stop" else reason


async def _chunks(job: _Job, greq: GenerationRequest, builder: ResponseBuilder) -> AsyncIterator[dict[str, Any]]:
    """The stream's chunk objects (SSE and WebSocket send the same ones): each choice's pieces (``index``), its
    finish chunk or an error, then the usage chunk. With ``pace_tokens_per_s`` the text goes out at that steady
    cadence (a typewriter feel), never ahead of what the model committed: pieces are split into their tokens' worth
    and spaced 1/pace apart. With tools, text that opens a ``<tool_call>`` is held back and each call is sent as
    ``delta.tool_calls`` (its id and name, then its arguments) when it closes."""
    loop = asyncio.get_running_loop()
    next_at = 0.0
    choices = [_Choice(greq, job.state.model.vocab if greq.logprobs else None) for _ in range(greq.n)]
    ends: dict[int, Event] = {}
    async for i, ev in job.events():
        c = choices[i]
        if ev.type == "token":
            entries = c.take_entries(ev)
            if c.calls is not None:
                sent = False
                for kind, value in c.calls.feed(ev.text):
                    for chunk in _call_chunks(builder, c, i, kind, value, entries if not sent else None):
                        yield chunk
                    sent = True
                if entries and not sent:
                    yield builder.chunk(index=i, entries=entries, first=c.first)
                    c.first = False
            elif greq.pace_tokens_per_s and ev.text:
                pieces = _paced(ev.text, ev.tokens)
                for k, piece in enumerate(pieces):
                    delay = next_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at = max(next_at, loop.time()) + 1.0 / greq.pace_tokens_per_s
                    yield builder.chunk(piece, first=c.first, index=i, entries=entries if k == 0 else None,
                                        offset=c.offset)
                    c.offset += len(piece)
                    c.first = False
            elif ev.text or (c.first and greq.endpoint == "chat") or entries:
                yield builder.chunk(ev.text, first=c.first, index=i, entries=entries, offset=c.offset)
                c.offset += len(ev.text)
                c.first = False
        elif ev.type == "done" and ev.finish_reason == "timeout":
            yield APIError(408, f"The request exceeded the server's timeout of {job.state.cfg.request_timeout} s.",
                           code="request_timeout", type_="timeout_error").body()
        elif ev.type == "done":
            ends[i] = ev
            if c.calls is not None:
                for kind, value in c.calls.close():
                    for chunk in _call_chunks(builder, c, i, kind, value, None):
                        yield chunk
            yield builder.chunk(finish_reason=c.finish_reason(ev.finish_reason), first=c.first, index=i)
        else:
            yield APIError(500, f"Generation failed: {ev.error}", code="generation_failed",
                           type_="server_error").body()
    if greq.include_usage and ends:
        yield builder.usage_chunk(job.usage(ends))


def _call_chunks(builder: ResponseBuilder, c: _Choice, index: int, kind: str, value: Any,
                 entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if kind == "content":
        out = [builder.chunk(value, first=c.first, index=index, entries=entries)]
    else:
        k = len(c.calls.calls) - 1 if c.calls is not None else 0
        head, args = streamed_call_chunks(value, k)
        out = [builder.chunk(first=c.first, index=index, tool_calls=[head], entries=entries),
               builder.chunk(index=index, tool_calls=[args])]
    c.first = False
    return out


async def _sse_stream(job: _Job, greq: GenerationRequest, builder: ResponseBuilder) -> AsyncIterator[str]:
    async for obj in _chunks(job, greq, builder):
        yield _sse(obj)
    yield "data: [DONE]\n\n"


async def _collect(request: HTTPRequest, job: _Job, builder: ResponseBuilder) -> Response:
    greq = builder.req
    choices = [_Choice(greq, job.state.model.vocab if greq.logprobs else None) for _ in range(greq.n)]
    ends: dict[int, Event] = {}
    events = job.events()
    nxt: asyncio.Task[tuple[int, Event]] | None = None
    try:
        while True:
            nxt = nxt or asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=0.25)
            if not done:
                if await request.is_disconnected():
                    job.cancel()
                continue
            try:
                i, ev = nxt.result()
            except StopAsyncIteration:
                nxt = None
                break
            nxt = None
            if ev.type == "token":
                choices[i].parts.append(ev.text)
                choices[i].take_entries(ev)
            elif ev.type == "error":
                raise APIError(500, f"Generation failed: {ev.error}", code="generation_failed", type_="server_error")
            elif ev.finish_reason == "timeout":
                raise APIError(408, f"The request exceeded the server's timeout of {job.state.cfg.request_timeout} s.",
                               code="request_timeout", type_="timeout_error")
            else:
                ends[i] = ev
                if len(ends) == greq.n:
                    break
        out = []
        for i, c in enumerate(choices):
            text, reason = "".join(c.parts), ends[i].finish_reason or "stop"
            calls = None
            if greq.tool_mode:
                content, calls = parse_calls(text, c.names)
                text = content  # type: ignore[assignment]
            st = ends[i].stats
            out.append(builder.choice(i, text, reason, c.entries, calls, list(st.token_ids) if st else None))
        return JSONResponse(builder.full(out, job.usage(ends), job.prompt_ids))
    finally:
        if nxt is not None:
            nxt.cancel()
        await events.aclose()


async def _api_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: HTTPRequest, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405, ...) in OpenAI's error format."""
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    body = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                    code=codes.get(exc.status_code, "http_error")).body()
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(request: HTTPRequest, exc: Exception) -> Response:
    body = APIError(500, f"Internal error: {type(exc).__name__}", code="internal_error", type_="server_error").body()
    return JSONResponse(body, status_code=500)


def create_app(cfg: ServeConfig) -> Starlette:
    from edgekit import ws  # (the WebSocket route builds on this module's jobs)

    """The ASGI app; the model starts loading in a background thread when the app starts."""
    state = ServerState(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="edgekit-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            WebSocketRoute("/v1/ws", ws.websocket),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a redirect would be built from the client's Host header
    app.state.edgekit = state
    return app


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(cfg)
    state: ServerState = app.state.edgekit
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach this port can use it.",
              file=sys.stderr)
    print(f"edgekit: serving '{state.name}' ({state.kind}) on http://{cfg.host}:{cfg.port}  (OpenAI API under /v1)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", ws="websockets-sansio", lifespan="on",
                timeout_graceful_shutdown=5, http=limits.guarded_protocol(cfg.header_timeout),
                limit_concurrency=cfg.max_connections, timeout_keep_alive=5, ws_max_size=cfg.max_body_bytes)
