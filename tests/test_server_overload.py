"""A server with more clients than its waiting queue holds: the surplus gets 503 with
Retry-After at once, everyone admitted gets a whole answer, and the server stays healthy."""
from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from heron.core.async_engine import AsyncLLMEngine

from server_utils import RemoteServer

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_llama):
    with RemoteServer(tiny_llama, ["--served-model-name", "tiny", "--max-num-seqs", "2",
                                   "--max-waiting-requests", "2"]) as s:
        yield s


def _stream(url: str, i: int) -> tuple[int, dict[str, str], str]:
    body = {"model": "tiny", "prompt": f"w{5 + i} w9", "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
        return reply.status_code, dict(reply.headers), "".join(reply.iter_text())


def test_surplus_requests_get_503_with_retry_after(server):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _stream(server.url, i), range(16)))
    refused = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert len(refused) + len(served) == 16, [r[0] for r in results]
    assert refused, "16 clients against 2 running + 2 waiting places: some must be refused"
    assert len(served) >= 2   # at least the waiting places were given (more as requests ran)
    for _, headers, text in refused:
        assert headers["retry-after"] == "1"
        assert "waiting for a place in the batch" in text
    for _, _, text in served:   # every admitted stream ran to its end
        chunks = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: {")]
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == MAX_TOKENS
        assert text.rstrip().endswith("data: [DONE]")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    again = _stream(server.url, 0)   # room again once the crowd is gone
    assert again[0] == 200


def test_max_waiting_requests_must_be_positive():
    with pytest.raises(ValueError, match="max_waiting_requests"):
        AsyncLLMEngine(lambda: None, max_waiting_requests=0)  # type: ignore[arg-type,return-value]
