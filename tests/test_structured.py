"""Constrained decoding (llguidance), jump-forward, log-probabilities and n > 1 choices in the runtime, on a tiny
random-weight bundle: a random model writes garbage, so every valid output here is the constraint's doing."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

import tiny_models
from edgekit.runtimes import load
from edgekit.runtimes.constraints import Constraint, ConstraintError
from edgekit.runtimes.engine import Engine, Request
from edgekit.runtimes.errors import ConfigError, UnsupportedOptionError
from edgekit.runtimes.model import run_one
from edgekit.runtimes.sampling import SamplingParams, log_softmax
from edgekit.tools import CallStream, call_grammar, check_tools, parse_calls

PROMPT = "Once upon a time"
# bounded schemas: a random model must still finish them within max_new_tokens
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["color", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                      "inner": {"type": "object", "properties": {"x": {"type": "boolean"}},
                                                "required": ["x"], "additionalProperties": False}},
     "required": ["tags", "inner"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"}, "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}},
     "required": ["name"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def model(llama_bundle):
    return load(llama_bundle)


def _answer(model, prompt=PROMPT, **options):
    stream = model.stream(prompt, **options)
    text = "".join(stream)
    return text, stream


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "sampled"])
def test_json_schema_output_parses_and_validates(model, schema, sampling):
    text, stream = _answer(model, json_schema=schema, max_new_tokens=80, **sampling)
    assert stream.stats.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)
    assert stream.stats.compile_s >= 0 and stream.stats.mask_s > 0


def test_regex_and_grammar(model):
    text, s = _answer(model, regex=r"(yes|no), [0-9]{2}", max_new_tokens=20)
    assert re.fullmatch(r"(yes|no), [0-9]{2}", text) and s.stats.finish_reason == "stop"
    text, s = _answer(model, grammar='start: "the answer is " NUM\nNUM: /[1-9][0-9]?/', max_new_tokens=20)
    assert re.fullmatch(r"the answer is [1-9][0-9]?", text), text
    gbnf = 'root ::= "x" ("y" | "z")+ "."'  # llama.cpp's GBNF is taken too
    text, s = _answer(model, grammar=gbnf, max_new_tokens=12, temperature=1.0, seed=1)
    assert re.fullmatch(r"x[yz]+\.", text) or s.stats.finish_reason == "length", text


def test_json_object_is_an_object_when_it_finishes(model):
    for seed in range(4):
        text, s = _answer(model, json_object=True, max_new_tokens=120, temperature=1.0, seed=seed)
        if s.stats.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut at max_new_tokens: a prefix of an object, reported as such
            assert s.stats.finish_reason == "length" and text.startswith("{")


def test_a_grammar_that_cannot_finish_ends_with_length_not_an_invalid_object(model):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 50}}, "required": ["s"]}
    text, s = _answer(model, json_schema=schema, max_new_tokens=10)
    assert s.stats.finish_reason == "length" and len(s.stats.token_ids) == 10
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_jump_forward_appends_forced_tokens_in_fewer_forwards(model):
    schema = {"type": "object", "properties": {"temperature_in_celsius": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9},
                                               "description_of_sky": {"enum": ["clear", "cloudy"]}},
              "required": ["temperature_in_celsius", "description_of_sky"], "additionalProperties": False}
    on, s_on = _answer(model, json_schema=schema, max_new_tokens=80)
    off, s_off = _answer(model, json_schema=schema, max_new_tokens=80, jump_forward=False)
    for text in (on, off):
        jsonschema.validate(json.loads(text), schema)
    assert s_on.stats.forced_tokens > 5 and s_off.stats.forced_tokens == 0
    assert s_on.stats.forward_passes < s_off.stats.forward_passes
    assert s_on.stats.tokens_per_forward > 1.5


def test_batched_constrained_rows_match_single_streams(model):
    """Rows of one batch with different constraints (and jump-forward widths) give what each gives alone."""
    options = [{"json_schema": SCHEMAS[1]}, {"json_schema": SCHEMAS[2]}, {}, {"regex": "[a-c]{4}"}]
    alone = [_answer(model, max_new_tokens=40, **o)[1].stats.token_ids for o in options]
    engine = Engine(model, max_batch=4)
    reqs = []
    for o in options:
        ids = model.tokenizer.encode_prompt(PROMPT)
        req = Request(ids, model.params(len(ids), max_new_tokens=40, **o), lambda ev: None)
        engine.submit(req)
        reqs.append(req)
    while engine.running or engine.waiting:
        engine.step()
    assert [r.seq.stats.token_ids for r in reqs] == alone


def test_logprobs_are_the_drawn_distributions(model):
    text, s = _answer(model, max_new_tokens=6, logprobs=5)
    entries = s.logprobs
    assert len(entries) == len(s.stats.token_ids) == 6
    ids = model.tokenizer.encode_prompt(PROMPT)
    teacher = log_softmax(model.logits(ids + s.stats.token_ids[:-1])[len(ids) - 1:])
    for i, e in enumerate(entries):
        assert e.token == s.stats.token_ids[i] == e.top[0][0]  # greedy: the chosen token is the top-1
        assert e.logprob == pytest.approx(e.top[0][1]) == pytest.approx(teacher[i, e.token], abs=1e-4)
        assert len(e.top) == 5 and sum(np.exp(lp) for _, lp in e.top) <= 1 + 1e-9
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
    # at a temperature, of the scaled distribution; under a constraint, only allowed tokens appear
    _, hot = _answer(model, max_new_tokens=4, logprobs=3, temperature=0.5, seed=0)
    assert all(e.top[0][1] > np.log(0.05) for e in hot.logprobs)
    _, guided = _answer(model, regex="(ab|cd)", max_new_tokens=4, logprobs=20)
    texts = {model.tokenizer.decode([t]) for e in guided.logprobs for t, lp in e.top if lp > -np.inf}
    assert texts <= {"a", "b", "c", "d", "ab", "cd"}, texts


def test_n_choices_share_one_prefill(model):
    ids = model.tokenizer.encode_prompt(PROMPT)
    engine = Engine(model, max_batch=4, prefix_cache_entries=0)
    params = model.params(len(ids), max_new_tokens=8, temperature=1.0, seed=5)
    reqs = [Request(ids, params, lambda ev: None) for _ in range(3)]
    engine.submit(*reqs)
    while engine.running or engine.waiting:
        engine.step()
    stats = [r.seq.stats for r in reqs]
    assert [s.shared_prompt for s in stats] == [False, True, True]
    assert sum(s.prompt_tokens - s.reused_prompt_tokens for s in stats) == len(ids)  # prefilled once
    outs = [tuple(s.token_ids) for s in stats]
    assert len(set(outs)) > 1  # their own random streams
    assert list(outs[0]) == _answer(model, max_new_tokens=8, temperature=1.0, seed=5)[1].stats.token_ids
    # a forked row decodes what a fresh prefill would: greedy siblings are identical
    greedy = [Request(ids, model.params(len(ids), max_new_tokens=8), lambda ev: None) for _ in range(2)]
    engine.submit(*greedy)
    while engine.running or engine.waiting:
        engine.step()
    assert greedy[0].seq.stats.token_ids == greedy[1].seq.stats.token_ids == \
        _answer(model, max_new_tokens=8)[1].stats.token_ids


@pytest.mark.parametrize("kw, error, message", [
    ({"json_schema": {"type": "object", "if": {}}}, ConstraintError, "Unimplemented keys"),
    ({"json_schema": {"type": "objekt"}}, ConstraintError, "json_schema cannot be compiled"),
    ({"json_schema": "{not json"}, ConstraintError, "not valid JSON"),
    ({"json_schema": [1]}, ConstraintError, "must be a JSON object"),
    ({"regex": "(unclosed"}, ConstraintError, "regex cannot be compiled"),
    ({"grammar": "start: missing_rule"}, ConstraintError, "grammar cannot be compiled"),
    ({"regex": "a", "json_object": True}, ConfigError, "Give one output constraint"),
    ({"logprobs": 21}, ConfigError, "logprobs must be None"),
])
def test_bad_constraints_are_errors_naming_the_construct(model, kw, error, message):
    with pytest.raises(error, match=message):
        _answer(model, max_new_tokens=4, **kw)


def test_constraint_options_are_validated_without_compiling():
    assert SamplingParams().with_overrides(json_schema={"b": 1, "a": 2}).json_schema == '{"b":1,"a":2}'  # key order
    assert SamplingParams(regex="x").constraint == Constraint("regex", "x")
    with pytest.raises(ConfigError):
        SamplingParams(jump_forward="yes")


def test_diffusion_bundles_refuse_constraints(tmp_path):
    from edgekit.export.pipeline import ExportConfig, export_bundle
    from edgekit.export.progress import Silent

    src = tiny_models.make_mlm("BertForMaskedLM", tmp_path / "bert")
    bundle = export_bundle(ExportConfig(source=str(src), output=tmp_path / "b"), verify=None,
                           progress=Silent()).path
    dllm = load(bundle)
    with pytest.raises(UnsupportedOptionError, match="json_schema"):
        dllm.generate("The capital of France is", json_schema={"type": "object"})


def test_tool_calls_are_parsed_whole_and_streamed():
    content, calls = parse_calls('Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert content == "Sure." and calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 1}
    assert parse_calls('{"name": "f", "arguments": {}}', ["f"])[1][0].name == "f"  # a bare call of a known tool
    assert parse_calls('{"name": "g", "arguments": {}}', ["f"]) == ('{"name": "g", "arguments": {}}', [])
    assert parse_calls("<tool_call>{broken</tool_call>")[1] == []
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": "<"}}</tool_call> and <tool_call>{"name": "g", ' \
           '"arguments": {}}'
    for cut in (1, 3, 7):
        stream = CallStream(["f", "g"])
        events = [e for i in range(0, len(text), cut) for e in stream.feed(text[i:i + cut])] + list(stream.close())
        content = "".join(v for k, v in events if k == "content")
        assert content == "Hi  and ", (cut, events)
        assert [v.name for k, v in events if k == "call"] == ["f", "g"]


def test_forced_tool_calls_validate_under_random_weights(model):
    tools = check_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                      "maximum": 9}},
        "required": ["city", "days"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "noop"}}])
    for mode, parallel in (("get_weather", False), ("required", True)):
        ids = model.tokenizer.encode_prompt(PROMPT)  # (the tools' rendering would not fit the tiny context)
        params = model.params(len(ids), max_new_tokens=120, grammar=call_grammar(tools, mode, parallel))
        seq = model.new_sequence(ids, params)
        text = "".join(run_one(model.new_batch(1), seq))
        _, calls = parse_calls(text)
        # (a random model may go on calling under parallel calls: every closed call still validates)
        assert calls and (seq.stats.finish_reason == "stop" or parallel), text
        for call in calls:
            schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), schema)
        if mode != "required":
            assert [c.name for c in calls] == [mode]


def test_generic_tool_rendering_for_templates_without_tools(model):
    tools = check_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert not model.tokenizer.renders_tools
    text = model.tokenizer.render_chat(msgs, tools=tools)
    assert '"name": "f"' in text and "<tool_call>" in text and "<tool_response>\n42\n</tool_response>" in text
    assert '{"name": "f", "arguments": {"a": 1}}' in text


def test_the_cli_options(llama_bundle, tmp_path):
    from click.testing import CliRunner

    from edgekit.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[1]))
    r = CliRunner().invoke(main, ["run", str(llama_bundle), "Hi", "--no-chat", "--max-new-tokens", "60",
                                  "--json-schema", str(schema), "--logprobs", "2", "--stats"])
    assert r.exit_code == 0, r.output
    answer = r.stdout.splitlines()[0]
    jsonschema.validate(json.loads(answer), SCHEMAS[1])
    assert "tokens forced" in r.stderr and len(r.stderr.splitlines()) > 3  # the logprob lines and the stats
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "ab" | "cd"')
    r = CliRunner().invoke(main, ["run", str(llama_bundle), "Hi", "--no-chat", "--grammar", str(grammar), "-n", "3",
                                  "--temperature", "1", "--seed", "1", "--stats"])
    assert r.exit_code == 0 and r.stdout.count("--- answer") == 3, r.output
    assert {ln for ln in r.stdout.splitlines() if not ln.startswith("---")} <= {"ab", "cd"}
    for args, message in ((["--regex", "(x"], "regex cannot be compiled"),
                          (["--json-schema", str(tmp_path / "missing.json")], "cannot read"),
                          (["--regex", "a", "--json-object"], "Give one output constraint")):
        bad = CliRunner().invoke(main, ["run", str(llama_bundle), "Hi", *args])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
