"""The async engine in-process: concurrency, aborts free KV blocks, an engine error fails
every affected request (500 over HTTP, /health 503) and nothing hangs; plus the
stop-string hold-back of streamed text."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from heron import LLM, SamplingParams
from heron.config import EngineConfig
from heron.core.async_engine import AsyncLLMEngine, EngineDeadError
from heron.core.outputs import CompletionOutput
from heron.entrypoints.cli import build_parser
from heron.entrypoints.openai.api_server import build_app, build_state
from heron.entrypoints.openai.streaming import ChoiceTracker, held_back_length

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def run(coro, timeout: float = 60):
    """Run a coroutine with a deadline: a hang fails the test instead of blocking it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def engine(tiny_llama):
    e = AsyncLLMEngine.from_config(EngineConfig.create(model=tiny_llama))
    yield e
    e.shutdown()


async def collect(engine, prompt, params, request_id):
    last = None
    async for output in engine.generate(prompt, params, request_id):
        last = output
    return last


def test_held_back_length():
    assert held_back_length("hello wor", ["world"]) == 3
    assert held_back_length("hello", ["world"]) == 0
    assert held_back_length("ab", ["abc", "bcd"]) == 2
    assert held_back_length("xab", ["b", "abz"]) == 2      # a 1-char stop never holds back
    assert held_back_length("anything", []) == 0


def test_choice_tracker_never_sends_what_a_stop_string_removes():
    tracker = ChoiceTracker(["STOP"])

    def out(text, n, reason=None):
        return CompletionOutput(0, text, list(range(n)), None, None, reason)

    assert tracker.advance(out("one ST", 2)).text == "one "
    assert tracker.advance(out("one STO", 3)).text == ""      # new token, nothing safe yet
    assert tracker.advance(out("one STO", 3)) is None
    final = tracker.advance(out("one ", 4, "stop"))             # the engine cut "STOP"
    assert final.text == "" and final.finish_reason == "stop"
    other = ChoiceTracker(["STOP"])
    assert other.advance(out("one ST", 2)).text == "one "
    assert other.advance(out("one STAR", 3)).text == "STAR"    # not a stop after all


def test_concurrent_requests_equal_offline(engine, tiny_llama):
    prompts = [f"w{i} w{i + 1} w{2 * i}" for i in range(16)]
    expected = [o.outputs[0].text for o in LLM(tiny_llama).generate(prompts, GREEDY,
                                                                     use_tqdm=False)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, GREEDY, f"r{i}")
                                      for i, p in enumerate(prompts)))

    outputs = run(main())
    assert [o.outputs[0].text for o in outputs] == expected
    assert all(o.finished for o in outputs)


def test_bad_input_fails_only_that_request(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("bad", "", GREEDY)
        return await collect(engine, "w1 w2", GREEDY, "good")

    assert run(main()).finished and engine.is_healthy


def test_closing_a_stream_aborts_and_frees_blocks(engine):
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main():
        stream = await engine.add_request("long", "w1 w2 w3", long)
        async for output in stream:
            if len(output.outputs[0].token_ids) >= 3:
                break
        assert engine.stats.kv_cache_usage > 0 or engine.engine.has_unfinished_requests()
        stream.close()
        for _ in range(200):
            if not engine.engine.has_unfinished_requests() and engine.stats.kv_cache_usage == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(main())
    assert engine.engine.scheduler.kv.usage() == 0.0


def test_engine_error_fails_requests_and_later_ones(engine):
    calls = {"n": 0}
    real_step = engine.engine.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated device fault")
        return real_step()
    engine.engine.step = failing_step

    async def main():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        results = await asyncio.gather(*(collect(engine, "w1 w2", params, f"r{i}")
                                         for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            await engine.add_request("later", "w1", GREEDY)

    run(main())
    assert not engine.is_healthy and "simulated device fault" in str(engine.dead_error)


def test_shutdown_fails_open_streams(engine):
    async def main():
        stream = await engine.add_request("s", "w1", SamplingParams(max_tokens=400,
                                                                    ignore_eos=True))
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass

    run(main())


def test_http_engine_error_is_500_and_health_503(tiny_llama):
    args = build_parser().parse_args(["serve", tiny_llama, "--served-model-name", "tiny"])
    state = build_state(args)
    app = build_app(state)
    core = state.engine.engine

    def broken_step():
        raise RuntimeError("simulated device fault")

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            core.step = broken_step
            body = {"model": "tiny", "prompt": "w1 w2", "max_tokens": 5}
            first = await client.post("/v1/completions", json=body)
            assert first.status_code == 500 and "simulated" in first.json()["error"]["message"]
            health = await client.get("/health")
            assert health.status_code == 503 and "simulated" in health.text
            later = await client.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "w1"}],
                "chat_template": "{{ messages[0]['content'] }}"})
            assert later.status_code == 500
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            assert streamed.status_code == 500

    try:
        run(main())
    finally:
        state.engine.shutdown()
