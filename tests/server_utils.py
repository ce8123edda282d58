"""Start `heron serve` in a subprocess on 127.0.0.1 and a free port, for the server tests."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# A one-line chat template for the tiny test models, which have none.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                      "{% if add_generation_prompt %}w9{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heron_command() -> list[str]:
    exe = Path(sys.executable).with_name("heron")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "heron.entrypoints.cli"]


class RemoteServer:
    """`heron serve [MODEL] ARGS` on a free port; stopped (SIGINT, then SIGKILL) on close."""

    def __init__(self, model: str | None, args: list[str], api_key: str | None = None,
                 timeout: float = 240.0) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        command = heron_command() + ["serve", *([model] if model else []), "--port",
                                     str(self.port), "--disable-uvicorn-access-log", *args]
        if api_key:
            command += ["--api-key", api_key]
        env = dict(os.environ, HERON_API_KEY="")  # only --api-key sets the key here
        self.log = tempfile.NamedTemporaryFile("w+", prefix="heron-serve-", suffix=".log")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"heron serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"heron serve not healthy after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                             max_retries=0, **kwargs)

    def async_openai(self, **kwargs):
        import openai
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                                  max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}, and {'name': value} for label-free lookups."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
            name = re.sub(r"\{.*\}", "", key)
            if "finished_reason" in key:
                reason = re.search(r'finished_reason="(\w+)"', key).group(1)
                name = f"{name}[{reason}]"
            values.setdefault(name, float(value))
        return values

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
