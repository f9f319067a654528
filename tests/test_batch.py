"""``edgekit batch`` against the real server: a flood through a deliberately small queue (429s happen and are retried),
every prompt answered exactly once, and a run killed halfway resumed without loss or repetition."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_serve import Server

from edgekit.batch import BatchConfig, BatchError, TokenBucket, read_prompts, retry_after, run

N = 200


def _prompts(path: Path, n: int = N, **extra) -> Path:
    lines = [json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"Count to {i % 7}."}],
                         "max_tokens": 4, "temperature": 0, **extra}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _records(path: Path, torn_ok: bool = False) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            assert torn_ok, f"a malformed line in the output: {line!r}"  # (only a kill may leave one, at the end)
    return out


@pytest.fixture(scope="module")
def small_server(llama_bundle):
    s = Server(llama_bundle, "--max-batch", "2", "--max-queue", "2")
    yield s
    s.stop()


def test_a_flood_through_a_small_queue_answers_every_prompt_once(small_server, tmp_path):
    out = tmp_path / "out.jsonl"
    progress = run(_prompts(tmp_path / "in.jsonl"), out, BatchConfig(small_server.url + "/v1", concurrency=16,
                                                                     backoff_base=0.05), show=False)
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(N))  # each exactly once
    assert all(r["status"] == "ok" and r["text"] is not None for r in records)
    assert progress.throttled > 0 and progress.retries >= progress.throttled  # the queue overflowed; retried
    assert max(r["attempts"] for r in records) > 1


def test_a_killed_run_resumes_without_loss_or_repeats(small_server, tmp_path):
    src, out = _prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "edgekit.cli", "batch", str(src), "--url", small_server.url + "/v1", "-o", str(out),
           "--concurrency", "2", "--rate", "80"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < N // 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = len(_records(out, torn_ok=True))
    assert 0 < first < N, first
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"skipped {first}" in done.stderr  # (a line torn by the kill is dropped and its prompt re-run)
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(N))
    assert all(r["status"] == "ok" for r in records)


def test_refused_requests_are_recorded_once_and_not_retried(small_server, tmp_path):
    """A diffusion field sent to an AR bundle is a 400: an error record, one attempt, and a rerun skips it."""
    src, out = _prompts(tmp_path / "in.jsonl", n=3, diffusion_steps=8), tmp_path / "out.jsonl"
    progress = run(src, out, BatchConfig(small_server.url + "/v1"), show=False)
    records = _records(out)
    assert progress.failed == 3 and all(r["http_status"] == 400 and r["attempts"] == 1 for r in records)
    assert "diffusion_steps" in records[0]["error"]
    again = run(src, out, BatchConfig(small_server.url + "/v1"), show=False)
    assert again.skipped == 3 and len(_records(out)) == 3


def test_unreachable_server_gives_up_and_a_rerun_tries_again(tmp_path):
    src, out = _prompts(tmp_path / "in.jsonl", n=2), tmp_path / "out.jsonl"
    cfg = BatchConfig("http://127.0.0.1:9/v1", max_retries=2, backoff_base=0.01)
    progress = run(src, out, cfg, show=False)
    assert progress.failed == 2 and all("gave up after 3 attempts" in r["error"] for r in _records(out))
    assert run(src, out, cfg, show=False).skipped == 0 and len(_records(out)) == 2  # retried, still one line each


@pytest.mark.parametrize("lines, message", [
    (["{not json"], "in.jsonl:1 is not valid JSON"),
    (['{"id": 1}'], "must be an object with 'messages'"),
    (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "repeats id 'a'"),
    ([], "holds no requests"),
])
def test_bad_prompt_files_are_refused_before_anything_is_sent(tmp_path, lines, message):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(BatchError, match=message):
        read_prompts(path)


def test_retry_after_and_the_token_bucket():
    assert retry_after("2") == 2.0 and retry_after(None) is None
    assert 0 <= retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1  # a date in the past: now

    async def take(n: int) -> float:
        bucket = TokenBucket(rate=100, burst=1)
        t0 = time.monotonic()
        for _ in range(n):
            await bucket.take()
        return time.monotonic() - t0

    assert asyncio.run(take(11)) >= 0.09  # 10 waits of 1/100 s after the first token
