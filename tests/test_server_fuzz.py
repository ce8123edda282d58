"""Hostile input, generated: schemathesis sends requests built from the server's own
/openapi.json (valid ones and every kind of invalid one) and checks that none gets a
5xx; afterwards the engine still answers a greedy request exactly as before."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_utils import RemoteServer

pytest.importorskip("schemathesis")


def _schemathesis() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    return [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]


def test_openapi_describes_the_request_bodies(tiny_llama):
    with RemoteServer(tiny_llama, ["--served-model-name", "tiny"]) as server:
        schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    fields = body["application/json"]["schema"]["properties"]
    assert {"prompt", "max_tokens", "temperature", "stop", "seed"} <= set(fields)
    assert fields["model"]["enum"] == ["tiny"]


def test_generated_requests_get_no_server_error(tiny_llama):
    with RemoteServer(tiny_llama, ["--served-model-name", "tiny", "--max-model-len", "128"]) \
            as server:
        greedy = {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0}
        before = httpx.post(server.url + "/v1/completions", json=greedy, timeout=60).json()
        # A fixed budget and seed: every run sends the same requests.
        run = subprocess.run(
            _schemathesis() + ["run", server.url + "/openapi.json", "--checks",
                               "not_a_server_error", "--max-examples", "25", "--seed", "1",
                               "--no-color"],
            capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        after = httpx.post(server.url + "/v1/completions", json=greedy, timeout=60).json()
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
