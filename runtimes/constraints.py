"""Constrained decoding: output that matches a JSON schema, any JSON object, a regex or a Lark grammar.

Built on llguidance (the engine onnxruntime-genai and llama.cpp use; Rust, torch-free, a wheel for aarch64 too),
never on a hand-written parser. ``Vocabulary`` is the bundle's own tokenizer as llguidance sees it (byte-level BPE
and SentencePiece-style vocabularies from ``tokenizer.json``; special tokens are never allowed by a grammar, the
bundle's stop tokens only where the grammar may end). ``Constraint`` is what a request asks for; ``Guide`` one
sequence's matcher: the allowed-token mask of the next position, the tokens the grammar forces from here
(jump-forward), and the tokens chosen. ``masks`` computes the masks of a batch's rows in parallel in llguidance's
thread pool, without the GIL, so the graph run can go on meanwhile (``MaskJob``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgekit.runtimes.errors import ConfigError, EdgekitError

Kind = Literal["json_object", "json_schema", "regex", "grammar"]
KINDS: tuple[Kind, ...] = ("json_object", "json_schema", "regex", "grammar")
# JSON is written compactly (no free whitespace): fewer tokens, and a small model cannot loop on blank lines
JSON_OPTIONS = {"whitespace_flexible": False}
_COMPILED_CACHE = 64  # compiled grammars kept per vocabulary (a matcher per request is a cheap copy of one)


class ConstraintError(ConfigError):
    """A schema, regex or grammar the engine cannot compile (names the construct)."""

    code = "invalid_grammar"


class ConstraintUnavailableError(EdgekitError):
    """llguidance is not installed."""

    http_status = 501
    code = "constraints_unavailable"


def _llg() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConstraintUnavailableError(
            "Constrained decoding (json_schema, json_object, regex, grammar, forced tool calls) needs the llguidance "
            "package, which is not installed. HINT: pip install 'llguidance>=1.9,<2'.") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``source``: the schema as canonical JSON, the regex, or the Lark grammar."""

    kind: Kind
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if self.kind != "json_object" and (not isinstance(self.source, str) or not self.source.strip()):
            raise ConstraintError(f"The {self.kind} constraint is empty. HINT: pass a non-empty {self.kind}.")

    @classmethod
    def json_schema(cls, schema: Any) -> Constraint:
        """From a schema (a mapping or its JSON text); checked to be a JSON object here, compiled on first use."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}.") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, Mapping):
            raise ConstraintError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}.")
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))  # (key order kept: it is the output's)

    def grammar(self) -> str:
        """The llguidance grammar text (its JSON form) of this constraint."""
        m = _llg().LLMatcher
        if self.kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            return m.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return m.grammar_from_regex(self.source)
        from llguidance.gbnf_to_lark import any_to_lark  # (llama.cpp's GBNF is converted; Lark passes through)

        try:
            lark = any_to_lark(self.source)
        except Exception as e:  # (the converter raises its own parse errors)
            raise ConstraintError(f"The grammar (GBNF) cannot be read: {_error_line(str(e))}.") from None
        return m.grammar_from_lark(lark)

    def describe(self) -> str:
        return self.kind if self.kind == "json_object" else f"{self.kind} {_short(self.source)}"


def from_options(json_schema: Any = None, json_object: bool = False, regex: str | None = None,
                 grammar: str | None = None) -> Constraint | None:
    """The one constraint the options name (at most one may be given), or None."""
    given = [name for name, v in (("json_schema", json_schema), ("json_object", json_object or None),
                                  ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"Give one output constraint, got {' and '.join(given)}.")
    if json_schema is not None:
        return Constraint.json_schema(json_schema)
    if json_object:
        return Constraint("json_object")
    if regex is not None:
        if not isinstance(regex, str):
            raise ConstraintError(f"regex must be a string, got {type(regex).__name__}.")
        return Constraint("regex", regex)
    if grammar is not None:
        if not isinstance(grammar, str):
            raise ConstraintError(f"grammar must be a Lark grammar string, got {type(grammar).__name__}.")
        return Constraint("grammar", grammar)
    return None


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class Vocabulary:
    """The bundle's tokenizer as llguidance's ``LLTokenizer`` (built once per model, on first use), the compiled
    grammars of recent constraints, and the thread pool that computes a batch's masks."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, stop_ids: Iterable[int]) -> None:
        self.path, self.vocab_size = tokenizer_json, vocab_size
        self.stop_ids = sorted(set(stop_ids))
        self._tok: Any = None
        self._executor: Any = None
        self._compiled: OrderedDict[Constraint, tuple[Any, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                llg = _llg()
                try:
                    self._tok = llg.LLTokenizer(str(self.path), n_vocab=self.vocab_size,
                                                eos_token=self.stop_ids or None)
                except Exception as e:  # (llguidance raises ValueError / RuntimeError on a tokenizer it cannot read)
                    raise ConstraintUnavailableError(
                        f"llguidance cannot read this bundle's tokenizer '{self.path}': {e}. Constrained decoding is "
                        "unavailable for it.") from None
                self._executor = llg.LLExecutor()
            return self._tok

    def special_token(self, text: str) -> int | None:
        """The id of the one token that spells ``text`` if it is special to the engine (a grammar names it as
        ``<[id]>``), else None."""
        ids = self.tokenizer.tokenize_str(text, parse_special=True)
        return int(ids[0]) if len(ids) == 1 and self.tokenizer.is_special_token(int(ids[0])) else None

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE piece, a SentencePiece piece with its space, <0xNN>)."""
        return bytes(self.tokenizer.decode_bytes([int(token)]))

    def compile(self, constraint: Constraint) -> tuple[Any, float]:
        """A matcher in the constraint's start state to copy from, and the seconds compiling it took (0 when it was
        cached); a ConstraintError naming what llguidance could not compile."""
        tok = self.tokenizer
        with self._lock:
            hit = self._compiled.get(constraint)
            if hit is not None:
                self._compiled.move_to_end(constraint)
                return hit[0], 0.0
        t0 = time.perf_counter()
        try:
            grammar = constraint.grammar()
        except ValueError as e:
            raise ConstraintError(f"The {constraint.kind} cannot be compiled: {e}.") from None
        matcher = _llg().LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"The {constraint.kind} cannot be compiled: {_error_line(matcher.get_error())}. "
                                  f"HINT: {_HINTS[constraint.kind]}")
        took = time.perf_counter() - t0
        with self._lock:
            self._compiled[constraint] = (matcher, took)
            while len(self._compiled) > _COMPILED_CACHE:
                self._compiled.popitem(last=False)
        return matcher, took

    def guide(self, constraint: Constraint) -> Guide:
        template, took = self.compile(constraint)
        return Guide(self, template.deep_copy(), constraint, took)

    def masks(self, guides: Sequence[tuple[Guide, int]], rows: int) -> np.ndarray:
        """Allowed-token masks [rows, V] (bool) for the given (guide, row) pairs, computed in parallel (rows not named
        stay all-allowed)."""
        t0 = time.perf_counter()
        bits = np.full((rows, (self.vocab_size + 31) // 32), -1, np.int32)
        pending = [(g.matcher, row) for g, row in guides if not g.matcher.is_stopped()]
        if pending:
            _ = self.tokenizer
            self._executor.unsafe_compute_mask_ptr(pending, bits.ctypes.data, bits.shape[1] * 4, rows)
        for g, row in guides:
            if g.matcher.is_stopped():  # only an end is left: the stop tokens
                bits[row] = 0
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size].astype(bool)
        for g, row in guides:
            if g.matcher.is_accepting() or g.matcher.is_stopped():
                allowed[row, self.stop_ids] = True
        took = (time.perf_counter() - t0) / max(len(guides), 1)
        for g, _ in guides:
            g.mask_s += took
        return allowed


_HINTS = {
    "json_schema": "check the schema; the keywords llguidance implements are listed at "
                   "https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md",
    "json_object": "this should not happen; report it",
    "regex": "check the regex (Rust regex syntax, no look-around or back-references)",
    "grammar": "check the Lark grammar (llguidance's Lark dialect; https://github.com/guidance-ai/llguidance/blob/"
               "main/docs/syntax.md)",
}


def _error_line(message: str) -> str:
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    return _short(" ".join(lines[:3]), 300) if lines else "unknown error"


class Guide:
    """One sequence's grammar state. ``consume`` every committed token; ``forced`` lists the tokens the grammar
    allows no alternative to from here; ``finished``: nothing but an end is allowed any more."""

    def __init__(self, vocab: Vocabulary, matcher: Any, constraint: Constraint, compile_s: float) -> None:
        self.vocab, self.matcher, self.constraint, self.compile_s = vocab, matcher, constraint, compile_s
        self.mask_s = 0.0  # time spent computing this sequence's masks (stats)

    def consume(self, token: int) -> None:
        if int(token) in self.vocab.stop_ids:
            return
        if not self.matcher.consume_token(int(token)):
            raise EdgekitError(f"The grammar rejected token {token} it had allowed: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        """Tokens the grammar forces next (a JSON key, a closing bracket), to append without sampling."""
        if self.matcher.is_stopped():
            return []
        forced = [int(t) for t in self.matcher.compute_ff_tokens()]
        # (the forced bytes are tokenized the tokenizer's way, which may pick an added token the grammar does not
        # take as text, e.g. Qwen's <tool_call>: keep the prefix the matcher accepts)
        return forced[: self.matcher.validate_tokens(forced)] if forced else forced

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())

    def allowed(self) -> np.ndarray:
        """The mask of the next position alone (single sequences; batches use ``Vocabulary.masks``)."""
        return self.vocab.masks([(self, 0)], 1)[0]


class MaskJob:
    """The masks of a batch's constrained rows, computed on a helper thread while the caller runs the graph
    (llguidance and onnxruntime both release the GIL); ``result()`` waits for them."""

    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekit-masks")

    def __init__(self, vocab: Vocabulary, guides: Sequence[tuple[Guide, int]], rows: int) -> None:
        self._future: Future[np.ndarray] = self._pool.submit(vocab.masks, list(guides), rows)

    def result(self) -> np.ndarray:
        return self._future.result()
