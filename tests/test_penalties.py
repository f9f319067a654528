"""OpenAI's presence / frequency penalties and logit_bias: the sampler's arithmetic, the library option, the server
field (and its 400s)."""

from __future__ import annotations

import numpy as np
import pytest
from test_serve import KEY, Server, post

from edgekit.runtimes import load
from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.sampling import SamplingParams, adjusted, sample_next


def test_penalties_follow_openais_formula_over_the_answer_only():
    logits = np.zeros(6, np.float32)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    history = [5, 5, 5, 1, 2, 2, 3]  # prompt [5, 5, 5], answer [1, 2, 2, 3]
    got = adjusted(logits, p, history, prompt_len=3)
    # logit[j] -= count_j * frequency + (count_j > 0) * presence, counts over the answer
    assert got.tolist() == [0.0, -0.75, -1.0, -0.75, 0.0, 0.0]
    assert adjusted(logits, SamplingParams(), history, 3) is logits  # off: untouched


def test_logit_bias_adds_before_the_draw_greedy_and_sampled():
    logits = np.array([3.0, 2.0, 1.0, 0.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample_next(logits, SamplingParams(), rng) == 0
    assert sample_next(logits, SamplingParams().with_overrides(logit_bias={"2": 5}), rng) == 2
    banned = SamplingParams(temperature=1.0).with_overrides(logit_bias={0: -100, 1: -100})
    assert {sample_next(logits, banned, np.random.default_rng(s)) for s in range(50)} <= {2, 3}
    assert SamplingParams().with_overrides(logit_bias={"3": 1, 1: -2}).logit_bias == ((1, -2.0), (3, 1.0))


@pytest.mark.parametrize("kw, message", [
    ({"presence_penalty": 2.5}, "presence_penalty must be a number in \\[-2, 2\\]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be a number"),
    ({"logit_bias": {"1": 101}}, "logit_bias\\['1'\\] must be a number in \\[-100, 100\\]"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "at most 300 tokens"),
    ({"logit_bias": 5}, "logit_bias must map token ids to numbers"),
])
def test_bad_values_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams().with_overrides(**kw)


def test_the_library_option_and_the_vocabulary_bound(llama_bundle):
    model = load(llama_bundle)
    plain = model.generate("Once upon a time", max_new_tokens=8)
    first = model.tokenizer.encode(plain)[0]
    forced = model.stream("Once upon a time", max_new_tokens=4, logit_bias={first + 1: 100})
    "".join(forced)
    assert forced.stats.token_ids == [first + 1] * 4
    repeated = model.stream("a a a a a a", max_new_tokens=12)
    "".join(repeated)
    penalised = model.stream("a a a a a a", max_new_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)
    "".join(penalised)
    assert len(set(penalised.stats.token_ids)) >= len(set(repeated.stats.token_ids))
    with pytest.raises(ConfigError, match=f"beyond this bundle's vocabulary of {model.manifest.vocab_size}"):
        model.generate("x", max_new_tokens=2, logit_bias={model.manifest.vocab_size: 1})


@pytest.fixture(scope="module")
def server(llama_bundle):
    s = Server(llama_bundle, "--api-key", KEY)
    yield s
    s.stop()


def test_the_server_takes_the_fields_as_openai_defines_them(server, llama_bundle):
    model = load(llama_bundle)
    first = model.tokenizer.encode(model.generate("Hello", max_new_tokens=4))[0]
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "logit_bias": {str(first + 7): 100}})
    assert r.status_code == 200, r.text
    assert model.tokenizer.encode(r.json()["choices"][0]["text"]) == [first + 7] * 3
    off = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "logit_bias": {},
                                           "presence_penalty": 0, "frequency_penalty": 0.0})
    assert off.json()["choices"][0]["text"] == model.generate("Hello", max_new_tokens=4)
    for body, field in (({"logit_bias": {"1": 500}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
                        ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": "x"}, None)):
        bad = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, **body})
        assert bad.status_code == 400, bad.text
        if field:
            assert field in bad.json()["error"]["message"], bad.text


def test_the_cli_options(llama_bundle):
    from click.testing import CliRunner

    from edgekit.cli import main

    model = load(llama_bundle)
    first = model.tokenizer.encode(model.generate("Hello", max_new_tokens=2))[0]
    r = CliRunner().invoke(main, ["run", str(llama_bundle), "Hello", "--no-chat", "--max-new-tokens", "3",
                                  "--logit-bias", f"{first + 3}=100", "--presence-penalty", "0.5"])
    assert r.exit_code == 0 and model.tokenizer.encode(r.output.strip("\n")) == [first + 3] * 3, r.output
    bad = CliRunner().invoke(main, ["run", str(llama_bundle), "Hello", "--logit-bias", "198"])
    assert bad.exit_code == 2 and "--logit-bias takes ID=BIAS" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(main, ["run", str(llama_bundle), "Hello", "--frequency-penalty", "9"])
    assert bad.exit_code == 2 and "frequency_penalty must be a number in [-2, 2]" in bad.output
