"""The one interface every loaded bundle implements, AR decoder and dLLM alike: ``Model``, ``Batch``, ``Stats``.

The CLI, parity, the server and the engine talk only to these types; which kind of model a bundle holds is decided
once, in ``loader.load``. A ``Batch`` holds the sequences being generated together (a KV cache row each for AR
models); ``step()`` advances every one of them by one unit: a token for an AR decoder, a committed block for a dLLM.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from edgekit.runtimes.errors import ContextLengthError, UnsupportedOptionError

if TYPE_CHECKING:
    from pathlib import Path

    from edgekit.runtimes.bundle import Manifest
    from edgekit.runtimes.constraints import Vocabulary
    from edgekit.runtimes.sequence import Sequence
    from edgekit.runtimes.tokenizer import Prompt, Tokenizer

FinishReason = Literal["stop", "length", "cancelled", "timeout"]
# what a model's logits at position i predict: token i + 1 (AR, block diffusion teacher-forced) or the token at i
# when it is masked (full-bidirectional dLLMs); how a quality report scores them
Objective = Literal["next_token", "masked"]


@dataclass
class Stats:
    """What one generation did; filled in as it runs, final once it has finished or was closed."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt positions taken from a cache instead of prefilled
    generated_tokens: int = 0  # tokens the model chose, a stop token included
    forward_passes: int = 0  # graph runs that advanced this sequence (a batched step counts once per sequence)
    positions_computed: int = 0  # query rows run through the network for this sequence, summed over its passes
    blocks: int = 0  # committed blocks (dLLMs); 0 for a model that commits one token at a time
    ttft_s: float = 0.0  # arrival -> first committed text (a token, or a dLLM's first block)
    latency_s: float = 0.0  # arrival -> last committed token
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)  # the answer's ids (no stop token)
    forced_tokens: int = 0  # tokens an output constraint forced (appended without a draw: jump-forward)
    compile_s: float = 0.0  # compiling the output constraint (0: none, or a compiled one was reused)
    mask_s: float = 0.0  # computing the constraint's masks (much of it overlapped with graph runs)
    shared_prompt: bool = False  # the prompt's KV was copied from a sibling choice (n > 1), not prefilled
    drafted_tokens: int = 0  # speculative decoding: tokens a drafter proposed ...
    accepted_tokens: int = 0  # ... and those the target kept

    @property
    def decode_s(self) -> float:
        """First committed token -> last."""
        return max(self.latency_s - self.ttft_s, 0.0)

    @property
    def first_block_s(self) -> float:
        return self.ttft_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first commit (what a reader of the stream sees)."""
        first = self.generated_tokens // self.blocks if self.blocks else 1
        rest = self.generated_tokens - first
        return rest / self.decode_s if rest > 0 and self.decode_s > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forward_passes if self.forward_passes else 0.0

    def line(self) -> str:
        """One human-readable summary line (``edgekit run --stats``)."""
        blocks = f" in {self.blocks} blocks" if self.blocks else ""
        if self.drafted_tokens:
            blocks += (f", speculation: {self.accepted_tokens}/{self.drafted_tokens} drafted tokens accepted "
                       f"({self.accepted_tokens / self.drafted_tokens:.0%})")
        if self.compile_s or self.mask_s or self.forced_tokens:
            blocks += (f", constraint: compile {self.compile_s * 1000:.0f} ms, masks {self.mask_s * 1000:.0f} ms, "
                       f"{self.forced_tokens} tokens forced")
        return (f"[{self.prompt_tokens} prompt tokens ({self.reused_prompt_tokens} reused), {self.generated_tokens} "
                f"generated{blocks}, finish={self.finish_reason}, TTFT {self.ttft_s * 1000:.0f} ms, decode "
                f"{self.decode_tokens_per_s:.1f} tok/s, {self.forward_passes} forward passes "
                f"({self.tokens_per_forward:.2f} tokens/forward, {self.positions_computed} positions computed), "
                f"total {self.latency_s * 1000:.0f} ms]")


class TextStream:
    """Iterator over text pieces (always complete UTF-8) with live ``stats`` (and ``logprobs``: one
    ``sampling.TokenLogprob`` per generated token when asked for, else None); ``close()`` cancels generation."""

    def __init__(self, gen: Iterator[str], stats: Stats, logprobs: list[Any] | None = None) -> None:
        self._gen = gen
        self.stats = stats
        self.logprobs = logprobs

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()
        if self.stats.finish_reason is None:
            self.stats.finish_reason = "cancelled"


@dataclass(frozen=True)
class ParitySetting:
    """One generation setting the parity harness runs through the model's own loop with both logits providers.
    ``variants``: alternative settings of the same model (e.g. an approximate cache) whose tokens are compared with
    this setting's (agreement reported, not required)."""

    name: str
    options: Mapping[str, Any]
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class Trace:
    """What one run of a model's generation loop saw and chose: ``steps[i]`` are the logits the i-th decision was
    made on (the first one covers every prompt position for AR models), ``tokens`` the ids generated."""

    steps: list[Any]  # logits arrays (or a stored reference's summaries of them)
    tokens: list[int]


class Batch(Protocol):
    """Sequences generated together. ``admit`` starts one (AR: prefill and its first token), ``step`` advances every
    active one by one unit, ``remove`` drops one (cancelled, timed out) and frees what it held."""

    capacity: int

    @property
    def active(self) -> list[Sequence]: ...

    def admit(self, seq: Sequence) -> None: ...

    def step(self) -> None: ...

    def remove(self, seq: Sequence) -> None: ...


class Model(Protocol):
    """A loaded bundle. ``params`` validates options once (unknown ones are refused, naming the known ones)."""

    kind: str
    objective: Objective
    manifest: Manifest
    tokenizer: Tokenizer
    stop_ids: frozenset[int]
    option_names: frozenset[str]
    parity_settings: tuple[ParitySetting, ...]
    parity_prompts: int

    @property
    def max_context(self) -> int: ...

    @property
    def providers(self) -> list[str]: ...

    def params(self, prompt_len: int, **options: Any) -> Any: ...

    def logits(self, token_ids: Seq[int]) -> Any: ...  # teacher-forced logits [S, V] of a whole sequence

    def new_sequence(self, prompt_ids: Seq[int], params: Any) -> Sequence: ...

    def new_batch(self, max_batch: int = 1, prefix_cache_entries: int = 0) -> Batch: ...

    def stream(self, prompt: Prompt, batch: Batch | None = None, **options: Any) -> TextStream: ...

    def generate(self, prompt: Prompt, **options: Any) -> str: ...

    def trace(self, prompt_ids: Seq[int], options: Mapping[str, Any], reference: Any = None,
              new_tokens: int = 64) -> Trace: ...


class Bundled:
    """What every loaded bundle holds whatever its kind (not a kind itself: each kind's model builds on it): its
    folder, manifest, tokenizer and stop ids, and ``generate`` over the kind's ``stream``."""

    def __init__(self, bundle_dir: Path, manifest: Manifest) -> None:
        from edgekit.runtimes.bundle import bundle_file
        from edgekit.runtimes.tokenizer import Tokenizer

        self.path = bundle_dir
        self.manifest = manifest
        self.tokenizer = Tokenizer(bundle_file(bundle_dir, manifest.tokenizer.file, "tokenizer"), manifest.tokenizer)
        self.stop_ids = frozenset(manifest.tokens.stop_ids)
        self._vocab: Vocabulary | None = None

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    @property
    def vocab(self) -> Vocabulary:
        """The tokenizer as the constraint engine sees it (built on first use): grammars, token bytes."""
        if self._vocab is None:
            from edgekit.runtimes.bundle import bundle_file
            from edgekit.runtimes.constraints import Vocabulary

            self._vocab = Vocabulary(bundle_file(self.path, self.manifest.tokenizer.file, "tokenizer"),
                                     self.manifest.vocab_size, self.stop_ids)
        return self._vocab

    @property
    def providers(self) -> list[str]:
        """The execution providers of the bundle's (first) session, as onnxruntime reports them."""
        graph = getattr(self, "graph", None)
        session = graph.session if graph is not None else getattr(self, "session", None)
        return list(session.get_providers()) if session is not None else []

    def stream(self, prompt: Prompt, batch: Any = None, **options: Any) -> TextStream:
        raise NotImplementedError

    def generate(self, prompt: Prompt, **options: Any) -> str:
        """The whole answer as one string (the options of ``stream``)."""
        return "".join(self.stream(prompt, **options))


def refuse_unknown(model: Model, options: Mapping[str, Any]) -> None:
    """Refuse options the model does not take, naming the ones it does."""
    unknown = set(options) - model.option_names
    if unknown:
        raise UnsupportedOptionError(
            f"Unknown option(s) for this {model.kind} bundle: {', '.join(sorted(unknown))}. "
            f"Known: {', '.join(sorted(model.option_names))}.")


def check_fits(model: Model, prompt_len: int, option: str, new_tokens: int) -> None:
    """Refuse a prompt plus ``new_tokens`` (the ``option`` that set them) that exceeds the bundle's context."""
    if prompt_len + new_tokens > model.max_context:
        raise ContextLengthError(
            f"Prompt of {prompt_len} tokens + {option} {new_tokens} = {prompt_len + new_tokens} exceeds the bundle's "
            f"max context of {model.max_context} tokens. HINT: shorten the prompt or set {option} <= "
            f"{model.max_context - prompt_len}.")


def run_one(batch: Batch, seq: Sequence) -> Iterator[str]:
    """Generate one sequence on ``batch`` and yield its text as it is committed (``Model.stream``'s loop)."""
    try:
        batch.admit(seq)
        while True:
            text = seq.take_text()
            if text:
                yield text
            if seq.done:
                return
            batch.step()
    finally:
        if not seq.done:  # closed early
            batch.remove(seq)
            seq.finish("cancelled")


def stream(model: Model, prompt: Prompt, batch: Batch | None, options: Mapping[str, Any]) -> TextStream:
    """``Model.stream`` for every model: encode, validate, run one sequence."""
    ids = model.tokenizer.encode_prompt(prompt)
    seq = model.new_sequence(ids, model.params(len(ids), **options))
    return TextStream(run_one(batch if batch is not None else model.new_batch(1), seq), seq.stats, seq.logprobs)
