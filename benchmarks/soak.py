"""Soak test: `heron serve` under minutes of mixed traffic, memory sampled, nothing lost.

    .venv/bin/python benchmarks/soak.py --minutes 10            # the embedded model
    .venv/bin/python benchmarks/soak.py --minutes 2 --concurrency 32 -- --kv-cache-memory-bytes 8000000

Starts the server (arguments after `--` go to `heron serve`; by default a KV cache small
enough to preempt) and keeps `--concurrency` clients busy with a mix of streamed and
plain completions and chats, random lengths and sampling settings, clients that
disconnect mid-stream, and malformed requests. A canary, one greedy chat, is sent
again every few seconds and must answer exactly as it did first, whatever the load
and the cache state. The server's resident memory is sampled every second.

Prints one JSON line: requests by kind and outcome, 5xx count, canary mismatches,
tokens served, preemptions (from /metrics), RSS at start, peak and end. It exits
non-zero when a request got a 5xx, a well-formed request failed, a canary changed,
or the server died.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

CANARY = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24,
          "temperature": 0}
TOPICS = ["the sea", "a robot", "bread", "rain in April", "a lighthouse", "chess", "the moon",
          "a small village", "trains", "winter", "copper", "a library"]
# Malformed on purpose: each must be answered with a 4xx, never a 5xx.
BAD_BODIES = [
    {"prompt": "hi", "max_tokens": -3},
    {"prompt": "hi", "temperature": 1e308},
    {"prompt": "hi", "seed": 2 ** 70},
    {"prompt": "hi", "stop": ["x"] * 5000},
    {"messages": [{"role": "user", "content": "\ud800"}]},
    {"prompt": "hi", "top_k": 2 ** 64},
    {"prompt": "hi", "n": 10 ** 6},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Soak:
    def __init__(self, url: str, model: str, seed: int) -> None:
        self.url, self.model = url, model
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.tokens = 0
        self.canary_text: str | None = None
        self.canary_checks = self.canary_mismatches = 0

    def record(self, kind: str, status: int, expect_ok: bool = True) -> None:
        self.outcomes[f"{kind} {status}"] += 1
        if status >= 500 or (expect_ok and status != 200) or (not expect_ok and status < 400):
            self.failures.append(f"{kind}: HTTP {status}")

    def request_body(self) -> tuple[str, str, dict]:
        """(kind, path, body) of one well-formed request."""
        topic = self.rng.choice(TOPICS)
        body = {"model": self.model, "max_tokens": self.rng.choice([8, 32, 64, 128]),
                "temperature": self.rng.choice([0, 0.7, 1.0]), "seed": self.rng.randrange(1000)}
        if self.rng.random() < 0.5:
            body["messages"] = [{"role": "user", "content": f"Tell me about {topic}."}]
            path, kind = "/v1/chat/completions", "chat"
        else:
            body["prompt"] = f"A short story about {topic}:" * self.rng.randint(1, 12)
            path, kind = "/v1/completions", "completion"
        if self.rng.random() < 0.5:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            kind += "-stream"
        return kind, path, body

    async def one_request(self, client: httpx.AsyncClient) -> None:
        roll = self.rng.random()
        if roll < 0.05:
            body = dict(self.rng.choice(BAD_BODIES), model=self.model)
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = await client.post(path, content=json.dumps(body, ensure_ascii=False).encode(
                "utf-8", "surrogatepass"), headers={"content-type": "application/json"})
            self.record("malformed", r.status_code, expect_ok=False)
            return
        kind, path, body = self.request_body()
        if not body.get("stream"):
            r = await client.post(path, json=body)
            self.record(kind, r.status_code)
            if r.status_code == 200:
                self.tokens += r.json()["usage"]["completion_tokens"]
            return
        disconnect_after = self.rng.randint(1, 6) if roll < 0.15 else None
        async with client.stream("POST", path, json=body) as r:
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks += 1
                data = json.loads(line[6:])
                if data.get("usage"):
                    self.tokens += data["usage"]["completion_tokens"]
                if disconnect_after is not None and chunks >= disconnect_after:
                    break                     # the client goes away mid-stream
            self.record(kind + ("-disconnect" if disconnect_after else ""), r.status_code)

    async def canary(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/chat/completions", json=dict(CANARY, model=self.model))
        self.record("canary", r.status_code)
        if r.status_code != 200:
            return
        text = r.json()["choices"][0]["message"]["content"]
        if self.canary_text is None:
            self.canary_text = text
        self.canary_checks += 1
        if text != self.canary_text:
            self.canary_mismatches += 1
            self.failures.append(f"canary changed: {self.canary_text!r} -> {text!r}")


async def drive(soak: Soak, seconds: float, concurrency: int) -> None:
    deadline = time.monotonic() + seconds
    timeout = httpx.Timeout(600.0)
    async with httpx.AsyncClient(base_url=soak.url, timeout=timeout) as client:
        await soak.canary(client)

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    await soak.one_request(client)
                except httpx.HTTPError as e:
                    soak.failures.append(f"transport: {type(e).__name__}: {e}")

        async def canaries() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(5)
                await soak.canary(client)

        await asyncio.gather(canaries(), *(worker() for _ in range(concurrency)))


def metric(url: str, name: str) -> float | None:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("serve_args", nargs="*", help="after --: arguments for heron serve")
    args = ap.parse_args()
    serve_args = args.serve_args or ["--kv-cache-memory-bytes", str(24 * 2**20),
                                     "--max-model-len", "1024"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("heron")
    command = ([str(exe)] if exe.exists() else [sys.executable, "-m", "heron.entrypoints.cli"])
    command += ["serve", *([args.model] if args.model else []), "--port", str(port),
                "--disable-uvicorn-access-log", *serve_args]
    log = tempfile.NamedTemporaryFile("w+", prefix="heron-soak-", suffix=".log", delete=False)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HERON_API_KEY=""))
    samples: list[int] = []
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"heron serve exited early; log: {log.name}")
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        soak = Soak(url, model, args.seed)
        start_rss = rss_bytes(proc.pid)

        async def run() -> None:
            async def sample_memory() -> None:
                while True:
                    samples.append(rss_bytes(proc.pid))
                    await asyncio.sleep(1)
            sampler = asyncio.create_task(sample_memory())
            try:
                await drive(soak, args.minutes * 60, args.concurrency)
            finally:
                sampler.cancel()

        began = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - began
        alive = proc.poll() is None and httpx.get(url + "/health", timeout=10).status_code == 200
        summary = {
            "minutes": round(elapsed / 60, 2), "concurrency": args.concurrency,
            "requests": sum(soak.outcomes.values()), "outcomes": dict(sorted(soak.outcomes.items())),
            "server_errors_5xx": sum(n for k, n in soak.outcomes.items()
                                     if int(k.rsplit(" ", 1)[1]) >= 500),
            "failures": soak.failures[:10], "num_failures": len(soak.failures),
            "canary_checks": soak.canary_checks, "canary_mismatches": soak.canary_mismatches,
            "completion_tokens": soak.tokens, "output_tok_per_s": round(soak.tokens / elapsed, 1),
            "preemptions": metric(url, "heron:num_preemptions"),
            "rss_mib_start": round(start_rss / 2**20, 1),
            "rss_mib_peak": round(max(samples, default=0) / 2**20, 1),
            "rss_mib_end": round(rss_bytes(proc.pid) / 2**20, 1), "healthy_at_end": alive,
            "server_log": log.name,
        }
        print(json.dumps(summary))
        return 0 if alive and not soak.failures else 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
