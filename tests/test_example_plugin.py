"""The example third-party plugin: installed with pip, discovered, chosen, equal to cpu,
conformant, and gone after uninstall.

The plugin is pip-installed (editable, no dependencies) into the running virtualenv
for the duration of the test and uninstalled in a finally block. Everything that
imports it runs in subprocesses, so this test process never imports the plugin.
Its priority (-10) is below every built-in's, so other test runs sharing the virtualenv
meanwhile still resolve device="auto" to a built-in platform.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from test_conformance_runs import run_conformance

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "plugins" / "heron-platform-example"
DIST = "heron-platform-example"
PROMPTS = [[5, 9, 17, 33], list(range(3, 40)), [7]]

GENERATE = """
import json, sys
from heron import LLM, SamplingParams

params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
prompts = json.loads(sys.argv[3])

def run(path, device):
    llm = LLM(path, device=device, dtype="float32", kv_cache_memory_bytes=16 << 20)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return {"platform": llm.llm_engine.platform.name,
            "tokens": [o.outputs[0].token_ids for o in outputs]}

print(json.dumps({"example": run(sys.argv[1], "example"), "cpu": run(sys.argv[2], "cpu")}))
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("HERON_DEVICE", "HERON_PLUGINS")}


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def pip(*args: str, cwd: Path) -> None:
    result = run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stderr[-3000:]}"


def heron_platforms(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "heron.entrypoints.cli", "platforms", *args], cwd)


def installed() -> bool:
    importlib.invalidate_caches()
    try:
        metadata.distribution(DIST)
        return True
    except metadata.PackageNotFoundError:
        return False


def example_architecture_copy(llama: str, dest: Path) -> Path:
    """The tiny Llama saved as the plugin's architecture: prefixed tensor names and
    `ExampleLlamaForCausalLM` in config.json. Same weights, so same greedy output."""
    shutil.copytree(llama, dest)
    for file in dest.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({f"example.{k}": v for k, v in tensors.items()}, file, metadata={"format": "pt"})
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["ExampleLlamaForCausalLM"]
    config_path.write_text(json.dumps(config))
    return dest


def test_example_plugin_lifecycle(tiny_llama, tmp_path):
    if installed():
        pytest.fail(f"{DIST} is already installed in this environment; uninstall it first "
                    "(this test installs and uninstalls it)")
    example_model = example_architecture_copy(tiny_llama, tmp_path / "example-llama")
    pip("install", "--no-deps", "--no-build-isolation", "-e", str(PLUGIN_DIR), cwd=tmp_path)
    try:
        assert installed()
        # Discovered: listed with its package and version, available, not chosen by auto.
        listing = heron_platforms(tmp_path)
        assert listing.returncode == 0, listing.stdout + listing.stderr
        rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:] if line}
        assert rows["example"][:5] == ["example", DIST, "0.1.0", "-10", "yes"]
        assert rows["cpu"][5] == "*", listing.stdout

        # Chosen by name, running its own model architecture, same greedy output as cpu.
        result = run([sys.executable, "-c", GENERATE, str(example_model), tiny_llama,
                      json.dumps(PROMPTS)], tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert got["example"]["platform"] == "example" and got["cpu"]["platform"] == "cpu"
        assert got["example"]["tokens"] == got["cpu"]["tokens"]

        conformance = run_conformance("example", tmp_path)
        assert conformance.returncode == 0, conformance.stdout[-6000:] + conformance.stderr[-3000:]
    finally:
        pip("uninstall", "-y", DIST, cwd=tmp_path)

    assert not installed()
    gone = heron_platforms(tmp_path, "--device", "example")
    assert gone.returncode == 1
    assert "example" not in [line.split()[0] for line in gone.stdout.splitlines() if line.strip()]
    assert "unknown device 'example'" in gone.stdout
