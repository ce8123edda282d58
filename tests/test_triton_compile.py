"""Every Triton kernel compiles for CUDA sm_80 and sm_90 and for HIP gfx942, without a GPU.

triton.compile runs the whole pipeline (TTIR, TTGIR, LLVM IR, then ptxas or the AMD
linker) for a target given by hand. It runs in a child process (this file as a
script), for two reasons: test_triton_kernels.py imports triton for the
interpreter in the pytest process, and an interpreted and a compiled triton do
not mix in one process; and a fresh TRITON_CACHE_DIR there makes every kernel
really compile. The constexprs come from the backend's own `launch_constants`,
so what compiles here is what it launches. This module imports no triton itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e '.[test]' installs it on Linux x86_64)",
                allow_module_level=True)

# target: (backend, arch, warp size, artifacts, shared memory per block: the sm_80 and
# sm_90 opt-in maxima, MI300's LDS)
TARGETS = {
    "sm80": ("cuda", 80, 32, ("ptx", "cubin"), 166912),
    "sm90": ("cuda", 90, 32, ("ptx", "cubin"), 232448),
    "gfx942": ("hip", "gfx942", 64, ("amdgcn", "hsaco"), 65536),
}


def attention_types(dtype: str) -> dict[str, str]:
    t = f"*{dtype}"
    return dict(out_ptr=t, q_ptr=t, k_cache_ptr=t, v_cache_ptr=t, part_acc_ptr="*fp32",
                part_max_ptr="*fp32", part_sum_ptr="*fp32", block_tables_ptr="*i32",
                seq_lens_ptr="*i32", query_start_loc_ptr="*i32", scale_log2="fp32")


def jobs() -> dict[str, dict]:
    """Every kernel configuration to build, by test id."""
    import torch

    from heron.kernels.triton_attention import (
        DECODE_TILES,
        PREFILL_TILES,
        launch_constants,
    )
    torch_types = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # (name, tiles, split, head size, group, dtypes): what a SmolLM2 (64, 3) or a
    # Llama-3 8B (128, 4) prefill or long decode launches, and a float32 model.
    configs = [("prefill-d64-g3", PREFILL_TILES, False, 64, 3, ("bf16", "fp16")),
               ("prefill-d128-g4", PREFILL_TILES, False, 128, 4, ("bf16", "fp16")),
               ("decode-split-d128-g4", DECODE_TILES, True, 128, 4, ("bf16", "fp16")),
               ("decode-d64-mha", DECODE_TILES, False, 64, 1, ("fp32",))]
    out = {}
    for target in TARGETS:
        for name, tiles, split, head, group, dtypes in configs:
            for dt in dtypes:
                consts = launch_constants(torch_types[dt], head, group, 16, tiles, split)
                out[f"attention-{name}-{dt}-{target}"] = dict(
                    module="attention", kernel="paged_attention_kernel", target=target,
                    types=attention_types(dt), constexprs=consts)
        out[f"split-reduce-{target}"] = dict(
            module="attention", kernel="split_reduce_kernel", target=target,
            types=dict(out_ptr="*bf16", part_acc_ptr="*fp32", part_max_ptr="*fp32",
                       part_sum_ptr="*fp32"),
            constexprs=dict(HEAD_SIZE=128, HEAD_PAD=128, SPLITS_PAD=16))
        for dt in ("bf16", "fp16"):
            t = f"*{dt}"
            out[f"write-kv-{dt}-{target}"] = dict(
                module="cache_write", kernel="write_kv_kernel", target=target,
                types=dict(key_ptr=t, value_ptr=t, k_cache_ptr=t, v_cache_ptr=t, slot_ptr="*i64"),
                constexprs=dict(HEAD_SIZE=128, HEAD_PAD=128, HEADS_PAD=8, BLOCK_SIZE=16))
    return out


JOBS = jobs()


def compile_all(todo: dict[str, dict]) -> dict[str, dict]:
    """In the child process: build each job; report its artifacts, shared memory or error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    results = {}
    for job_id, job in todo.items():
        backend, arch, warp, artifacts, _ = TARGETS[job["target"]]
        module = importlib.import_module(f"heron.kernels.triton_kernels.{job['module']}")
        kernel = getattr(module, job["kernel"])
        consts = job["constexprs"]
        signature = {name: "constexpr" if name in consts else job["types"].get(name, "i32")
                     for name in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                                      target=GPUTarget(backend, arch, warp))
            results[job_id] = dict(artifacts=[a for a in artifacts if compiled.asm.get(a)],
                                   shared=compiled.metadata.shared, error=None)
        except Exception as e:  # noqa: BLE001 - reported by the test of this job
            results[job_id] = dict(artifacts=[], shared=0, error=f"{type(e).__name__}: {e}")
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("job_id", list(JOBS))
def test_kernel_compiles(results, job_id):
    target = JOBS[job_id]["target"]
    *_, artifacts, shared_limit = TARGETS[target]
    got = results[job_id]
    assert got["error"] is None, got["error"]
    assert got["artifacts"] == list(artifacts), f"missing artifacts for {target}: {got}"
    assert got["shared"] <= shared_limit, (
        f"{got['shared']} bytes of shared memory; {target} has {shared_limit}")


if __name__ == "__main__":
    print(json.dumps(compile_all(JOBS)))
