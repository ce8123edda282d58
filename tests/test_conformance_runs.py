"""CI runs the platform conformance suite for the built-in cpu platform.

In a subprocess, the way a plugin author runs it (`python -m heron.testing.conformance
--device NAME`), from an empty folder so that no conftest.py of this repository is
involved. The example plugin's run is in test_example_plugin.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_conformance(device: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m heron.testing.conformance --device DEVICE -q -rs` (skips listed with their
    reasons) with a clean environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HERON_DEVICE", "HERON_PLUGINS", "HERON_BATCH_INVARIANT")}
    return subprocess.run(
        [sys.executable, "-m", "heron.testing.conformance", "--device", device, "-q", "-rs",
         "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_conformance_suite_passes_for_cpu(tmp_path):
    result = run_conformance("cpu", tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    # cpu declares every invariance in float32 and bfloat16: those checks ran, none skipped
    skipped = [line for line in result.stdout.splitlines() if "does not declare" in line]
    assert skipped and all(" in float16" in line for line in skipped), skipped
    # and its compiled forward (graph_capture) was compared with the eager one
    assert "declares no graph_capture" not in result.stdout


def test_conformance_suite_reports_an_unavailable_device(tmp_path):
    result = run_conformance("cuda", tmp_path)
    if "cuda" in _available_devices():
        return  # a GPU machine: the cuda run is a real check, not this one
    assert result.returncode != 0
    assert "cannot check device 'cuda': device='cuda' is not available" in result.stdout


def _available_devices() -> set[str]:
    from heron.platforms.plugins import make_plugin_manager
    return {e.platform.name for e in make_plugin_manager().platforms() if e.detection.available}
