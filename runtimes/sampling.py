"""Next-token selection: greedy, temperature, top-k, top-p, repetition / presence / frequency penalties, logit
bias and an output constraint's mask, seeded for reproducibility; the chosen token's log-probabilities.

Order of operations: logit bias, then Hugging Face ``generate``'s repetition penalty (over prompt and answer), then
OpenAI's presence and frequency penalties (over the answer so far), then the constraint's mask (tokens the grammar
does not allow get -inf), then temperature, top-k, top-p and a draw (greedy takes the argmax of the masked logits).
Log-probabilities (``logprobs``) are those of the distribution drawn from before top-k / top-p: the masked logits
divided by the temperature (by 1 under greedy), log-softmaxed over the whole vocabulary.
The field checks of the draw (``check_draw``) and the top-k / top-p filter (``candidates``) are shared by every
model's settings: the AR sampler here and the dLLM unmasking rules (``unmasking``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgekit.runtimes.constraints import Constraint, from_options
from edgekit.runtimes.errors import ConfigError
from edgekit.runtimes.speculative import accept_draft, check_mode

_NUCLEUS_PROBE = 1024  # candidates examined before falling back to a full sort for top-p
TEMPERATURE_MAX = 2.0  # the OpenAI API's bound, and the one every model and the server validate against


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one generation. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    presence_penalty: float = 0.0  # OpenAI's: minus this once for every token already in the answer
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the answer
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), sorted by id
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    # output constraints (at most one; constraints.py): a JSON schema (canonical JSON text), any JSON object, a regex,
    # a Lark grammar
    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    jump_forward: bool = True  # append the tokens a constraint forces without a draw, fed in one forward
    speculate: str = "off"  # "lookup": prompt-lookup speculative decoding (speculative.py); output unchanged
    logprobs: int | None = None  # None: off; k: the chosen token's log-probability and the k most likely (k <= 20)

    def __post_init__(self) -> None:
        validate(self)

    def with_overrides(self, **kw: Any) -> SamplingParams:
        """Return a copy with the non-None values of ``kw`` applied (and validated)."""
        changes = {k: v for k, v in kw.items() if v is not None}
        if "stop" in changes:
            stop = changes["stop"]
            changes["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if "logit_bias" in changes:
            changes["logit_bias"] = bias_pairs(changes["logit_bias"])
        if "json_schema" in changes:
            changes["json_schema"] = Constraint.json_schema(changes["json_schema"]).source
        return replace(self, **changes)

    @property
    def constraint(self) -> Constraint | None:
        return from_options(self.json_schema, self.json_object, self.regex, self.grammar)

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_defaults(cls, defaults: Mapping[str, Any]) -> SamplingParams:
        known = {k: v for k, v in defaults.items() if k in cls.__dataclass_fields__}
        return cls().with_overrides(**known)


PENALTY_RANGE = (-2.0, 2.0)  # presence / frequency, as OpenAI bounds them
BIAS_RANGE = (-100.0, 100.0)
BIAS_MAX_TOKENS = 300  # OpenAI's limit on logit_bias entries


def bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs, from a mapping (token id -> bias; ids may be decimal strings,
    as JSON object keys are) or pairs; a ConfigError naming the bad entry."""
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = list(items)
    except TypeError:
        raise ConfigError(f"logit_bias must map token ids to numbers, got {bias!r}.") from None
    if len(pairs) > BIAS_MAX_TOKENS:
        raise ConfigError(f"logit_bias may name at most {BIAS_MAX_TOKENS} tokens, got {len(pairs)}.")
    out: dict[int, float] = {}
    for entry in pairs:
        key, value = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)
        tid = int(key) if isinstance(key, str) and key.isdigit() and len(key) < 12 else key
        if not is_integer(tid, 0, TOP_K_MAX):
            raise ConfigError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}.")
        if not is_number(value) or not BIAS_RANGE[0] <= value <= BIAS_RANGE[1]:
            raise ConfigError(f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}.")
        out[tid] = float(value)
    return tuple(sorted(out.items()))


TOP_LOGPROBS_MAX = 20  # OpenAI's bound on top_logprobs
SEED_MAX = 2**63 - 1  # seeds are int64 on every path (numpy's generator, the HTTP API)
TOP_K_MAX = 2**31 - 1


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_integer(x: Any, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def check_draw(p: Any) -> None:
    """The fields every model's sampler takes (AR and dLLM settings alike): temperature, top_k, top_p, seed."""
    if not is_number(p.temperature) or not 0 <= p.temperature <= TEMPERATURE_MAX:
        raise ConfigError(f"temperature must be between 0 and {TEMPERATURE_MAX:g} (0 = greedy), got {p.temperature!r}.")
    if not is_number(p.top_p) or not 0 < p.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {p.top_p!r}.")
    if not is_integer(p.top_k, 0, TOP_K_MAX):
        raise ConfigError(f"top_k must be an integer >= 0 (0 = off) and <= {TOP_K_MAX}, got {p.top_k!r}.")
    if p.seed is not None and not is_integer(p.seed, 0, SEED_MAX):
        raise ConfigError(f"seed must be an integer in [0, 2**63 - 1] or None, got {p.seed!r}.")


def validate(p: SamplingParams) -> None:
    if not is_integer(p.max_new_tokens, 1, 1 << 62):
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {p.max_new_tokens!r}.")
    if p.max_new_tokens > 1_000_000:
        raise ConfigError(f"max_new_tokens must be <= 1000000, got {p.max_new_tokens}.")
    check_draw(p)
    if not is_number(p.repetition_penalty) or not 0 < p.repetition_penalty <= 10:
        raise ConfigError(f"repetition_penalty must be in (0, 10] (1 = off), got {p.repetition_penalty!r}.")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not is_number(value) or not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
            raise ConfigError(f"{name} must be a number in [-2, 2] (0 = off), got {value!r}.")
    if bias_pairs(p.logit_bias) != p.logit_bias:
        raise ConfigError(f"logit_bias must be sorted (token id, bias) pairs, got {p.logit_bias!r}.")
    if not all(isinstance(s, str) and s for s in p.stop):
        raise ConfigError(f"stop must be non-empty strings, got {p.stop!r}.")
    if p.logprobs is not None and not is_integer(p.logprobs, 0, TOP_LOGPROBS_MAX):
        raise ConfigError(f"logprobs must be None (off) or an integer in [0, {TOP_LOGPROBS_MAX}] (how many "
                          f"alternatives to report), got {p.logprobs!r}.")
    for name in ("json_object", "jump_forward"):
        if not isinstance(getattr(p, name), bool):
            raise ConfigError(f"{name} must be a boolean, got {getattr(p, name)!r}.")
    p.constraint  # noqa: B018 (at most one, each of the right type)
    check_mode(p.speculate)


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty on every token seen so far: divide positive logits, multiply negative ones."""
    if penalty == 1.0 or not history:
        return logits
    ids = np.unique(np.asarray(history, dtype=np.int64))
    out = logits.copy()
    picked = out[ids]
    out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(got)), in nats (logits [..., V] each)."""
    lp, lq = log_softmax(np.atleast_2d(ref)), log_softmax(np.atleast_2d(got))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def candidates(scaled: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw may pick from logits [V] already divided by the temperature, and their probabilities
    (renormalised over them): the ``top_k`` largest (0: all), then the smallest most likely set whose mass reaches
    ``top_p`` (1: all). The one top-k / top-p filter of every sampler (AR tokens, dLLM positions)."""
    if top_k and top_k < scaled.shape[0]:
        cand = np.argpartition(-scaled, top_k - 1)[:top_k]
    else:
        cand = np.arange(scaled.shape[0])
    probs = _softmax(scaled[cand])
    if top_p < 1.0:
        cand, probs = _nucleus(cand, probs, top_p)
    return cand, probs


def filtered(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Logits [N, V] (divided by the temperature) with every token outside ``candidates`` of its row at -inf."""
    out = np.asarray(scaled, np.float64)
    if not top_k and top_p >= 1.0:
        return out
    keep = np.full(out.shape, -np.inf)
    for row, logits in enumerate(out):
        cand, _ = candidates(logits, top_k, top_p)
        keep[row, cand] = logits[cand]
    return keep


def apply_openai_penalties(logits: np.ndarray, answer: Sequence[int], presence: float,
                           frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= count_j * frequency + (count_j > 0) * presence, counts over the answer's
    tokens so far (not the prompt)."""
    if (presence == 0.0 and frequency == 0.0) or not answer:
        return logits
    ids, counts = np.unique(np.asarray(answer, dtype=np.int64), return_counts=True)
    out = logits.astype(np.float32, copy=True)
    out[ids] -= (counts * frequency + presence).astype(np.float32)
    return out


def adjusted(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = (), prompt_len: int = 0
             ) -> np.ndarray:
    """The logits a draw picks from, before temperature: logit bias, repetition penalty (over ``history``: prompt
    and answer), presence / frequency penalties (over ``history[prompt_len:]``, the answer)."""
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        ids_arr = np.asarray(ids, np.int64)
        if ids_arr[-1] >= logits.shape[-1]:
            raise ConfigError(f"logit_bias names token {int(ids_arr[-1])}, beyond this vocabulary of "
                              f"{logits.shape[-1]}.")
        logits = logits.astype(np.float32, copy=True)
        logits[ids_arr] += np.asarray(bias, np.float32)
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.presence_penalty == 0.0 and params.frequency_penalty == 0.0:
        return logits  # (no copy of the answer's ids on every decode step)
    return apply_openai_penalties(logits, history[prompt_len:], params.presence_penalty, params.frequency_penalty)


@dataclass(frozen=True)
class TokenLogprob:
    """One chosen token's log-probability and the ``top`` most likely tokens of its position (id, logprob), most
    likely first, under the distribution it was drawn from (see the module's docstring)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_of(scaled: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The entry of ``token`` under logits ``scaled`` [V] (masked and divided by the temperature)."""
    lp = log_softmax(scaled)
    top: tuple[tuple[int, float], ...] = ()
    if k:
        k = min(k, int(np.isfinite(lp).sum()) or 1)
        ids = np.argpartition(-lp, k - 1)[:k]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        top = tuple((int(i), float(lp[i])) for i in ids)
    return TokenLogprob(int(token), float(lp[token]), top)


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: Sequence[int] = (),
           prompt_len: int = 0, allowed: np.ndarray | None = None) -> tuple[int, TokenLogprob | None]:
    """Pick the next token from ``logits`` ([V], float32) and, with ``params.logprobs``, its entry. ``history``:
    prompt + answer so far, of which the first ``prompt_len`` are the prompt (the penalties read it); ``allowed``:
    the constraint's mask [V] (bool), or None."""
    logits = adjusted(logits, params, history, prompt_len)
    if allowed is not None:
        logits = np.where(allowed, logits, np.float32(-np.inf))
    if params.temperature == 0:
        token = int(np.argmax(logits))
    else:
        cand, probs = candidates(logits.astype(np.float64) / params.temperature, params.top_k, params.top_p)
        u = rng.random()
        idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
        token = int(cand[min(idx, len(cand) - 1)])
    return token, _entry(logits, params, token)


def _entry(logits: np.ndarray, params: SamplingParams, token: int) -> TokenLogprob | None:
    """``token``'s log-probability entry under the drawn distribution (``logits`` adjusted and masked), if asked."""
    if params.logprobs is None:
        return None
    return logprob_of(logits.astype(np.float64) / (params.temperature or 1.0), token, params.logprobs)


def verify_draft(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, draft: int,
                 history: Sequence[int] = (), prompt_len: int = 0) -> tuple[bool, int, TokenLogprob | None]:
    """Speculative decoding's check of one drafted token on the target's ``logits`` [V]: greedy keeps it when it is
    the argmax (else the argmax replaces it); sampling keeps it with probability p(draft) under the distribution a
    plain draw would use, else draws from that distribution without it (``speculative.accept_draft``). Returns
    (kept, the token committed, its log-probability entry when asked for)."""
    logits = adjusted(logits, params, history, prompt_len)
    if params.temperature == 0:
        token = int(np.argmax(logits))
        kept = token == draft
    else:
        cand, probs = candidates(logits.astype(np.float64) / params.temperature, params.top_k, params.top_p)
        kept, token = accept_draft(probs, cand, draft, rng)
    return kept, token, _entry(logits, params, token)


def sample_next(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: Sequence[int] = (),
    prompt_len: int = 0,
) -> int:
    """Pick the next token (``choose`` without a constraint or log-probabilities)."""
    return choose(logits, params, rng, history, prompt_len)[0]


def _nucleus(cand: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Smallest set of most likely candidates whose mass reaches ``top_p`` (exact; avoids a full sort if it can)."""
    if len(probs) > _NUCLEUS_PROBE:
        head = np.argpartition(-probs, _NUCLEUS_PROBE - 1)[:_NUCLEUS_PROBE]
        if probs[head].sum() >= top_p:  # the nucleus lies inside the probed head
            cand, probs = cand[head], probs[head]
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    keep = int(np.searchsorted(np.cumsum(sorted_p), top_p, side="left")) + 1
    keep = min(keep, len(order))
    chosen = order[:keep]
    return cand[chosen], probs[chosen]
