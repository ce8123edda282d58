"""Load with preemption, and a disconnect storm, against a real `heron serve`.

256 concurrent streams share a KV cache that holds a fraction of them: every stream
completes with its full token count and the same text as its request run alone, and
preemptions show in /metrics. In bfloat16 on the cpu platform, which declares its greedy
output invariant to batching, preemption and prefix-cache hits. Then most of a
crowd of streams disconnects mid-way: the others finish whole and every block is freed.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from heron import LLM, SamplingParams
from server_utils import RemoteServer

MAX_TOKENS = 24
DTYPE = "bfloat16"
# 4 KiB per block of the tiny model (2 layers x K,V x 16 tokens x 2 heads x 16 x 2 bytes):
# 48 blocks hold 768 tokens, while 256 streams need about 8,000.
KV_BYTES = 48 * 4096


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, 250)}" for _ in range(rng.randint(2, 12)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with RemoteServer(tiny_llama, ["--served-model-name", "tiny", "--dtype", DTYPE,
                                   "--device", "cpu", "--max-model-len", "64",
                                   "--kv-cache-memory-bytes", str(KV_BYTES)]) as s:
        yield s


async def _stream(client: httpx.AsyncClient, prompt: str, stop_after: int | None = None
                  ) -> tuple[str, int] | None:
    """The streamed text and its token count (from the usage chunk); with `stop_after`,
    hang up after that many chunks (None)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    text, chunks, tokens = [], 0, -1
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += [c["text"] for c in chunk["choices"]]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    return None   # leaving the block closes the connection mid-stream
    return "".join(text), tokens


async def _crowd(url: str, jobs: list[tuple[str, int | None]]) -> list[str | None]:
    limits = httpx.Limits(max_connections=len(jobs) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(_stream(client, p, s) for p, s in jobs))


def _metric(server: RemoteServer, prefix: str) -> float:
    return next(v for k, v in server.metrics().items() if k.startswith(prefix))


def test_256_streams_against_a_small_cache_equal_each_request_alone(server, tiny_llama):
    distinct = prompts(64, seed=7)
    alone = LLM(tiny_llama, dtype=DTYPE, device="cpu", max_model_len=64,
                enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = {p: alone.generate([p], params, use_tqdm=False)[0].outputs[0].text
                for p in distinct}   # one at a time: each request alone
    crowd = distinct * 4
    random.Random(1).shuffle(crowd)
    start = time.monotonic()
    texts = asyncio.run(_crowd(server.url, [(p, None) for p in crowd]))
    assert time.monotonic() - start < 240
    assert all(tokens == MAX_TOKENS for _, tokens in texts)
    wrong = [(p, t) for p, (t, _) in zip(crowd, texts) if t != expected[p]]
    assert not wrong, f"{len(wrong)} of 256 differ from the request alone, e.g. {wrong[0]}"
    assert _metric(server, "heron:num_preemptions") > 0, "the cache was meant to be short"


def test_disconnect_storm_frees_every_block_and_spares_the_rest(server, tiny_llama):
    crowd = prompts(60, seed=11)
    jobs = [(p, 2 if i % 3 else None) for i, p in enumerate(crowd)]   # 40 of 60 hang up
    texts = asyncio.run(_crowd(server.url, jobs))
    finished = [t for (p, stop), t in zip(jobs, texts) if stop is None]
    assert len(finished) == 20 and all(tokens == MAX_TOKENS for _, tokens in finished)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_metric(server, "heron:num_requests_running")
                                           or _metric(server, "heron:kv_cache_usage_perc")):
        time.sleep(0.2)
    assert _metric(server, "heron:num_requests_running") == 0
    assert _metric(server, "heron:num_requests_waiting") == 0
    assert _metric(server, "heron:kv_cache_usage_perc") == 0.0
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
