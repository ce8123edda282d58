"""Speculative decoding end to end on a tiny random Llama: greedy output is the same with
and without it (n-gram proposals; the draft model's tests are in
test_speculative_draft.py), whatever the batch, chunking, prefix cache, preemption,
penalties or stop conditions; KV blocks all come back; logprobs match."""
from __future__ import annotations

import dataclasses

import pytest

from heron import LLM, SamplingParams
from heron.config import EngineConfig
from heron.platforms.interface import Capabilities

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


def repetitive_prompts() -> list[dict]:
    """Prompts that repeat short patterns, so n-gram lookup finds proposals (the random
    model follows them sometimes, so some are accepted and some rejected)."""
    patterns = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [40, 41, 40, 42, 43], [7, 7, 8]]
    return [{"prompt_token_ids": (p * 12)[:30]} for p in patterns]


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return LLM(tiny_llama, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def spec(tiny_llama):
    return LLM(tiny_llama, device="cpu", dtype="float32", speculative_config=NGRAM)


def token_ids(llm, prompts, params):
    return [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params,
                                                                        use_tqdm=False)]


def test_greedy_output_is_the_same_and_proposals_are_accepted_and_rejected(plain, spec):
    engine = spec.llm_engine
    free_at_start = engine.scheduler.kv.num_free_blocks
    before = engine.spec_decoding_stats
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    prompts = repetitive_prompts()
    assert token_ids(spec, prompts, params) == token_ids(plain, prompts, params)
    stats = engine.spec_decoding_stats
    accepted = stats.num_accepted_tokens - before.num_accepted_tokens
    proposed = stats.num_draft_tokens - before.num_draft_tokens
    assert 0 < accepted < proposed, (accepted, proposed)
    assert sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens
    assert 0.0 < stats.acceptance_rate < 1.0 and stats.mean_acceptance_length > 1.0
    # every block of the rejected runs came back
    assert engine.scheduler.kv.num_free_blocks == free_at_start
    assert engine.scheduler.kv.usage() == 0.0


def test_one_request_alone_equals_its_batched_self(plain, spec):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = repetitive_prompts()
    alone = [token_ids(spec, [p], params)[0] for p in prompts]
    assert alone == token_ids(plain, prompts, params)


def test_logprobs_of_every_emitted_token(plain, spec):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    prompts = repetitive_prompts()[:2]
    before = spec.llm_engine.spec_decoding_stats.num_accepted_tokens
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert spec.llm_engine.spec_decoding_stats.num_accepted_tokens > before
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        assert g.token_ids == w.token_ids and len(g.logprobs) == len(w.token_ids)
        for token, wpos, gpos in zip(g.token_ids, w.logprobs, g.logprobs):
            assert set(gpos) == set(wpos) and token in gpos
            for t in wpos:
                assert gpos[t].rank == wpos[t].rank
                assert gpos[t].logprob == pytest.approx(wpos[t].logprob, abs=1e-5)
                assert gpos[t].decoded_token == wpos[t].decoded_token
        assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-4)


def test_penalties_and_min_tokens_apply_at_every_tentative_position(plain, spec):
    prompts = repetitive_prompts()
    for params in (SamplingParams(temperature=0.0, max_tokens=32, repetition_penalty=1.3),
                   SamplingParams(temperature=0.0, max_tokens=32, frequency_penalty=0.4,
                                  presence_penalty=0.2, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=32, min_tokens=20,
                                  stop_token_ids=[6, 21, 41, 8])):
        assert token_ids(spec, prompts, params) == token_ids(plain, prompts, params), params


def test_stop_conditions_cut_at_the_first_stop_among_accepted_tokens(plain, spec):
    prompts = repetitive_prompts()
    free = token_ids(plain, prompts, SamplingParams(temperature=0.0, max_tokens=40,
                                                    ignore_eos=True))
    for i, prompt in enumerate(prompts):
        stop_token = free[i][0][12]
        for params in (SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                      stop_token_ids=[stop_token]),
                       SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                      stop=[f"w{stop_token - 3}"]),
                       SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                      stop=[f"w{stop_token - 3}"], include_stop_str_in_output=True),
                       SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)):
            want = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0]
            got = spec.generate(prompt, params, use_tqdm=False)[0].outputs[0]
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
                (want.token_ids, want.text, want.finish_reason, want.stop_reason), params
            assert len(want.token_ids) <= 13
            assert want.finish_reason == ("length" if params.max_tokens == 13 else "stop")


def test_seeded_sampling_is_reproducible_under_speculation(spec):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11, max_tokens=32,
                            ignore_eos=True)
    prompts = repetitive_prompts()
    first = token_ids(spec, prompts, params)
    assert token_ids(spec, prompts[::-1], params)[::-1] == first
    assert token_ids(spec, prompts, params.clone(seed=12)) != first


def test_chunked_prefill_prefix_cache_preemption_and_n(tiny_llama):
    """A cache of 10 blocks of 16 tokens for 4 sequences of 30 + 60 tokens: preemptions
    happen; prompts are chunked (a budget of 24 tokens) and share a cached prefix."""
    settings = dict(device="cpu", dtype="float32", max_num_batched_tokens=24,
                    num_gpu_blocks_override=10, max_model_len=160, block_size=16)
    plain = LLM(tiny_llama, **settings)
    spec = LLM(tiny_llama, speculative_config=NGRAM, **settings)
    shared = [9, 8, 7, 9, 8, 7] * 3
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"][:12]}
               for p in repetitive_prompts()[:2]]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, n=2)
    want = token_ids(plain, prompts, params)
    got = token_ids(spec, prompts, params)
    assert got == want and all(a == b for a, b in got)     # n=2 greedy: two equal copies
    engine = spec.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.kv.stats.hits > 0
    assert engine.spec_decoding_stats.num_accepted_tokens > 0
    assert engine.scheduler.kv.num_free_blocks == 10
    random = SamplingParams(temperature=1.0, max_tokens=60, ignore_eos=True, n=2, seed=3)
    outs = spec.generate(prompts, random, use_tqdm=False)
    assert all(len(c.token_ids) == 60 for o in outs for c in o.outputs)
    assert engine.scheduler.kv.num_free_blocks == 10


def test_a_platform_without_speculative_decoding_refuses_it():
    from heron.platforms.cpu.platform import CpuPlatform

    class NoSpec(CpuPlatform):
        name = "nospec"

        @property
        def capabilities(self) -> Capabilities:
            return dataclasses.replace(super().capabilities, speculative_decoding=False)

    config = EngineConfig.create(speculative_config=NGRAM)
    reasons = NoSpec().validate(config)
    assert any("no speculative decoding" in r for r in reasons)
    assert not any("speculative" in r for r in CpuPlatform().validate(config))
    draft_tp = EngineConfig.create(speculative_config={"model": "/m", "num_speculative_tokens": 2},
                                   tensor_parallel_size=2)
    assert any("draft model runs on one rank" in r for r in CpuPlatform().validate(draft_tp))


def test_openvino_refuses_a_draft_model_but_not_ngram():
    from heron.platforms.openvino.platform import OpenVinoPlatform

    platform = OpenVinoPlatform()
    draft = EngineConfig.create(speculative_config={"model": "/m", "num_speculative_tokens": 2})
    assert any("draft model is not supported on openvino" in r for r in platform.validate(draft))
    assert not any("specul" in r for r in platform.validate(EngineConfig.create(
        speculative_config=NGRAM)))


def test_cli_flag_parses_json():
    from heron.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "--speculative-config",
                                      '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative-config", "ngram"])


def test_openvino_verifies_ngram_proposals(tiny_llama):
    """The openvino runner shares the step code: n-gram speculation works there too."""
    from heron.platforms.openvino.platform import OpenVinoPlatform

    detection = OpenVinoPlatform().detect()
    if not detection.available:
        pytest.skip(detection.reason)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = LLM(tiny_llama, device="openvino", dtype="float32")
    spec = LLM(tiny_llama, device="openvino", dtype="float32", speculative_config=NGRAM)
    prompts = repetitive_prompts()
    assert token_ids(spec, prompts, params) == token_ids(plain, prompts, params)
    stats = spec.llm_engine.spec_decoding_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert spec.llm_engine.scheduler.kv.num_free_blocks == spec.llm_engine.num_blocks
