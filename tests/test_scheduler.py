"""Scheduler without a model: token budget, chunking, prefix hits, preemption."""
from heron.config import CacheConfig, SchedulerConfig
from heron.core.request import Request, RequestStatus
from heron.core.sampling_params import SamplingParams
from heron.core.scheduler import ModelRunnerOutput, Scheduler


def make_scheduler(num_blocks=16, block_size=4, budget=64, max_seqs=8, chunked=True,
                   caching=True, max_model_len=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     enable_chunked_prefill=chunked),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                     num_blocks, max_model_len)


def make_request(rid, n_tokens, max_tokens=4, start=None, **params) -> Request:
    # Distinct tokens per request id, so prefix caching only hits where a test wants it.
    start = 1000 * (ord(rid[0]) - ord("a")) if start is None else start
    return Request(rid, list(range(start, start + n_tokens)),
                   SamplingParams(max_tokens=max_tokens, **params), max_tokens=max_tokens)


def run_step(s: Scheduler, token=7):
    out = s.schedule()
    result = ModelRunnerOutput(sampled_token_ids={
        item.request.request_id: token for item in out.scheduled if item.completes_sequence})
    s.update_from_output(out, result)
    return out


def scheduled(out):
    return {item.request.request_id: item.num_new_tokens for item in out.scheduled}


def test_prefills_share_the_token_budget_and_the_rest_waits():
    s = make_scheduler(budget=20)
    for rid in "abc":
        s.add_request(make_request(rid, 8))
    out = s.schedule()
    # a: 8, b: 8, c: the 4 tokens left of the budget (chunked prefill)
    assert scheduled(out) == {"a": 8, "b": 8, "c": 4}
    assert [item.completes_sequence for item in out.scheduled] == [True, True, False]


def test_running_requests_go_first_then_waiting():
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", 8))
    run_step(s)                              # a prefilled, one token sampled
    s.add_request(make_request("b", 12))
    out = run_step(s)
    assert scheduled(out) == {"a": 1, "b": 9}
    out = run_step(s)
    assert scheduled(out) == {"a": 1, "b": 3}
    assert s.requests["b"].num_output_tokens == 1


def test_without_chunked_prefill_a_long_prompt_waits_for_a_full_budget():
    s = make_scheduler(budget=10, chunked=False)
    s.add_request(make_request("a", 6))
    s.add_request(make_request("b", 6))
    out = s.schedule()
    assert scheduled(out) == {"a": 6}


def test_long_prefill_threshold_caps_a_chunk():
    s = make_scheduler(budget=64)
    s.config.long_prefill_token_threshold = 5
    s.add_request(make_request("a", 12))
    assert scheduled(s.schedule()) == {"a": 5}


def test_max_num_seqs():
    s = make_scheduler(max_seqs=2)
    for rid in "abc":
        s.add_request(make_request(rid, 4))
    assert list(scheduled(s.schedule())) == ["a", "b"]


def test_request_finishes_at_max_tokens_and_frees_blocks():
    s = make_scheduler()
    s.add_request(make_request("a", 4, max_tokens=3))
    for _ in range(3):
        run_step(s)
    assert not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == 16
    assert s.schedule().finished_ids == ["a"]


def test_eos_and_stop_token_ids_respect_min_tokens():
    s = make_scheduler()
    params = SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[7])
    r = Request("a", [1, 2, 3], params, max_tokens=10)
    s.add_request(r)
    run_step(s, token=7)                     # first output token: below min_tokens, keeps going
    assert r.status == RequestStatus.RUNNING
    run_step(s, token=7)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 7


def test_prefix_hit_skips_cached_tokens():
    s = make_scheduler(block_size=4)
    s.add_request(make_request("a", 10))
    run_step(s)
    s.add_request(make_request("b", 10, start=0))
    out = s.schedule()
    # b reuses a's two full blocks (8 tokens) and computes only 2
    assert scheduled(out)["b"] == 2
    assert s.requests["b"].num_cached_tokens == 8
    assert out.scheduled[-1].block_ids[:2] == s.kv.block_ids("a")[:2]


def test_preemption_frees_the_newest_request_and_requeues_it_first():
    # 4 blocks of 4 tokens: two requests of 7 tokens take 2 blocks each; decoding the
    # 9th token of a needs a third block, so b is preempted (recompute).
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    a, b = make_request("a", 7, max_tokens=8), make_request("b", 7, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    run_step(s)                               # both prefilled: 8 tokens each now known
    out = run_step(s)                         # position 7 fits in block 2 of each
    assert scheduled(out) == {"a": 1, "b": 1}
    out = s.schedule()                        # a needs a new block: none free -> b preempted
    assert out.preempted_ids == ["b"]
    assert scheduled(out) == {"a": 1}
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.kv.block_ids("b") == []
    assert b.output_token_ids == [7, 7]     # nothing lost: recomputed from prompt + outputs
    s.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 7}))
    while a.status == RequestStatus.RUNNING:
        run_step(s)
    out = s.schedule()                        # b comes back, recomputing all 9 known tokens
    assert scheduled(out) == {"b": 9}


def test_abort_frees_blocks_of_running_and_waiting_requests():
    s = make_scheduler(budget=8)
    s.add_request(make_request("a", 8))
    s.add_request(make_request("b", 8))
    s.schedule()
    s.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 16 and not s.has_unfinished_requests()
