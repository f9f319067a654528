"""``edgekit batch``: run a JSONL file of prompts against an OpenAI-compatible server (``edgekit serve`` or any other)
with bounded concurrency, a token-bucket rate limit, retries that honour 429 / 503 ``Retry-After`` and otherwise back
off exponentially with full jitter, a progress line, and resumable output.

Input: one JSON object per line: ``messages`` (chat) or ``prompt`` (completions), an optional ``id`` (default: the
line number), and any request fields (``max_tokens``, ``temperature``, ``seed``, the diffusion fields
``block_length`` / ``diffusion_steps`` / ``threshold`` / ``entropy_bound``, ...), sent as given. Output: one JSON
object per answered prompt, appended and synced as each completes: ``id``, ``status`` ("ok" or "error"), ``text``,
``finish_reason``, ``usage``, ``attempts``, and ``error`` (with ``http_status`` for prompts the server refused: 4xx
other than 429, not retried). An interrupted run loses nothing that was written; a rerun keeps one final record per
id, skips those ids and runs the rest (requests that ran out of retries included), so each prompt is answered
exactly once.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.runtimes.errors import ConfigError, EdgekitError

RETRYABLE = {429, 500, 502, 503, 504}


class BatchError(EdgekitError):
    """A batch run could not start or finish (bad input file, unreachable server)."""


@dataclass(frozen=True)
class BatchConfig:
    url: str  # the API base, e.g. http://127.0.0.1:8000/v1
    concurrency: int = 8
    rate: float | None = None  # requests per second (token bucket); None: unlimited
    burst: int = 1  # the bucket's capacity
    max_retries: int = 8
    backoff_base: float = 0.25  # s; attempt n waits uniform(0, min(backoff_max, base * 2^n)) without Retry-After
    backoff_max: float = 8.0
    timeout: float = 300.0  # per request, s
    api_key: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0 or (self.rate is not None and self.rate <= 0) or \
                self.burst < 1:
            raise ConfigError(f"batch settings out of range: concurrency {self.concurrency} (>= 1), max_retries "
                              f"{self.max_retries} (>= 0), rate {self.rate} (> 0), burst {self.burst} (>= 1).")


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Every line of the input file as a request, checked before anything is sent."""
    if not path.is_file():
        raise BatchError(f"Prompt file '{path}' does not exist. HINT: pass a JSONL file, one request per line.")
    items, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise BatchError(f"{path}:{n} is not valid JSON ({e}). HINT: one JSON object per line.") from None
        if not isinstance(item, dict) or ("messages" in item) == ("prompt" in item):
            raise BatchError(f"{path}:{n} must be an object with 'messages' (chat) or 'prompt' (completions), "
                             "exactly one of them.")
        item.setdefault("id", str(n))
        item["id"] = str(item["id"])
        if item["id"] in seen:
            raise BatchError(f"{path}:{n} repeats id {item['id']!r}. HINT: ids must be unique (resuming uses them).")
        seen.add(item["id"])
        items.append(item)
    if not items:
        raise BatchError(f"Prompt file '{path}' holds no requests.")
    return items


def settle(path: Path) -> set[str]:
    """Rewrite an existing output file keeping one final record per id (answers, and refusals that a retry cannot
    change); drop records of requests that ran out of retries and a line torn by a kill, so a rerun does those again.
    Returns the ids that are done. (Written to a temporary file and renamed: a kill here loses nothing.)"""
    if not path.exists():
        return set()
    keep: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            key = str(rec["id"])
        except (ValueError, KeyError, TypeError):
            continue
        if rec.get("status") == "ok" or rec.get("http_status") is not None:
            keep.setdefault(key, line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(v + "\n" for v in keep.values()), encoding="utf-8")
    os.replace(tmp, path)
    return set(keep)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``take`` waits for one."""

    def __init__(self, rate: float | None, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = float(burst), clock()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        if self.rate is None:
            return
        async with self._lock:
            while True:
                now = self.clock()
                self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
                self.at = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return None if when is None else max(0.0, when.timestamp() - time.time())


def backoff(attempt: int, cfg: BatchConfig, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(max, base * 2^attempt))."""
    return rng.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** attempt))


@dataclass
class Progress:
    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        done = self.skipped + self.ok + self.failed
        width = 30
        bar = "#" * int(width * done / max(self.total, 1))
        rate = (self.ok + self.failed) / max(time.monotonic() - self.started, 1e-9)
        return (f"\r[{bar:<{width}}] {done}/{self.total} ok {self.ok} failed {self.failed} skipped {self.skipped} "
                f"retries {self.retries} (429: {self.throttled}) {rate:.1f}/s")


async def _one(client: Any, item: dict[str, Any], cfg: BatchConfig, bucket: TokenBucket, progress: Progress,
               rng: random.Random) -> dict[str, Any]:
    body = {k: v for k, v in item.items() if k != "id"}
    body["stream"] = False
    if cfg.model is not None:
        body.setdefault("model", cfg.model)
    path = "/chat/completions" if "messages" in body else "/completions"
    last = ""
    for attempt in range(cfg.max_retries + 1):
        await bucket.take()
        try:
            r = await client.post(cfg.url.rstrip("/") + path, json=body, timeout=cfg.timeout)
        except Exception as e:  # connection refused / reset / timeout: retried
            last = f"{type(e).__name__}: {e}"
            wait = backoff(attempt, cfg, rng)
        else:
            if r.status_code == 200:
                data = r.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice.get("text", "")
                return {"id": item["id"], "status": "ok", "text": text, "finish_reason": choice.get("finish_reason"),
                        "usage": data.get("usage"), "attempts": attempt + 1}
            try:
                last = r.json().get("error", {}).get("message", r.text)
            except ValueError:
                last = r.text[:300]
            if r.status_code not in RETRYABLE:  # the request itself is wrong: retrying cannot help
                return {"id": item["id"], "status": "error", "http_status": r.status_code, "error": last,
                        "attempts": attempt + 1}
            progress.throttled += r.status_code == 429
            hinted = retry_after(r.headers.get("Retry-After"))
            # the server's hint, spread a little so a flood of clients does not return in lockstep
            wait = backoff(attempt, cfg, rng) if hinted is None else hinted * (1 + rng.random() * 0.5)
        if attempt < cfg.max_retries:
            progress.retries += 1
            await asyncio.sleep(wait)
    return {"id": item["id"], "status": "error", "error": f"gave up after {cfg.max_retries + 1} attempts: {last}",
            "attempts": cfg.max_retries + 1}


async def run_async(items: list[dict[str, Any]], out: Path, cfg: BatchConfig, show: bool = True,
                    seed: int | None = None) -> Progress:
    import httpx

    out.parent.mkdir(parents=True, exist_ok=True)
    done = settle(out)
    todo = [it for it in items if it["id"] not in done]
    progress = Progress(total=len(items), skipped=len(items) - len(todo))
    bucket, rng = TokenBucket(cfg.rate, cfg.burst), random.Random(seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for it in todo:
        queue.put_nowait(it)
    with open(out, "a", encoding="utf-8") as f:
        async with httpx.AsyncClient(headers=headers, limits=limits) as client:
            await _drain(queue, client, f, cfg, bucket, progress, rng, show, len(todo))
    if show:
        print(progress.line(), file=sys.stderr, flush=True)
    return progress


async def _drain(queue: asyncio.Queue, client: Any, f: Any, cfg: BatchConfig, bucket: TokenBucket,
                 progress: Progress, rng: random.Random, show: bool, n: int) -> None:
    """``cfg.concurrency`` workers take prompts off the queue; each result is appended and synced as it comes."""

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            result = await _one(client, item, cfg, bucket, progress, rng)
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if result["status"] == "ok":
                progress.ok += 1
            else:
                progress.failed += 1
            if show:
                print(progress.line(), end="", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, max(n, 1)))))


def run(prompts: Path, out: Path, cfg: BatchConfig, show: bool = True) -> Progress:
    """Answer every prompt of ``prompts`` not already in ``out``; return the counts."""
    items = read_prompts(prompts)
    return asyncio.run(run_async(items, out, cfg, show))
