"""Error answers of `heron serve` over raw HTTP: OpenAI's error shape, the right status,
and a server that keeps serving everyone else."""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from server_utils import TINY_CHAT_TEMPLATE, RemoteServer

KEY = "sk-errors"
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def server(tiny_llama):
    with RemoteServer(tiny_llama, ["--served-model-name", "tiny", "tiny-alias",
                                   "--max-model-len", "64", "--chat-template", TINY_CHAT_TEMPLATE,
                                   "--max-request-body-bytes", str(BODY_LIMIT)],
                      api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
        yield client


def check_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return error


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "w1 w2", "max_tokens": 4, **fields}


def test_api_key(server, http):
    plain = httpx.Client(base_url=server.url, timeout=30)
    check_error(plain.post("/v1/completions", json=completion()), 401, "API key")
    wrong = {"Authorization": "Bearer nope"}
    check_error(plain.post("/v1/chat/completions", headers=wrong, json={}), 401, "incorrect")
    check_error(plain.get("/v1/models", headers=wrong), 401)
    check_error(plain.post("/tokenize", json={"model": "tiny", "prompt": "w1"}), 401)
    check_error(plain.post("/detokenize", json={"model": "tiny", "tokens": [5]}), 401)
    check_error(plain.get("/version"), 401)
    assert plain.get("/health").status_code == 200       # probes need no key
    assert plain.get("/metrics").status_code == 200
    assert http.get("/version").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()
    assert http.post("/v1/completions", json=completion()).status_code == 200


def test_unknown_model_is_404(server, http):
    error = check_error(http.post("/v1/completions", json=completion(model="gpt-4")), 404,
                        "gpt-4")
    assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.openai().chat.completions.create(model="nope", messages=[
            {"role": "user", "content": "w1"}])
    assert http.post("/v1/completions", json=completion(model="tiny-alias")).status_code == 200


@pytest.mark.parametrize("fields, words", [
    ({"temperature": -1}, ["temperature"]),
    ({"top_p": 1.5}, ["top_p"]),
    ({"max_tokens": 0}, ["max_tokens"]),
    ({"n": 0}, ["n must"]),
    ({"n": "many"}, ["n:"]),
    ({"logprobs": 50}, ["logprobs"]),
    ({"prompt": ""}, ["empty"]),
    ({"prompt": []}, ["empty"]),
    ({"prompt": [3, 4, 9999]}, ["9999"]),
    ({"prompt": " ".join(["w1"] * 80)}, ["64", "80"]),
    ({"max_tokens": 100}, ["64", "102"]),
    ({"stop": [""]}, ["stop"]),
    ({"logit_bias": {"5": 1.0}}, ["logit_bias"]),
    ({"best_of": 3}, ["best_of"]),
    ({"stream_options": {"include_usage": True}}, ["stream_options"]),
    ({"suffix": "x"}, ["suffix"]),
    ({"seed": 2**70}, ["seed"]),
    ({"temperature": float("inf")}, ["temperature", "finite"]),
    ({"temperature": 1e308}, ["temperature"]),
    ({"top_k": 2**64}, ["top_k"]),
    ({"stop": ["w1"] * 5000}, ["stop strings"]),
    ({"stop_token_ids": [100000]}, ["stop_token_ids", "100000"]),
    ({"prompt": "w1 \ud800 w2"}, ["not valid Unicode"]),
])
def test_bad_completion_is_400(http, fields, words):
    check_error(post_json(http, "/v1/completions", completion(**fields)), 400, *words)


def post_json(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST `body` as Python's json module writes it: Infinity and lone surrogates (as
    \\u escapes) included, which httpx's own encoder refuses to send."""
    return http.post(path, content=json.dumps(body),
                     headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("fields, words", [
    ({"messages": []}, ["messages"]),
    ({"messages": [{"content": "w1"}]}, ["role"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     ["image_url"]),
    ({"top_logprobs": 2}, ["logprobs"]),
    ({"max_completion_tokens": 70}, ["64"]),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ["tool"]),
])
def test_bad_chat_is_400(http, fields, words):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w1"}], **fields}
    check_error(http.post("/v1/chat/completions", json=body), 400, *words)


def test_malformed_bodies(http):
    check_error(http.post("/v1/completions", content=b"{not json"), 400, "JSON")
    check_error(http.post("/v1/completions", json=[1, 2]), 400, "object")
    check_error(http.post("/v1/completions", json={"model": "tiny"}), 400, "prompt")
    check_error(http.get("/v1/completions"), 405)
    check_error(http.get("/v1/nothing-here"), 404)


def test_deeply_nested_body_is_400(http):
    depth = 20000
    body = b'{"model": "tiny", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    check_error(http.post("/v1/completions", content=body), 400, "nested too deeply")


def test_hostile_values_leave_the_engine_serving_the_same_answers(http):
    """A seed past 64 bits once killed the engine for everyone: now it is refused at the
    door, and a greedy request afterwards gets the same text as before."""
    greedy = completion(prompt="w5 w6 w7", max_tokens=8, temperature=0)
    before = http.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    for fields in ({"seed": 2**70}, {"seed": 2**70, "n": 2, "temperature": 1.0},
                   {"logprobs": 10**6}, {"prompt": "\udfff"}):
        assert post_json(http, "/v1/completions", completion(**fields)).status_code == 400
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json=greedy).json()["choices"][0]["text"] == before


def test_body_size_limit_is_413(http):
    big = completion(prompt="w1 " * (BODY_LIMIT // 2))
    error = check_error(http.post("/v1/completions", json=big), 413, str(BODY_LIMIT))
    assert error["code"] == "request_too_large"

    def chunks():   # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 1):
            yield b"w1 " * 341 + b"w"
        yield b'"}'
    check_error(http.post("/v1/completions", content=chunks()), 413)


def test_errors_do_not_disturb_other_requests(server, http):
    """Bad requests arrive while a long stream runs; the stream still completes."""
    result: dict = {}

    def stream():
        result["text"] = "".join(
            c.choices[0].text for c in server.openai().completions.create(
                model="tiny", prompt="w5 w6", max_tokens=60, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) if c.choices)
    thread = threading.Thread(target=stream)
    thread.start()
    for _ in range(10):
        check_error(http.post("/v1/completions", json=completion(temperature=-3)), 400)
        check_error(http.post("/v1/completions", json=completion(model="x")), 404)
    thread.join(60)
    assert len(result["text"].split()) == 60
    assert http.get("/health").status_code == 200


def test_cors_preflight_is_answered_without_the_key(server):
    """vLLM's defaults (--allowed-origins '["*"]'): a browser may call the API."""
    preflight = httpx.options(server.url + "/v1/completions", timeout=30, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    refused = httpx.get(server.url + "/v1/models", timeout=30,
                        headers={"Origin": "http://localhost:3000"})
    assert refused.status_code == 401   # CORS opens the door to browsers, not the key
    assert refused.headers["access-control-allow-origin"] == "*"


def test_prompts_stay_out_of_the_log(server, http):
    """At the default log level (INFO) the server logs no prompt, good or bad."""
    secret = "w77 w78 w79"
    assert http.post("/v1/completions", json=completion(prompt=secret)).status_code == 200
    chat = {"model": "tiny", "messages": [{"role": "user", "content": secret}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    check_error(http.post("/v1/completions", json=completion(prompt=secret, top_p=7)), 400)
    assert secret not in server.output()
