"""The OpenAI API's structured output, tool calls, logprobs and n through the real server and the official openai
client, on a tiny random-weight bundle (with a context long enough for the tools' rendering): a random model writes
garbage, so every parsed, valid answer is the constraint's doing."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_serve import KEY, Server, post
from test_structured import SCHEMAS

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent
from edgekit.runtimes import load
from tiny_models import make_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    src = make_model("LlamaForCausalLM", root / "src", max_position_embeddings=2048)
    return export_bundle(ExportConfig(source=str(src), output=root / "b"), verify=None, progress=Silent()).path


@pytest.fixture(scope="module")
def server(bundle):
    s = Server(bundle, "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_response_format_json_schema_strict(client, schema):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=80, temperature=0.8, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_extension_fields_regex_grammar_and_vllm_names(client, server):
    r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=10, extra_body={"regex": "(yes|no)!"})
    assert r.choices[0].text in ("yes!", "no!")
    r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=10,
                                  extra_body={"guided_choice": ["a.b", "c+d"]})
    assert r.choices[0].text in ("a.b", "c+d")
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10,
                                       extra_body={"grammar": 'root ::= "ok" [0-9]'})
    assert r.choices[0].message.content[:2] == "ok" and r.choices[0].message.content[2].isdigit()


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_gives_a_valid_call(client, stream):
    kw = dict(model="tiny", messages=ASK, tools=[WEATHER, NOOP], max_tokens=80, temperature=0.9, seed=4,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls, reason = choice.message.tool_calls, choice.finish_reason
        assert choice.message.content is None
    else:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        calls = {}
        for ch in chunks:
            for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] = (tc.function.name if tc.function else None) or entry["name"]
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        calls = [type("C", (), {"id": c["id"], "function": type("F", (), c)})() for c in calls.values()]
    assert reason == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_and_a_tool_result_turn(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, NOOP], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "noop")
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    r = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None


def test_logprobs_are_openai_shaped_and_consistent(client, bundle):
    model = load(bundle)
    for stream in (False, True):
        kw = dict(model="tiny", messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
        if stream:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            text, content = choice.message.content, choice.logprobs.content
        assert len(content) == 8 and text == model.generate(ASK, max_new_tokens=8)
        assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == text
        for e in content:
            assert len(e.top_logprobs) == 5 and e.token == e.top_logprobs[0].token
            assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the chosen one is the top-1
            assert sum(2.718281828 ** t.logprob for t in e.top_logprobs) <= 1 + 1e-6
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and lp.text_offset[0] == 0


def test_n_choices_prefill_the_prompt_once(client, server):
    fresh = [{"role": "user", "content": "A prompt no other test sends"}]  # (nothing of it in the prefix cache)
    r = client.chat.completions.create(model="tiny", messages=fresh, max_tokens=6, n=3, temperature=1.0, seed=9)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    usage = r.model_dump()["usage"]
    assert usage["prefilled_tokens"] == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] / 2  # one prefill for three
    assert usage["completion_tokens"] == 18
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    ends = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert ends == {0: "length", 1: "length"} and chunks[-1].usage.completion_tokens == 8


def test_logit_bias_minus_100_on_the_greedy_token_changes_it(client, bundle):
    model = load(bundle)
    greedy = model.stream(ASK, max_new_tokens=1)
    "".join(greedy)
    first = greedy.stats.token_ids[0]
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1, logprobs=True,
                                       logit_bias={str(first): -100})
    assert model.tokenizer.encode(r.choices[0].message.content, add_special_tokens=False) != [first]


@pytest.mark.parametrize("body, param, code", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "invalid_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}}}}},
     "response_format.json_schema.schema", "invalid_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema", "invalid_type"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
    ({"grammar": "start: nope"}, "grammar", "invalid_grammar"),
    ({"regex": "(x"}, "regex", "invalid_grammar"),
    ({"regex": "x", "response_format": {"type": "json_object"}}, "regex", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                           "properties": {"a": {"type": "nope"}}}}}]},
     "tools[0].function.parameters", "invalid_grammar"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "invalid_value"),
    ({"logprobs": "yes"}, "logprobs", "invalid_type"),
    ({"n": 0}, "n", "invalid_value"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
])
def test_bad_structured_requests_are_400s_naming_the_field(server, body, param, code):
    r = post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"regex": "a+"}, "regex"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
])
def test_diffusion_bundles_refuse_constraints_and_logprobs_naming_the_field(body, param):
    from edgekit.openai_api import APIError, parse
    from edgekit.runtimes.blocks import BlockDiffusionModel

    with pytest.raises(APIError) as e:
        parse({"messages": ASK, **body}, "chat", "m", BlockDiffusionModel.option_names, 100, "block-diffusion")
    assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported_parameter")
    assert "block-diffusion" in e.value.message


def test_the_websocket_route_carries_n_logprobs_and_tool_calls(server):
    import asyncio

    import websockets

    url = server.url.replace("http", "ws") + f"/v1/ws?api_key={KEY}"

    async def run(body):
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps(body))
            out = []
            while (msg := await ws.recv()) != "[DONE]":
                out.append(json.loads(msg))
            return out

    chunks = asyncio.run(run({"type": "chat.completions", "messages": ASK, "max_tokens": 4, "n": 2,
                              "logprobs": True, "top_logprobs": 2}))
    ends = {c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]}
    assert ends == {0, 1} and any(c["choices"][0]["logprobs"] for c in chunks)
    chunks = asyncio.run(run({"type": "chat.completions", "messages": ASK, "max_tokens": 80, "tools": [WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    args = "".join(tc["function"].get("arguments", "") for tc in calls)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
