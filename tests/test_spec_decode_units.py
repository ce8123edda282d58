"""Speculative decoding without a model: configuration, n-gram proposals, the scheduler's
tentative tokens and freed blocks, the counters, and the rejection sampler's
distribution (a chi-square test on a tiny vocabulary)."""
from __future__ import annotations

import math

import pytest
import torch

from heron.core.block_pool import hash_block_tokens
from heron.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from heron.core.request import Request, RequestStatus
from heron.core.sampling_params import SamplingParams
from heron.core.scheduler import ModelRunnerOutput, Scheduler, VerifiedDrafts
from heron.core.spec_decode.ngram import NgramProposer
from heron.worker.spec_decode.rejection_sampler import rejection_sample, verify_greedy

# -- configuration --------------------------------------------------------------------------


def test_speculative_config_accepts_vllm_keys_and_fills_lookup_bounds():
    spec = EngineConfig.create(speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}).speculative
    assert (spec.method, spec.num_speculative_tokens) == ("ngram", 4)
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (3, 3)
    assert SpeculativeConfig("ngram", 2).prompt_lookup_max == 5      # vLLM's default
    assert SpeculativeConfig("[ngram]", 2).method == "ngram"
    assert SpeculativeConfig(model="/some/dir", num_speculative_tokens=3).method == "draft_model"
    assert EngineConfig.create().speculative is None


@pytest.mark.parametrize("value, words", [
    ({"method": "ngram", "num_speculative_tokens": 4, "lookahead": 2}, "unknown key 'lookahead'"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method='medusa'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "prompt_lookup_min (4) is larger"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": -1},
     "prompt_lookup_max"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "/x"}, "takes no 'model'"),
    ("ngram", "must be a dict"),
])
def test_speculative_config_errors_name_the_bad_key(value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig.create(speculative_config=value)


# -- n-gram proposals ------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_longest_match():
    proposer = NgramProposer(min_n=1, max_n=3)
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    # suffix (2, 3): latest earlier occurrence at 5 -> followed by 5, 6, 2
    assert proposer.propose(tokens, 3) == [5, 6, 2]
    # past the end, the copy continues over what it proposed: the pattern repeats
    assert proposer.propose(tokens, 10) == [5, 6, 2, 3, 5, 6, 2, 3, 5, 6]
    assert proposer.propose(tokens, 0) == []
    # the 3-gram (9, 2, 3) never recurs, the 2-gram does: longest first, then shorter
    assert NgramProposer(3, 3).propose(tokens, 2) == []
    assert proposer.propose([7, 8, 9], 2) == []                 # nothing recurs
    assert proposer.propose([4, 4], 3) == [4, 4, 4]
    assert proposer.propose([1, 2, 3, 1, 2], 4) == [3, 1, 2, 3]


# -- scheduler -------------------------------------------------------------------------------


def make_scheduler(k=3, num_blocks=16, block_size=4, budget=64, caching=True):
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                     num_blocks, 64, SpeculativeConfig("ngram", k, prompt_lookup_min=1,
                                                        prompt_lookup_max=2))


def step(s, token, accepted=None):
    """One step where every sampling request gets `token` after `accepted` proposals."""
    out = s.schedule()
    result = ModelRunnerOutput()
    for item in out.scheduled:
        if item.completes_sequence:
            rid = item.request.request_id
            result.sampled_token_ids[rid] = token
            if item.num_spec_tokens:
                result.verified[rid] = VerifiedDrafts(item.spec_token_ids[:accepted])
    s.update_from_output(out, result)
    return out


def test_proposals_are_scheduled_verified_and_rejected_blocks_freed():
    s = make_scheduler(k=3)
    # prompt 1 2 3 1 2 (5 tokens): after sampling 3 the suffix "2 3" recurs.
    request = Request("a", [1, 2, 3, 1, 2], SamplingParams(max_tokens=20), max_tokens=20)
    s.add_request(request)
    out = step(s, token=3)                   # prefill: no proposals
    assert out.scheduled[0].num_spec_tokens == 0
    assert request.all_token_ids == [1, 2, 3, 1, 2, 3]
    assert s.kv.block_ids("a") == [0, 1]

    out = s.schedule()
    item = out.scheduled[0]
    # "2 3" last seen at 1 -> proposals 1 2 3; 1 known + 3 tentative tokens, 9 slots: 3 blocks
    assert (item.num_new_tokens, item.num_spec_tokens, item.spec_token_ids) == (4, 3, [1, 2, 3])
    assert item.completes_sequence and item.input_token_ids() == [3, 1, 2, 3]
    assert len(s.kv.block_ids("a")) == 3
    free_before = s.kv.num_free_blocks
    result = ModelRunnerOutput(sampled_token_ids={"a": 8},
                               verified={"a": VerifiedDrafts([1])})   # 1 accepted, 2 rejected
    updated = s.update_from_output(out, result)
    assert updated == [(request, [1, 8])]
    assert request.all_token_ids == [1, 2, 3, 1, 2, 3, 1, 8]
    assert request.num_computed_tokens == 7          # the rejected tokens' KV does not count
    # 8 known tokens fit 2 blocks: the third, which held only rejected tokens, is freed
    assert len(s.kv.block_ids("a")) == 2 and s.kv.num_free_blocks == free_before + 1
    # Block 1 was full of tokens during the step (2 3 known, 1 2 tentative) but was not
    # hashed; it is once known tokens fill it, with the accepted 1 and the sampled 8.
    assert len(request.block_hashes) == 1
    s.schedule()
    assert request.block_hashes[1] == hash_block_tokens(request.block_hashes[0], [2, 3, 1, 8])
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 3, 1)
    assert stats.num_accepted_tokens_per_pos == [1, 0, 0]


def test_counters_over_several_steps_and_blocks_back_at_the_end():
    s = make_scheduler(k=2)
    request = Request("a", [5, 6, 5, 6, 5], SamplingParams(max_tokens=9), max_tokens=9)
    s.add_request(request)
    step(s, token=6)                          # 5 6 5 6 5 6
    step(s, token=7, accepted=2)              # proposals 5 6 -> both accepted, then 7
    step(s, token=9, accepted=0)              # "7" unseen, "6 7" unseen -> no proposals
    assert request.output_token_ids == [6, 5, 6, 7, 9]
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 2, 2)
    assert stats.num_accepted_tokens_per_pos == [1, 1]
    assert stats.acceptance_rate == 1.0 and stats.mean_acceptance_length == 3.0
    while not request.is_finished:
        step(s, token=5, accepted=1)
    assert request.num_output_tokens == 9 and request.status == RequestStatus.FINISHED_LENGTH
    assert s.kv.num_free_blocks == 16


def test_proposals_stop_at_max_tokens_and_accepted_tokens_stop_at_eos():
    s = make_scheduler(k=4)
    params = SamplingParams(max_tokens=4, stop_token_ids=[2])
    request = Request("a", [2, 3, 2, 3, 2], params, max_tokens=4)
    s.add_request(request)
    step(s, token=3)                          # 1 output token: at most 4 - 1 - 1 = 2 proposals
    item = s.schedule().scheduled[0]
    assert item.num_spec_tokens == 2 and item.spec_token_ids == [2, 3]
    s2 = make_scheduler(k=4)
    r2 = Request("b", [2, 3, 2, 3, 2], params.clone(max_tokens=10), max_tokens=10)
    s2.add_request(r2)
    step(s2, token=3)
    out = s2.schedule()
    assert out.scheduled[0].spec_token_ids == [2, 3, 2, 3]
    # all accepted, but token 2 is a stop token: the request ends at the first one
    s2.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"b": 9},
                                                 verified={"b": VerifiedDrafts([2, 3, 2, 3])}))
    assert r2.output_token_ids == [3, 2] and r2.status == RequestStatus.FINISHED_STOPPED
    assert r2.stop_reason == 2 and s2.kv.num_free_blocks == 16


def test_speculation_never_preempts_and_is_dropped_when_blocks_run_out():
    s = make_scheduler(k=3, num_blocks=2, block_size=4)
    request = Request("a", [1, 2, 1, 2, 1, 2, 1], SamplingParams(max_tokens=8), max_tokens=8)
    s.add_request(request)
    step(s, token=2)                          # 8 tokens: both blocks full
    out = s.schedule()                        # proposals would need a third block
    assert out.scheduled[0].num_spec_tokens == 0 and not out.preempted_ids


def test_preemption_drops_tentative_tokens():
    s = make_scheduler(k=2, num_blocks=5, block_size=4, caching=False)
    a = Request("a", [1, 2, 1, 2, 1, 2, 1], SamplingParams(max_tokens=20), max_tokens=20)
    b = Request("b", [3, 4, 3, 4, 3, 4, 3], SamplingParams(max_tokens=20), max_tokens=20)
    s.add_request(a)
    s.add_request(b)
    step(s, token=2)                         # a: ...1 2, b: ...3 2; 2 blocks each, 1 free
    b.all_token_ids[-1] = b.output_token_ids[-1] = 4   # b: 3 4 3 4 3 4 3 4
    out = s.schedule()
    # a takes the free block for its proposals; b's proposals find none and are dropped
    assert [(i.request.request_id, i.num_spec_tokens) for i in out.scheduled] == \
        [("a", 2), ("b", 0)]
    s.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 1, "b": 3},
                                                verified={"a": VerifiedDrafts([])}))
    out = s.schedule()                       # b's next token needs a block: b is preempted
    assert out.preempted_ids == ["b"] and [i.request for i in out.scheduled] == [a]
    assert out.scheduled[0].num_spec_tokens == 2
    assert b.num_computed_tokens == 0 and s.kv.block_ids("b") == []
    s.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 5},
                                                verified={"a": VerifiedDrafts([2])}))
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    out = s.schedule()                       # b recomputes its known tokens, nothing more
    assert [(i.request, i.num_new_tokens, i.num_spec_tokens) for i in out.scheduled] == \
        [(b, 9, 0)]
    assert b.all_token_ids == [3, 4, 3, 4, 3, 4, 3, 4, 3]


def test_budget_caps_the_proposals():
    s = make_scheduler(k=4, budget=3)
    request = Request("a", [1, 2, 1, 2], SamplingParams(max_tokens=20), max_tokens=20)
    s.add_request(request)
    step(s, token=1)    # budget 3 < 4 tokens: chunked
    step(s, token=1)
    item = s.schedule().scheduled[0]
    assert item.num_new_tokens == 3 and item.num_spec_tokens == 2


# -- rejection sampler -----------------------------------------------------------------------


def chi_square_critical(df: int, alpha: float = 1e-3) -> float:
    """Upper critical value of chi-square (scipy's chi2.isf when installed, else the
    Wilson-Hilferty approximation, good to a fraction of a percent for df >= 3)."""
    try:
        from scipy.stats import chi2
        return float(chi2.isf(alpha, df))
    except ImportError:
        z = {1e-3: 3.090232, 1e-2: 2.326348}[alpha]
        c = 2.0 / (9.0 * df)
        return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


P = torch.tensor([[0.30, 0.05, 0.25, 0.15, 0.20, 0.05],
                  [0.10, 0.40, 0.05, 0.05, 0.30, 0.10]])
Q = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.05, 0.10]])


def draw(num: int, proposal, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Emitted first tokens, and second tokens when the first proposal was accepted."""
    first = torch.zeros(P.shape[1])
    second = torch.zeros(P.shape[1])
    for _ in range(num):
        tokens, q = proposal(generator)
        outcome = rejection_sample(P, tokens, q, generator)
        if outcome.num_accepted == 0:
            first[outcome.token_id] += 1
        else:
            first[tokens[0]] += 1
            second[outcome.token_id] += 1
    return first, second


def test_rejection_sampling_keeps_the_target_distribution():
    generator = torch.Generator().manual_seed(1234)

    def from_draft_model(g):      # a proposal drawn from q, with q given
        return [int(torch.multinomial(Q[0], 1, generator=g))], Q

    def fixed_ngram(g):           # a deterministic proposal (one-hot q)
        return [3], None

    for proposal in (from_draft_model, fixed_ngram):
        first, second = draw(20000, proposal, generator)
        stat, df = chi_square(first, P[0])
        assert stat < chi_square_critical(df), (proposal.__name__, stat, first / first.sum())
        # the bonus token after an accepted proposal follows the next row of p
        stat, df = chi_square(second, P[1])
        assert stat < chi_square_critical(df), (proposal.__name__, stat)


def test_chi_square_test_notices_a_wrong_distribution():
    """The test above can fail: accepting every proposal emits q, not p."""
    generator = torch.Generator().manual_seed(7)
    counts = torch.zeros(P.shape[1])
    for _ in range(5000):
        counts[int(torch.multinomial(Q[0], 1, generator=generator))] += 1
    stat, df = chi_square(counts, P[0])
    assert stat > chi_square_critical(df)


def test_rejection_never_emits_a_token_the_target_excludes():
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        outcome = rejection_sample(p, [3], None, generator)      # p(3) = 0: always rejected
        assert outcome.num_accepted == 0 and outcome.token_id in (1, 2)
    certain = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert rejection_sample(certain, [2], None, generator) == type(outcome)(1, 1)


def test_greedy_verification():
    assert verify_greedy([4, 5, 6, 7], [4, 5, 9]) == type(verify_greedy([1], []))(2, 6)
    assert verify_greedy([4, 5, 6, 7], [4, 5, 6]).num_accepted == 3
    assert verify_greedy([4, 5, 6, 7], [4, 5, 6]).token_id == 7
    assert verify_greedy([4], []).token_id == 4


# -- metrics ---------------------------------------------------------------------------------


def test_prometheus_counters_of_a_hand_checked_case():
    """Two drafts: 3 proposals with the first 2 accepted, then 2 with none accepted."""
    from heron.core.async_engine import EngineStats
    from heron.core.spec_decode.stats import SpecDecodingStats
    from heron.entrypoints.openai.metrics import ServerMetrics

    spec = SpecDecodingStats()
    spec.observe(3, 2)
    spec.observe(2, 0)
    spec.observe(0, 0)            # a step without proposals is not a draft
    assert spec.acceptance_rate == pytest.approx(2 / 5)
    assert spec.mean_acceptance_length == pytest.approx(2.0)
    metrics = ServerMetrics("m", 64, lambda: EngineStats(spec_decoding=spec))
    lines = set(metrics.render().decode().splitlines())
    for line in ('heron:spec_decode_num_drafts_total{model_name="m"} 2.0',
                 'heron:spec_decode_num_draft_tokens_total{model_name="m"} 5.0',
                 'heron:spec_decode_num_accepted_tokens_total{model_name="m"} 2.0',
                 'heron:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 1.0',
                 'heron:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 1.0',
                 'heron:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 0.0'):
        assert line in lines, line
