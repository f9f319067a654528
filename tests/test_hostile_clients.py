"""`edgekit serve` is a public surface: hostile requests get OpenAI-format 4xx answers (never a 5xx or a dropped
connection), the API-key rules hold, slow clients are timed out while normal streams go on."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx
import pytest
import websockets
from test_serve import AUTH, KEY, Server, post

from edgekit.limits import parse_json
from edgekit.openai_api import APIError, parse
from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError

CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(llama_bundle):
    s = Server(llama_bundle, "--api-key", KEY, "--max-tokens-cap", "200", "--max-body-bytes", "1000000",
               "--header-timeout", "1", "--body-timeout", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(llama_bundle):
    return load(llama_bundle)


def raw_post(server, path, body: bytes, headers=None):
    return httpx.post(server.url + path, content=body, headers={**AUTH, "Content-Type": "application/json",
                                                                 **(headers or {})}, timeout=30)


def is_openai_error(r, status) -> bool:
    err = r.json().get("error", {})
    return r.status_code == status and {"message", "type", "param", "code"} <= set(err)


@pytest.mark.parametrize("body, code", [
    (b'{"prompt": "x\\ud800y", "max_tokens": 2}', "invalid_value"),  # a lone surrogate in the prompt
    (b'{"model": "\\udfff", "prompt": "x"}', "invalid_value"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "invalid_value"),  # 5,000 digits
    (b'{"prompt": "x", "temperature": NaN}', "invalid_json"),
    (b'{"prompt": "x", "temperature": 1e999}', "invalid_value"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "invalid_json"),  # nested 50,000 deep
    (b"[" * 200 + b"]" * 200, "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
])
def test_hostile_bodies_get_400(server, body, code):
    r = raw_post(server, "/v1/completions", body)
    assert is_openai_error(r, 400) and r.json()["error"]["code"] == code, r.text


@pytest.mark.parametrize("field, value", [("best_of", 3), ("echo", True), ("suffix", "end"), ("min_p", 0.1)])
def test_fields_that_would_change_the_answer_are_refused(server, field, value):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, field: value})
    assert is_openai_error(r, 400) and r.json()["error"]["code"] == "unsupported_parameter", r.text
    off = {"best_of": 1, "echo": False, "suffix": "", "min_p": 0}[field]
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, field: off}).status_code == 200


def test_404_405_and_no_host_redirects(server):
    r = httpx.get(server.url + "/nope", headers=AUTH)
    assert is_openai_error(r, 404)
    r = httpx.get(server.url + "/v1/chat/completions", headers=AUTH)
    assert is_openai_error(r, 405)
    r = httpx.post(server.url + "/v1/chat/completions/", json={"messages": CHAT}, timeout=10,
                   headers={**AUTH, "Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_api_key_rules(server):
    assert httpx.get(server.url + "/health").status_code == 200  # the one open endpoint
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers=AUTH).status_code == 200
    r = httpx.post(server.url + f"/v1/completions?api_key={KEY}", json={"prompt": "x", "max_tokens": 1})
    assert is_openai_error(r, 401)  # a key in the URL ends up in logs and proxies: only the header counts
    with pytest.raises(ConfigError, match="--api-key is empty"):
        from edgekit.serve import ServeConfig

        ServeConfig(bundle=server.url, api_key="")  # type: ignore[arg-type]


def test_slow_clients_are_timed_out_while_streams_go_on(server):
    slow = []
    for _ in range(8):  # Slowloris: open, send part of the headers, then trickle
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    body = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "stream": True}
    start = time.time()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        text = "".join(r.iter_text())
    assert r.status_code == 200 and text.rstrip().endswith("[DONE]")
    time.sleep(max(0.0, 1.5 - (time.time() - start)))
    closed = 0
    for s in slow:  # the server closes each one (1 s header timeout); a busy machine may take longer
        s.settimeout(20)
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass  # still open after 20 s: not timed out
        s.close()
    assert closed == len(slow)
    trickle = socket.create_connection(("127.0.0.1", server.port))  # a body that never finishes: 408
    trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    trickle.settimeout(10)
    answer = b""
    while b"request_timeout" not in answer:  # (the head and the body may arrive in separate segments)
        part = trickle.recv(4096)
        if not part:
            break
        answer += part
    answer = answer.decode()
    trickle.close()
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer


def test_websocket_hostile_messages_get_an_error_and_a_close_frame(server):
    url = server.url.replace("http", "ws") + f"/v1/ws?api_key={KEY}"

    async def first(msg: str):
        async with websockets.connect(url) as ws:
            await ws.send(msg)
            reply = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return reply, closed.value.rcvd.code if closed.value.rcvd else None

    for msg in ('{"type": "completions", "prompt": "x\\ud800"}', '{"prompt": 1' + "0" * 5000 + "}",
                '{"a":' * 50_000 + "1" + "}" * 50_000, "not json"):
        reply, code = asyncio.run(first(msg))
        assert reply["error"]["type"] == "invalid_request_error" and code == 1008, (msg[:40], reply, code)


def test_websocket_binary_frames(server, model):
    """A binary frame holding UTF-8 JSON is a request like a text frame; other bytes close with 1003."""
    url = server.url.replace("http", "ws") + f"/v1/ws?api_key={KEY}"

    async def answer(frame: bytes):
        async with websockets.connect(url) as ws:
            await ws.send(frame)
            text = ""
            try:
                while (msg := await ws.recv()) != "[DONE]":
                    text += json.loads(msg)["choices"][0].get("text") or ""
            except websockets.ConnectionClosed as closed:
                return None, closed.rcvd.code if closed.rcvd else None
            return text, None

    body = {"type": "completions", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    text, _ = asyncio.run(answer(json.dumps(body).encode()))
    assert text == model.generate("Once upon a time", max_new_tokens=6, temperature=0)
    assert asyncio.run(answer(b"\xff\xfe{}")) == (None, 1003)


def test_seeds_and_top_k_beyond_int64_are_refused(server):
    for field in ("seed", "top_k"):
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, field: 2**63})
        assert is_openai_error(r, 400) and field in r.json()["error"]["message"], r.text


def test_a_malformed_websocket_message_mid_stream_does_not_cancel_the_answer(server, model):
    url = server.url.replace("http", "ws") + f"/v1/ws?api_key={KEY}"

    async def run():
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "completions", "prompt": "Once upon a time", "max_tokens": 20,
                                      "temperature": 0}))
            await ws.send("{broken")
            text, errors = "", 0
            while True:
                msg = await ws.recv()
                if msg == "[DONE]":
                    return text, errors
                obj = json.loads(msg)
                if "error" in obj:
                    errors += 1
                else:
                    text += obj["choices"][0].get("text") or ""

    text, errors = asyncio.run(run())
    assert errors == 1 and text == model.generate("Once upon a time", max_new_tokens=20, temperature=0)


def test_after_the_attack_answers_are_unchanged(server, model):
    r = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == model.generate("Once upon a time", max_new_tokens=12, temperature=0)
    logs = server.logs()
    assert "Traceback" not in logs, logs[-3000:]


def test_fuzz_the_request_parser():
    """Random hostile bodies through the strict JSON parser and the request validator: a request or an APIError."""
    rng = random.Random(7)
    atoms = ['"x"', '"\\ud800"', "1", "-0", "1e999", "NaN", "true", "null", "[]", "{}", '"' + "y" * 50 + '"',
             "9" * 120, "1.5", '"chat.completions"']
    keys = ["prompt", "messages", "model", "max_tokens", "temperature", "top_p", "stop", "stream", "n", "seed",
            "logit_bias", "role", "content", "stream_options", "gen_length"]

    def value(depth: int) -> str:
        r = rng.random()
        if depth > 4 or r < 0.5:
            return rng.choice(atoms)
        if r < 0.75:
            return "[" + ",".join(value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
        return "{" + ",".join(f'"{rng.choice(keys)}":{value(depth + 1)}' for _ in range(rng.randint(0, 4))) + "}"

    names = frozenset({"temperature", "top_p", "top_k", "seed", "stop", "max_new_tokens", "repetition_penalty"})
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        raw = value(0).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randint(0, len(raw))]
        try:
            parse(parse_json(raw), rng.choice(["chat", "completions"]), "tiny", names, 200, "ar")
            outcomes["ok"] += 1
        except APIError as e:
            assert 400 <= e.status < 500
            outcomes["refused"] += 1
    assert outcomes["refused"] > 2000
