"""Tensor parallelism through the multiprocess executor: the same tokens as one rank, the
splits a model does not allow refused, and a dead rank failing requests, never hanging.

Equality is checked in float32 (where one rank already equals Hugging Face token for
token), with prefix caching, chunked prefill and preemption all in play in the same run.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from heron import LLM, SamplingParams
from heron.config import EngineConfig
from heron.platforms.cpu.platform import CpuPlatform
from heron.worker.executor import WorkerError
from heron.worker.mp_executor import MultiprocExecutor
from server_utils import RemoteServer

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def prompts_with_shared_prefix(vocab: int, n: int = 6, seed: int = 0) -> list[list[int]]:
    """`n` prompts that share a 12-token prefix (three blocks of 4) and then differ."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(12)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(2, 20))]
            for _ in range(n)]


# Small blocks, a small step budget and a cache too small for every request at once:
# prompts are chunked, the shared prefix is found in the cache, and requests are preempted.
CROWDED = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, max_model_len=64,
               num_gpu_blocks_override=20, enable_prefix_caching=True)


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),                                          # 4 heads, 2 KV heads: both split
    ("llama", {"num_key_value_heads": 1, "vocab_size": 251}),  # one KV head, replicated; padded vocab
    ("qwen2", {"tie_word_embeddings": True}),               # q/k/v bias, tied embeddings
], ids=["llama-gqa", "llama-mqa-odd-vocab", "qwen2-tied"])
def test_two_ranks_equal_one(tiny_model_factory, arch: str, overrides: dict) -> None:
    path = tiny_model_factory(arch, seed=5, **overrides)
    prompts = prompts_with_shared_prefix(overrides.get("vocab_size", 256))
    expected = generate(LLM(path, **CROWDED), prompts)
    llm = LLM(path, tensor_parallel_size=2, **CROWDED)
    try:
        assert isinstance(llm.llm_engine.executor, MultiprocExecutor)
        got = generate(llm, prompts)
        scheduler = llm.llm_engine.scheduler
        assert scheduler.num_preemptions > 0, "the test meant to preempt requests"
        assert scheduler.kv.stats.hits > 0, "the test meant to hit the prefix cache"
    finally:
        llm.shutdown()
    assert got == expected
    assert len({t for tokens in expected for t in tokens}) > 3, "degenerate outputs prove little"


def test_sampling_with_seeds_and_penalties_is_the_same_on_two_ranks(tiny_model_factory) -> None:
    """Rank 0 samples from per-request generators and token histories it mirrors."""
    path = tiny_model_factory("llama", seed=5)
    prompts = prompts_with_shared_prefix(256, n=4, seed=1)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=12,
                             repetition_penalty=1.3, frequency_penalty=0.2, ignore_eos=True)
              for i in range(len(prompts))]

    def run(llm: LLM) -> list[list[int]]:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    expected = run(LLM(path, **CROWDED))
    llm = LLM(path, tensor_parallel_size=2, **CROWDED)
    try:
        assert run(llm) == expected
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_smollm2_three_ranks_equal_one(smollm2_path: str) -> None:
    """SmolLM2-135M: 9 heads and 3 KV heads, one KV head per rank at TP=3."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    kwargs = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20,
                  max_num_batched_tokens=64)   # a short profile run: three ranks share 2 cores
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = [o.outputs[0].token_ids for o in LLM(smollm2_path, **kwargs)
                .generate(prompts, params, use_tqdm=False)]
    llm = LLM(smollm2_path, tensor_parallel_size=3, **kwargs)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == expected


def test_impossible_split_is_refused_before_any_worker_starts(smollm2_path: str) -> None:
    with pytest.raises(ValueError, match="9 attention heads do not split over "
                                         "tensor_parallel_size=2"):
        LLM(smollm2_path, tensor_parallel_size=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a whole number"),
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "uni"}, "use 'mp'"),
    ({"distributed_executor_backend": "threads"}, "is not one of uni, mp, ray"),
])
def test_bad_parallel_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.create(**kwargs)


def test_pipeline_parallel_is_refused_with_a_reason(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="pipeline parallelism is not implemented"):
        LLM(tiny_llama, pipeline_parallel_size=2)


def test_a_killed_rank_fails_the_step_and_leaves_no_process(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, dtype="float32", tensor_parallel_size=2)
    engine = llm.llm_engine
    processes = [r.process for r in engine.executor._ranks]
    engine.add_request("long", {"prompt_token_ids": [5, 9, 17]},
                       SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(processes[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1: process \d+ died \(killed by SIGKILL\)"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 30
    with pytest.raises(WorkerError, match="rank 1"):   # and it stays failed
        engine.step()
    llm.shutdown()
    assert all(p.exitcode is not None for p in processes), "a worker process outlived the engine"


def _worker_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` and that run multiprocessing's spawn entry point."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_server_with_a_dead_rank_reports_it_and_goes_unhealthy(tiny_llama: str) -> None:
    server = RemoteServer(tiny_llama, ["--tensor-parallel-size", "2", "--dtype", "float32"])
    try:
        workers = _worker_pids(server.proc.pid)
        assert len(workers) == 2, workers
        body = {"model": tiny_llama, "prompt": "w5 w9 w17", "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        chunks = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as reply:
            start = None
            for line in reply.iter_lines():
                chunks.append(line)
                if start is None and line.startswith("data: {"):
                    os.kill(workers[1], signal.SIGKILL)   # rank 1: started second
                    start = time.monotonic()
        assert start is not None and time.monotonic() - start < 30
        text = "\n".join(chunks)
        assert "worker rank 1" in text and "died" in text, text[-2000:]
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503
        assert "worker rank 1" in health.text
    finally:
        server.close()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "a worker process outlived the server"


class _FailingRunner:
    """Wraps heron's runner; raises on rank 1 at its third step (imported by the ranks:
    spawn hands them this test's sys.path)."""

    def __init__(self, runner, rank: int) -> None:
        self._runner, self._rank, self._steps = runner, rank, 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def execute_model(self, sched):
        self._steps += 1
        if self._rank == 1 and self._steps == 3:
            raise RuntimeError("injected failure on this rank")
        return self._runner.execute_model(sched)


class FailingCpu(CpuPlatform):
    """The cpu platform with a runner that fails on rank 1 (module level: the ranks
    unpickle it by name)."""

    def make_model_runner(self, config, model_path, group):
        from heron.worker.model_runner import ModelRunner
        return _FailingRunner(ModelRunner(config, self, model_path, group), group.rank)


def test_an_exception_on_one_rank_fails_the_step_with_its_message(tiny_llama, monkeypatch):
    import heron.platforms.registry as registry
    monkeypatch.setattr(registry, "resolve_platform", lambda device="auto", pm=None: FailingCpu())
    llm = LLM(tiny_llama, dtype="float32", tensor_parallel_size=2)
    processes = [r.process for r in llm.llm_engine.executor._ranks]
    start = time.monotonic()
    with pytest.raises(WorkerError, match="worker rank 1: RuntimeError: injected failure"):
        generate(llm, [[5, 9, 17]])
    assert time.monotonic() - start < 30   # rank 0, waiting in an all-reduce, was not waited for
    with pytest.raises(WorkerError, match="rank 1"):
        llm.llm_engine.check_health()
    llm.shutdown()
    assert all(p.exitcode is not None for p in processes)
