"""`heron serve` with no MODEL serves the embedded SmolLM2-135M-Instruct: real text,
greedy answers equal to the offline API, stop strings cut cleanly while streaming.

Both sides run the defaults (bfloat16, prefix caching on): the server's requests hit
prefixes cached by earlier ones and the offline reference's do not, and the text
must still be the same: the cpu platform declares these invariances (any device runs
heron.testing.conformance against what it declares)."""
from __future__ import annotations

import asyncio
import gc

import pytest

from heron import LLM, SamplingParams
from server_utils import RemoteServer

pytestmark = pytest.mark.slow

NAME = "SmolLM2-135M-Instruct"
ENGINE_ARGS = ["--max-model-len", "2048", "--device", "cpu"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
QUESTION = [{"role": "user", "content": "What is the tallest mountain on Earth?"}]


@pytest.fixture(scope="module")
def expected(smollm2_path):
    """Offline answers, computed before the server starts (two engines would share 2 cores)."""
    llm = LLM(smollm2_path, max_model_len=2048, device="cpu")
    greedy = SamplingParams(temperature=0, max_tokens=24)
    out = {"completions": [llm.generate(p, greedy, use_tqdm=False)[0].outputs[0]
                           for p in PROMPTS],   # one at a time, as the server will see them
           "chat": llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32),
                            use_tqdm=False)[0].outputs[0].text}
    full = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=40),
                        use_tqdm=False)[0].outputs[0].text
    words = full.split()
    out["stop"] = stop = " " + words[len(words) // 2]   # a word in the middle, with its space
    out["stopped"] = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=40,
                                                             stop=stop),
                                  use_tqdm=False)[0].outputs[0].text
    assert stop not in out["stopped"] and full.startswith(out["stopped"])
    del llm
    gc.collect()
    return out


@pytest.fixture(scope="module")
def server(expected):
    with RemoteServer(None, ENGINE_ARGS) as s:   # no MODEL: the embedded default
        yield s


def test_default_model_name(server):
    assert [m.id for m in server.openai().models.list().data] == [NAME]


def test_greedy_completions_equal_offline(server, expected):
    client = server.openai()
    for prompt, want in zip(PROMPTS, expected["completions"]):
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
        assert any(c.isalpha() for c in want.text)


def test_chat_equal_offline_streaming_and_not(server, expected):
    want = expected["chat"]
    client = server.openai()
    full = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=32,
                                          temperature=0)
    assert full.choices[0].message.content == want and " " in want
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=32, temperature=0, stream=True) if c.choices)
    assert streamed == want


def test_stop_string_in_real_text(server, expected):
    stop, want = expected["stop"], expected["stopped"]

    async def run():
        async with server.async_openai() as client:
            seen, text = [], ""
            async for chunk in await client.completions.create(
                    model=NAME, prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop],
                    stream=True, logprobs=1):
                for c in chunk.choices:
                    text += c.text
                    seen.append(text)
            return seen, text

    seen, text = asyncio.run(run())
    assert text == want
    assert all(want.startswith(s) for s in seen)   # nothing of the stop string ever leaked
