"""Sampling parameters behave as documented."""
import pytest

from heron import LLM, SamplingParams

PROMPT = {"prompt_token_ids": [5, 6, 7, 8, 9, 10]}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, dtype="float32")


def one(llm, params, prompt=PROMPT):
    return llm.generate(prompt, params, use_tqdm=False)[0]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    a = one(llm, params).outputs[0].token_ids
    # same seed inside a batch with other (unseeded) requests
    outs = llm.generate([PROMPT, {"prompt_token_ids": [3, 4]}, PROMPT],
                        [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True), params,
                         params], use_tqdm=False)
    assert outs[2].outputs[0].token_ids == a
    other = one(llm, params.clone(seed=99)).outputs[0].token_ids
    assert other != a


def test_unseeded_sampling_varies(llm):
    params = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    outs = {tuple(one(llm, params).outputs[0].token_ids) for _ in range(3)}
    assert len(outs) > 1


def test_top_k_one_equals_greedy(llm):
    greedy = one(llm, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    topk = one(llm, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=16, ignore_eos=True))
    assert topk.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_tiny_top_p_equals_greedy(llm):
    greedy = one(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    nucleus = one(llm, SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=12, ignore_eos=True))
    assert nucleus.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_max_tokens_and_finish_reason_length(llm):
    out = one(llm, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)).outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_ids(llm):
    free = one(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)).outputs[0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = one(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                  stop_token_ids=[stop_at])).outputs[0]
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_min_tokens_masks_stop_tokens(llm):
    free = one(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)).outputs[0]
    stop_at = free.token_ids[0]
    out = one(llm, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6, ignore_eos=True,
                                  stop_token_ids=[stop_at])).outputs[0]
    assert len(out.token_ids) >= 6
    assert stop_at not in out.token_ids[:6]


def test_stop_string_cuts_text(llm):
    free = one(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)).outputs[0]
    word = free.text.split()[3]
    index = free.text.index(word)
    out = one(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                  stop=[word])).outputs[0]
    assert out.text == free.text[:index]
    assert out.finish_reason == "stop" and out.stop_reason == word
    kept = one(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[word],
                                   include_stop_str_in_output=True)).outputs[0]
    assert kept.text == free.text[:index + len(word)]


def test_eos_ends_generation_unless_ignored(llm):
    # Make EOS (id 2) a stop token we know will be produced: force it through stop_token_ids
    # of the first greedy token and compare with ignore_eos on the tokenizer's eos.
    eos = llm.llm_engine.eos_token_ids
    assert eos == [2]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    out = one(llm, params).outputs[0]
    if 2 in out.token_ids:
        assert out.token_ids[-1] == 2 and out.finish_reason == "stop"
    ignored = one(llm, params.clone(ignore_eos=True)).outputs[0]
    assert len(ignored.token_ids) == 40


def test_n_greater_than_one(llm):
    out = one(llm, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = one(llm, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_logprobs_top_k_and_prompt_logprobs(llm):
    out = one(llm, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2,
                                  ignore_eos=True))
    completion = out.outputs[0]
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert token in position and position[token].rank == 1
        assert len(position) == 3
        assert sorted(lp.rank for lp in position.values()) == [1, 2, 3]
    assert completion.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for p, t in zip(completion.logprobs, completion.token_ids)))
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(PROMPT["prompt_token_ids"])
    for token, position in zip(PROMPT["prompt_token_ids"][1:], out.prompt_logprobs[1:]):
        assert token in position and len(position) in (2, 3)


def test_penalties_change_output(llm):
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = one(llm, base).outputs[0].token_ids
    penalised = one(llm, base.clone(repetition_penalty=5.0)).outputs[0].token_ids
    assert penalised != plain
    # a huge frequency penalty forbids repeats in practice
    freq = one(llm, base.clone(frequency_penalty=2.0, presence_penalty=2.0)).outputs[0].token_ids
    assert len(set(freq)) >= len(set(plain))


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-5), dict(min_p=2.0),
    dict(n=0), dict(max_tokens=0), dict(min_tokens=5, max_tokens=2), dict(presence_penalty=3.0),
    dict(repetition_penalty=0.0), dict(logprobs=-1), dict(stop=[""]), dict(stop_token_ids=[-1]),
    # absurd values a client can send, refused before they reach a step
    dict(temperature=float("inf")), dict(temperature=1e308), dict(temperature=float("nan")),
    dict(repetition_penalty=float("inf")), dict(top_k=2**64), dict(seed=2**70),
    dict(seed=-2**64), dict(n=10**6), dict(logprobs=10**6), dict(prompt_logprobs=21),
    dict(stop=["x"] * 5000), dict(stop=["x" * 5000]), dict(stop_token_ids=[2**40]),
    dict(stop_token_ids=list(range(5000))),
])
def test_invalid_values_raise_value_error_naming_the_field(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == \
        (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.skip_special_tokens and not p.ignore_eos and p.stop == [] and p.seed is None
    with pytest.raises(TypeError):
        SamplingParams(best_off=2)


def test_limits_themselves_are_accepted():
    from heron.core import sampling_params as sp
    SamplingParams(n=sp.MAX_N, temperature=sp.MAX_TEMPERATURE, top_k=sp.MAX_TOP_K,
                   logprobs=sp.MAX_LOGPROBS, stop=["x" * sp.MAX_STOP_LENGTH] * sp.MAX_STOP_STRINGS)
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=2**64 - 4, n=4)   # completion i uses seed + i: all fit 64 bits
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64 - 3, n=4)
