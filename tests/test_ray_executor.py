"""Tensor parallelism through the Ray executor: the same tokens as one rank, a dead rank's
actor failing the step by name (never hanging), nothing left on the cluster after a
shutdown, and clear errors when Ray is missing or the cluster is too small.

One local Ray instance (two CPUs, so exactly two ranks fit) serves the whole module.
"""
from __future__ import annotations

import random
import sys
import time
from typing import Iterator

import pytest

ray = pytest.importorskip("ray")

from heron import LLM, SamplingParams  # noqa: E402
from heron.config import EngineConfig  # noqa: E402
from heron.platforms.registry import resolve_platform  # noqa: E402
from heron.worker.executor import WorkerError  # noqa: E402
from heron.worker import ray_executor  # noqa: E402
from heron.worker.ray_executor import RayExecutor, _import_ray  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Small blocks and a small step budget: prompts are chunked, and the shared prefix is
# found in the cache.
SETTINGS = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, max_model_len=64,
                num_gpu_blocks_override=64, enable_prefix_caching=True)
RAY_TP2 = dict(SETTINGS, tensor_parallel_size=2, distributed_executor_backend="ray")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A private one-node Ray instance with room for two ranks (no dashboard: it would
    only slow the start)."""
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tiny_model_factory) -> str:
    return tiny_model_factory("llama", seed=3)


def shared_prefix_prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(12)]
    return [prefix + [rng.randrange(3, 256) for _ in range(rng.randint(2, 14))]
            for _ in range(n)]


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_released(executor: RayExecutor) -> None:
    """No actor of `executor` answers, and its placement group is gone."""
    for actor in executor._actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.node.remote(), timeout=30)
    assert ray.util.placement_group_table(executor._pg)["state"] == "REMOVED"


def test_two_ray_ranks_equal_one(ray_cluster: None, model_path: str) -> None:
    prompts = shared_prefix_prompts()
    expected = generate(LLM(model_path, **SETTINGS), prompts)
    llm = LLM(model_path, **RAY_TP2)
    executor = llm.llm_engine.executor
    try:
        assert isinstance(executor, RayExecutor)
        assert not executor.connected_ray, "the module's Ray connection was not reused"
        got = generate(llm, prompts)
        assert llm.llm_engine.scheduler.kv.stats.hits > 0, "the test meant to hit the cache"
        executor.check_health()   # all ranks alive: nothing to report
        stats = executor.collective_stats()
        assert len(stats) == 2 and all(s.calls > 0 for s in stats)
    finally:
        llm.shutdown()
    llm.shutdown()                # twice is fine
    assert got == expected
    assert len({t for tokens in expected for t in tokens}) > 3, "degenerate outputs prove little"
    assert_released(executor)


def test_a_killed_actor_fails_the_step_by_rank(ray_cluster: None, model_path: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Every step through the object store here (the test above sends them inline).
    monkeypatch.setattr(ray_executor, "_INLINE_STEP_BYTES", 0)
    llm = LLM(model_path, **RAY_TP2)
    executor = llm.llm_engine.executor
    try:
        assert len(generate(llm, shared_prefix_prompts(2, seed=1))) == 2
        ray.kill(executor._actors[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="worker rank 1: Ray actor died") as failed:
            generate(llm, shared_prefix_prompts(2, seed=2))
        assert time.monotonic() - start < 60
        assert failed.value.rank == 1
        with pytest.raises(WorkerError, match="rank 1"):   # and it stays failed
            generate(llm, shared_prefix_prompts(1, seed=3))
        with pytest.raises(WorkerError, match="rank 1"):
            executor.check_health()
    finally:
        llm.shutdown()
    assert_released(executor)   # rank 0 went too


def test_too_small_a_cluster_is_named(ray_cluster: None, model_path: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Three ranks cannot be placed on two CPUs: a clear error after the worker timeout."""
    monkeypatch.setenv("HERON_WORKER_TIMEOUT_SECONDS", "2")
    config = EngineConfig.create(model=model_path, tensor_parallel_size=3,
                                 distributed_executor_backend="ray", dtype="float32")
    platform = resolve_platform(config.device.device)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the Ray cluster has 2 CPUs free \(of 2\); "
                                           r"tensor_parallel_size=3 needs 3 CPUs"):
        RayExecutor(config, platform, model_path)
    assert time.monotonic() - start < 30


def test_missing_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now fails
    with pytest.raises(ImportError, match=r"pip install 'heron\[ray\]'") as missing:
        _import_ray()
    assert isinstance(missing.value.__cause__, ImportError)
