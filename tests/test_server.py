"""`heron serve` on the tiny model, driven by the official openai client (sync and async,
streaming and not): answers equal the offline `LLM` API, 32+ concurrent streams all
complete, and a client that drops its stream leaves no KV blocks in use."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from heron import LLM, SamplingParams
from server_utils import TINY_CHAT_TEMPLATE, RemoteServer

MODEL = "tiny"
PROMPTS = [f"w{i} w{(i * 7) % 250} w{(i * 13) % 250} w{(i * 29) % 250}" for i in range(40)]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with RemoteServer(tiny_llama, ["--served-model-name", MODEL, "--chat-template",
                                   TINY_CHAT_TEMPLATE, "--seed", "0"],
                      api_key="sk-heron-test") as s:
        yield s


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama)


def offline(llm, prompts, **params):
    outs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
    return [[c.text for c in o.outputs] for o in outs]


def greedy(llm, prompts, max_tokens):
    return [texts[0] for texts in offline(llm, prompts, temperature=0.0, max_tokens=max_tokens)]


def test_models_health_version(server):
    client = server.openai()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version", headers=server.headers()).json()["version"]


def test_completions_sync_equal_offline(server, llm):
    prompts = PROMPTS[:4]
    result = server.openai().completions.create(model=MODEL, prompt=prompts, max_tokens=12,
                                                temperature=0)
    assert [c.text for c in sorted(result.choices, key=lambda c: c.index)] == \
        greedy(llm, prompts, 12)
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage.prompt_tokens == 16 and result.usage.completion_tokens == 48
    assert result.usage.total_tokens == 64 and result.id.startswith("cmpl-")


def test_completions_sync_stream_with_usage(server, llm):
    stream = server.openai().completions.create(
        model=MODEL, prompt=PROMPTS[5], max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    assert text == greedy(llm, [PROMPTS[5]], 20)[0]
    assert finish == "length"
    assert usage.prompt_tokens == 4 and usage.completion_tokens == 20


def test_completions_async_stream_and_not(server, llm):
    async def run():
        async with server.async_openai() as client:
            return await both(client)

    async def both(client):
        full = await client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=15,
                                               temperature=0)
        text = ""
        async for chunk in await client.completions.create(
                model=MODEL, prompt=PROMPTS[6], max_tokens=15, temperature=0, stream=True):
            text += "".join(c.text for c in chunk.choices)
        return full.choices[0].text, text

    full, streamed = asyncio.run(run())
    assert full == streamed == greedy(llm, [PROMPTS[6]], 15)[0]


def test_token_id_prompt_echo_and_logprobs(server, llm):
    ids = llm.get_tokenizer().encode(PROMPTS[7])
    result = server.openai().completions.create(model=MODEL, prompt=ids, max_tokens=6,
                                                temperature=0, echo=True, logprobs=2)
    choice = result.choices[0]
    expected = llm.generate([{"prompt_token_ids": ids}],
                            SamplingParams(temperature=0, max_tokens=6, logprobs=2),
                            use_tqdm=False)[0].outputs[0]
    assert choice.text == llm.get_tokenizer().decode(ids) + expected.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None
    for got, position, token in zip(lp.token_logprobs[len(ids):], expected.logprobs,
                                    expected.token_ids):
        assert got == pytest.approx(position[token].logprob, abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])


def test_seeded_sampling_and_n(server, llm):
    params = dict(temperature=0.9, top_p=0.95, top_k=40, min_p=0.01, presence_penalty=0.3,
                  frequency_penalty=0.2, repetition_penalty=1.1, seed=7, max_tokens=10)
    body = {k: v for k, v in params.items() if k not in ("top_k", "min_p", "repetition_penalty")}
    extra = {"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1}
    client = server.openai()
    result = client.completions.create(model=MODEL, prompt=PROMPTS[8], n=3, extra_body=extra,
                                       **body)
    texts = [c.text for c in sorted(result.choices, key=lambda c: c.index)]
    assert texts == offline(llm, [PROMPTS[8]], n=3, **params)[0]
    streamed = ["", "", ""]
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[8], n=3, stream=True,
                                           extra_body=extra, **body):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts


def test_stop_string_is_never_streamed(server, llm):
    full = greedy(llm, [PROMPTS[9]], 30)[0]
    stop = full[len(full) // 2:len(full) // 2 + 4]   # spans token boundaries
    expected = offline(llm, [PROMPTS[9]], temperature=0, max_tokens=30, stop=[stop])[0][0]
    assert stop not in expected
    text, seen, reason = "", [], None
    for chunk in server.openai().completions.create(model=MODEL, prompt=PROMPTS[9],
                                                    max_tokens=30, temperature=0, stop=[stop],
                                                    stream=True):
        for c in chunk.choices:
            text += c.text
            seen.append(text)
            reason = c.finish_reason or reason
    assert text == expected and reason == "stop"
    # Every intermediate state is a prefix of the answer: no part of the stop string leaked.
    assert all(expected.startswith(s) for s in seen)


def test_chat_sync_async_stream_equal_offline(server, llm):
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False,
                        chat_template=TINY_CHAT_TEMPLATE)[0].outputs[0].text
    client = server.openai()
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            temperature=0, logprobs=True, top_logprobs=2)
    assert result.choices[0].message.content == expected
    assert result.choices[0].message.role == "assistant"
    assert len(result.choices[0].logprobs.content) == 10
    assert all(len(t.top_logprobs) == 2 for t in result.choices[0].logprobs.content)
    assert result.usage.completion_tokens == 10 and result.id.startswith("chatcmpl-")
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=messages,
                                                max_completion_tokens=10, temperature=0,
                                                stream=True):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == expected

    async def run():
        async with server.async_openai() as aclient:
            return await chat(aclient)

    async def chat(aclient):
        full = await aclient.chat.completions.create(model=MODEL, messages=messages,
                                                     max_tokens=10, temperature=0)
        parts: dict[int, str] = {0: "", 1: ""}
        usage = None
        async for chunk in await aclient.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=10, temperature=0, n=2,
                stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
            for c in chunk.choices:
                parts[c.index] += c.delta.content or ""
        return full.choices[0].message.content, parts, usage

    full, parts, usage = asyncio.run(run())
    assert full == expected and parts == {0: expected, 1: expected}
    assert usage.completion_tokens == 20


def test_tokenize_detokenize(server, llm):
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "w5 w6"},
                        headers=server.headers()).json()
    assert tokens["tokens"] == llm.get_tokenizer().encode("w5 w6")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]},
                      headers=server.headers()).json()
    assert back["prompt"] == "w5 w6"


def test_many_concurrent_streams_complete_and_correct(server, llm):
    prompts = PROMPTS[:40]
    expected = [t[0] for t in offline(llm, prompts, temperature=0, max_tokens=24,
                                      ignore_eos=True)]

    async def one(client, prompt):
        text, usage, reason = "", None, None
        async for chunk in await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            usage = chunk.usage or usage
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
        return text, usage.completion_tokens, reason

    async def run():
        async with server.async_openai() as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run())
    assert [r[0] for r in results] == expected
    assert [(r[1], r[2]) for r in results] == [(24, "length")] * len(prompts)


def test_dropped_stream_frees_kv_blocks(server):
    before = server.metrics().get("heron:request_success_total[abort]", 0.0)
    body = {"model": MODEL, "prompt": PROMPTS[11], "max_tokens": 480, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()   # kept open: leaving it early closes the socket
            chunks = 0
            while chunks < 3:
                chunks += next(lines).startswith("data:")
            busy = server.metrics()
            assert busy["heron:kv_cache_usage_perc"] > 0
            assert busy["heron:num_requests_running"] == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["heron:kv_cache_usage_perc"] == 0 and m["heron:num_requests_running"] == 0:
            break
        time.sleep(0.05)
    assert m["heron:kv_cache_usage_perc"] == 0 and m["heron:num_requests_running"] == 0
    assert m["heron:num_requests_waiting"] == 0
    assert m["heron:request_success_total[abort]"] == before + 1


def test_metrics_names(server):
    server.openai().completions.create(model=MODEL, prompt=PROMPTS[12], max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    for name in ("heron:num_requests_running", "heron:num_requests_waiting",
                 "heron:kv_cache_usage_perc", "heron:prefix_cache_hit_rate",
                 "heron:prompt_tokens_total", "heron:generation_tokens_total",
                 "heron:time_to_first_token_seconds_bucket",
                 "heron:time_per_output_token_seconds_bucket",
                 "heron:e2e_request_latency_seconds_bucket", "heron:request_success_total",
                 "heron:num_preemptions_total"):
        assert name in text, name
    m = server.metrics()
    assert m["heron:request_success_total[length]"] >= 1
    assert m["heron:generation_tokens_total"] >= 5 and m["heron:prompt_tokens_total"] >= 4
