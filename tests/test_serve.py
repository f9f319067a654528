"""The real server as a subprocess on a tiny bundle, spoken to over HTTP, SSE, WebSocket and the OpenAI client."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgekit.runtimes import load

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real server as a subprocess; its output goes to a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, bundle: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile("w+", prefix="edgekit-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgekit.cli", "serve", str(bundle), "--port", str(self.port), "--model-name",
             "tiny", *args], stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.logs()
            time.sleep(0.2)
        raise AssertionError("server did not become healthy")

    def logs(self) -> str:
        return Path(self._log.name).read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(llama_bundle):
    s = Server(llama_bundle, "--api-key", KEY, "--max-batch", "4", "--max-tokens-cap", "200",
               "--max-body-bytes", "4096")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(llama_bundle):
    return load(llama_bundle)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=30, **kw)


def sse_events(response) -> list:
    lines = [ln for ln in response.text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


def test_models_and_auth(server):
    r = httpx.get(server.url + "/v1/models", headers=AUTH)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT}, headers={"Authorization": "Bearer no"})
    assert r.status_code == 401


def test_chat_streaming_format_and_usage(server, model):
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 20,
                                                "temperature": 0, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({e["id"] for e in events}) == 1
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == []
    final = events[-2]["choices"][0]
    assert final["finish_reason"] in ("stop", "length") and final["delta"] == {}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == model.generate(CHAT, max_new_tokens=20, temperature=0)
    assert usage["prompt_tokens"] == len(model.tokenizer.encode_prompt(CHAT))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if final["finish_reason"] == "length":
        assert usage["completion_tokens"] == 20


def test_non_streaming_chat_and_completions(server, model):
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 12, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == model.generate(CHAT, max_new_tokens=12, temperature=0)
    r = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
                                         "stream": False})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == model.generate("Once upon a time", max_new_tokens=5, temperature=0)


def test_stop_strings(server, model):
    full = model.generate("Once upon a time", max_new_tokens=30, temperature=0)
    stop = full[4:7]
    r = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0,
                                         "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, code", [
    ({"messages": CHAT, "model": "gpt-4"}, 400, "model_not_found"),
    ({"messages": "hi"}, 400, "invalid_type"),
    ({"messages": []}, 400, "invalid_type"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
    ({"messages": CHAT, "temperature": "hot"}, 400, "invalid_type"),
    ({"messages": CHAT, "temperature": 3}, 400, "invalid_value"),
    ({"messages": CHAT, "top_p": 0}, 400, "invalid_value"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "invalid_value"),
    ({"messages": CHAT, "max_tokens": 500}, 400, "invalid_value"),  # above --max-tokens-cap
    ({"messages": CHAT, "max_tokens": True}, 400, "invalid_type"),
    ({"messages": CHAT, "n": 9}, 400, "invalid_value"),
    ({"messages": CHAT, "stream": "yes"}, 400, "invalid_type"),
    ({"messages": CHAT, "top_logprobs": 3}, 400, "invalid_value"),  # (needs logprobs: true)
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "invalid_value"),
    ({"messages": CHAT, "best_of": 2}, 400, "unsupported_parameter"),
    ({"messages": CHAT, "diffusion_steps": 8}, 400, "unsupported_parameter"),
    ({"messages": CHAT, "stop": [1]}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 10}, 400, "context_length_exceeded"),
    ([1, 2, 3], 400, "invalid_type"),
])
def test_bad_requests_get_openai_errors(server, body, status, code):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]


def test_bad_bodies(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 10000, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = post(server, "/v1/completions", {"prompt": ""})
    assert r.status_code == 400
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 200})
    assert r.status_code == 400 and "max context" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # nothing crashed the server


def test_sixteen_concurrent_streams_all_complete(server, model):
    prompts = [f"Story number {i}:" for i in range(16)]
    results: dict[int, str] = {}

    def one(i):
        r = post(server, "/v1/completions", {"prompt": prompts[i], "max_tokens": 24, "temperature": 0,
                                             "stream": True})
        results[i] = "".join(e["choices"][0]["text"] for e in sse_events(r))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(16))
    for i, p in enumerate(prompts):
        assert results[i] == model.generate(p, max_new_tokens=24, temperature=0), i


def _metric(server, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A tiny model with a 4096-token context, so one request can run for seconds."""
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent
    from tiny_models import make_model

    root = tmp_path_factory.mktemp("long")
    src = make_model("LlamaForCausalLM", root / "src", max_position_embeddings=4096)
    bundle = export_bundle(ExportConfig(source=str(src), output=root / "b", max_context=4096), progress=Silent()).path
    s = Server(bundle, "--max-tokens-cap", "4000")
    yield s, load(bundle)
    s.stop()


def test_disconnect_stops_generation_and_frees_the_slot(long_server):
    server, model = long_server
    prompt = next((p for p in ("Once upon a time", "Hello", "1 2 3", "abc", "The sky")
                   if (st := model.stream(p, max_new_tokens=3000, temperature=0)) and "".join(st) is not None
                   and st.stats.finish_reason == "length"), None)
    if prompt is None:
        pytest.skip("every candidate prompt hits a stop token early on this random model")
    before = _metric(server, "edgekit_requests_total", finish_reason="cancelled")
    generated_before = _metric(server, "edgekit_generation_tokens_total")
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", server.url + "/v1/completions",
            json={"prompt": prompt, "max_tokens": 3000, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
    # the client is gone: the request must end as cancelled, long before 3000 tokens
    deadline = time.time() + 20
    while time.time() < deadline and _metric(server, "edgekit_requests_total", finish_reason="cancelled") == before:
        time.sleep(0.05)
    assert _metric(server, "edgekit_requests_total", finish_reason="cancelled") == before + 1
    assert _metric(server, "edgekit_requests_running") == 0
    assert _metric(server, "edgekit_generation_tokens_total") - generated_before < 3000


def test_metrics_parse_as_prometheus(server):
    from prometheus_client.parser import text_string_to_metric_families

    post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics", headers=AUTH).text)}
    for name in ("edgekit_time_to_first_token_seconds", "edgekit_inter_token_latency_seconds",
                 "edgekit_e2e_request_latency_seconds", "edgekit_request_queue_time_seconds"):
        assert fams[name].type == "histogram"
    assert fams["edgekit_requests_running"].type == "gauge"
    assert fams["edgekit_generation_tokens"].type == "counter"
    assert _metric(server, "edgekit_time_to_first_token_seconds_count") > 0


def test_openai_client(server, model):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, stream=True, max_tokens=16, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == model.generate(CHAT, max_new_tokens=16, temperature=0)
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert r.choices[0].text == model.generate("Once upon a time", max_new_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4


def test_websocket_stream_and_stop(server):
    import websockets

    async def go():
        url = server.url.replace("http", "ws") + f"/v1/ws?api_key={KEY}"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "completions", "prompt": "Once upon a time", "max_tokens": 200,
                                      "temperature": 0.8, "seed": 3}))
            chunks, finish = 0, None
            async for msg in ws:
                if msg == "[DONE]":
                    break
                obj = json.loads(msg)
                chunks += 1
                if chunks == 3:
                    await ws.send(json.dumps({"type": "stop"}))
                if obj["choices"] and obj["choices"][0]["finish_reason"]:
                    finish = obj["choices"][0]["finish_reason"]
            return chunks, finish

    chunks, finish = asyncio.run(go())
    assert finish == "stop" and chunks < 100


def test_flood_gets_429_with_retry_after(llama_bundle):
    s = Server(llama_bundle, "--max-batch", "1", "--max-queue", "1")
    try:
        statuses: list[int] = []
        bodies: list[dict] = []

        def one():
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 150,
                                                            "temperature": 0.9, "seed": 1}, timeout=60)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                bodies.append(r.json())

        threads = [threading.Thread(target=one) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(statuses) == 24
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2
        assert set(statuses) <= {200, 429}
        assert bodies[0]["error"]["type"] == "rate_limit_error"
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_health_is_503_while_loading(llama_bundle):
    from starlette.testclient import TestClient

    from edgekit.serve import ServeConfig, create_app

    app = create_app(ServeConfig(bundle=llama_bundle))
    client = TestClient(app)  # lifespan not entered: the model never starts loading
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = client.post("/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    with TestClient(app) as ready:  # entering runs the lifespan: the model loads
        deadline = time.time() + 30
        while ready.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert ready.get("/health").json()["status"] == "ok"


def test_serve_binds_loopback_by_default():
    from edgekit.serve import ServeConfig

    assert ServeConfig(bundle=Path(".")).host == "127.0.0.1"


@pytest.fixture(scope="module")
def diffusion_server(tmp_path_factory):
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent
    from tiny_models import make_mlm

    root = tmp_path_factory.mktemp("dllm")
    bundle = export_bundle(ExportConfig(source=str(make_mlm("BertForMaskedLM", root / "src")), output=root / "b"),
                           progress=Silent()).path
    s = Server(bundle, "--max-queue", "4")
    yield s, load(bundle)
    s.stop()


def test_diffusion_bundle_is_served_block_by_block(diffusion_server):
    server, model = diffusion_server
    body = {"prompt": "Once upon a time", "max_tokens": 16, "block_length": 8, "diffusion_steps": 8,
            "threshold": 0.9}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = model.generate("Once upon a time", gen_length=16, block_length=8, diffusion_steps=8, threshold=0.9)
    assert out["choices"][0]["text"] == expected
    assert out["usage"]["completion_tokens"] <= 16 and out["choices"][0]["finish_reason"] in ("stop", "length")
    r = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=30)
    events = sse_events(r)
    assert 1 <= len(events) <= 3  # at most one chunk per block, then the final chunk
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    r = httpx.post(server.url + "/v1/completions", json={**body, "cache": "dual"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == model.generate("Once upon a time", gen_length=16, block_length=8,
                                                            diffusion_steps=8, threshold=0.9, cache="dual")


@pytest.mark.parametrize("extra, code", [({"stop": ["x"]}, "unsupported_parameter"),
                                         ({"diffusion_steps": 0}, "invalid_value"),
                                         ({"max_tokens": 16, "block_length": 5}, "invalid_value"),
                                         ({"threshold": 2}, "invalid_value"),
                                         ({"remasking": "best"}, "invalid_value"),
                                         ({"cache": "kv"}, "invalid_value"),
                                         ({"cache": 1}, "invalid_type"),
                                         ({"seed": -1}, "invalid_value"),  # (was a 500 from default_rng)
                                         ({"seed": 2**63}, "invalid_value"),
                                         ({"top_k": 2**63}, "invalid_value")])
def test_diffusion_bad_fields(diffusion_server, extra, code):
    server, _ = diffusion_server
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_serial_engine_cancel_and_timeout(tmp_path):
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent
    from edgekit.runtimes.engine import Engine, Request
    from tiny_models import make_mlm

    bundle = export_bundle(ExportConfig(source=str(make_mlm("BertForMaskedLM", tmp_path / "src")),
                                        output=tmp_path / "b"), progress=Silent()).path
    model = load(bundle)
    engine = Engine(model, max_queue=4)
    ids = model.tokenizer.encode_prompt("Hello")
    events = []
    req = Request(ids, model.params(len(ids), gen_length=32, block_length=8, diffusion_steps=32), events.append)
    req.cancelled = True
    engine.submit(req)
    engine.step()
    assert events == []  # cancelled while waiting: dropped without running
    late = Request(ids, model.params(len(ids), gen_length=32, block_length=8, diffusion_steps=32), events.append,
                   timeout_s=0.0)
    engine.submit(late)
    engine.step()
    assert events[-1].type == "done" and events[-1].finish_reason == "timeout"


def _stream_times(server, body):
    """(text pieces, arrival times) of a streamed chat completion, read as the chunks arrive."""
    pieces, times = [], []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
                if delta:
                    pieces.append(delta)
                    times.append(time.perf_counter())
    return pieces, times


def test_stream_pacing_gives_a_steady_cadence_and_the_same_text(server):
    body = {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 24, "temperature": 0}
    plain, _ = _stream_times(server, body)
    paced, times = _stream_times(server, {**body, "stream_options": {"pace_tokens_per_s": 40}})
    assert "".join(paced) == "".join(plain)
    gaps = np.diff(times)
    assert len(gaps) >= 10 and np.median(gaps) >= 0.8 / 40, gaps  # ~25 ms apart (never faster than the pace)


@pytest.mark.parametrize("options, message", [
    ({"pace_tokens_per_s": 0}, "must be a number in \\[1, 1000\\]"),
    ({"pace_tokens_per_s": "fast"}, "must be a number in \\[1, 1000\\]"),
    ({"pace_tokens_per_s": 5000}, "must be a number in \\[1, 1000\\]"),
])
def test_bad_pacing_values_are_400s(server, options, message):
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "stream": True, "stream_options": options})
    assert r.status_code == 400 and re.search(message, r.json()["error"]["message"]), r.text
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "stream_options": {"pace_tokens_per_s": 10}})
    assert r.status_code == 400 and "needs \"stream\": true" in r.json()["error"]["message"]
