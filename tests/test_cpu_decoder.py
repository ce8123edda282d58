"""The cpu platform's compiled forward (csrc/cpu_decoder.c, one C call per step) against
the eager model (the layers called from Python): the same hidden states and KV cache
contents bit for bit, and the same generations, in float32 and bfloat16."""
from __future__ import annotations

import pytest
import torch

from heron import LLM, SamplingParams
from heron.forward_context import ForwardContext, set_forward_context
from heron.kernels.cpu_decoder import CpuDecoder, load_decoder
from heron.worker.step_inputs import build_metadata
from model_utils import generations

pytestmark = pytest.mark.skipif(load_decoder()[0] is None, reason="gcc cannot build the C kernels")


def runner_of(llm: LLM):
    return llm.llm_engine.executor.runner


def eager_hidden(runner, ids, meta, caches):
    with torch.inference_mode(), \
            set_forward_context(ForwardContext(meta, caches, runner.backend, runner.layer_ops)):
        return runner.model(ids, meta.positions)


def compare_one_step(runner, seed: int) -> None:
    """A mixed step (a 2-chunk prefill continuing, a fresh prompt, two decodes) on both paths,
    each on its own copy of a cache holding the same earlier context."""
    g = torch.Generator().manual_seed(seed)
    bs = runner.block_size
    starts, lens = [5, 0, 37, 70], [9, 13, 1, 1]
    blocks, next_block = [], 1
    for s, n in zip(starts, lens):
        count = -(-(s + n) // bs)
        blocks.append(list(range(next_block, next_block + count)))
        next_block += count
    meta = build_metadata(blocks, starts, lens, bs, torch.device("cpu"))
    ids = torch.randint(0, runner.vocab_size, (meta.num_tokens,), generator=g)
    # Earlier context: random keys and values where the sequences already have tokens.
    base = [torch.randn(c.shape, generator=g).to(c.dtype) for c in runner.kv_caches]
    base = [c[:next_block + 1].clone() for c in base]
    eager_caches = [c.clone() for c in base]
    compiled_caches = [c.clone() for c in base]
    expected = eager_hidden(runner, ids, meta, eager_caches)
    with torch.inference_mode():
        got = runner.compiled(ids, meta, compiled_caches)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    for a, b in zip(compiled_caches, eager_caches):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("llama", "bfloat16"),
                                        ("qwen2", "float32"), ("qwen2", "bfloat16")])
def test_compiled_step_equals_eager_bit_for_bit(tiny_model_factory, arch, dtype):
    llm = LLM(tiny_model_factory(arch), dtype=dtype, device="cpu",
              kv_cache_memory_bytes=1 << 24)
    runner = runner_of(llm)
    assert isinstance(runner.compiled, CpuDecoder)
    for seed in range(3):
        compare_one_step(runner, seed)



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generations_equal_eager(tiny_llama, dtype):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], list(range(3, 40))]
    compiled = LLM(tiny_llama, dtype=dtype, device="cpu", kv_cache_memory_bytes=1 << 24)
    eager = LLM(tiny_llama, dtype=dtype, device="cpu", kv_cache_memory_bytes=1 << 24,
                enforce_eager=True)
    assert runner_of(compiled).compiled is not None and runner_of(eager).compiled is None
    assert generations(compiled, prompts, params) == generations(eager, prompts, params)


@pytest.mark.slow
def test_smollm2_compiled_equals_eager(smollm2_path):
    """The embedded model in its default dtype: one mixed step bit for bit, and a batch of
    chats token for token with equal log-probabilities."""
    compiled = LLM(smollm2_path, dtype="bfloat16", device="cpu", max_model_len=512,
                   kv_cache_memory_bytes=1 << 26)
    runner = runner_of(compiled)
    assert isinstance(runner.compiled, CpuDecoder)
    compare_one_step(runner, 0)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    want = generations(compiled, prompts, params)
    del compiled, runner
    eager = LLM(smollm2_path, dtype="bfloat16", device="cpu", max_model_len=512,
                kv_cache_memory_bytes=1 << 26, enforce_eager=True)
    assert generations(eager, prompts, params) == want


def test_bad_token_id_is_an_error_not_a_crash(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 24)
    runner = runner_of(llm)
    meta = build_metadata([[1]], [0], [2], runner.block_size, torch.device("cpu"))
    ids = torch.tensor([1, runner.vocab_size + 5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.compiled(ids, meta, runner.kv_caches)


def test_enforce_eager_flag_reaches_the_engine():
    from heron.entrypoints.cli import build_parser, parallel_kwargs
    args = build_parser().parse_args(["generate", "hi", "--enforce-eager"])
    assert parallel_kwargs(args)["enforce_eager"] is True
    args = build_parser().parse_args(["serve"])
    assert parallel_kwargs(args)["enforce_eager"] is False


def test_caches_in_another_layout_run_eagerly(tiny_llama):
    """bfloat16 in blocks of one token: the attention backend keeps such caches in the
    reference layout, so the compiled forward steps aside and generation still works."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    odd = LLM(tiny_llama, dtype="bfloat16", device="cpu", kv_cache_memory_bytes=1 << 24,
              block_size=1)
    runner = runner_of(odd)
    assert runner.compiled is not None
    meta = build_metadata([[0, 1]], [0], [2], 1, torch.device("cpu"))
    assert runner.compiled(torch.tensor([1, 2]), meta, runner.kv_caches) is None
    eager = LLM(tiny_llama, dtype="bfloat16", device="cpu", kv_cache_memory_bytes=1 << 24,
                block_size=1, enforce_eager=True)
    prompts = [[1, 2, 3, 4, 5]]
    assert generations(odd, prompts, params) == generations(eager, prompts, params)


def test_models_that_change_a_layer_run_eagerly(tiny_llama):
    """The C loop hard-codes heron's Llama layers: a subclass that only loads weights
    differently keeps it, one whose layers compute something else does not."""
    from heron.kernels.cpu_decoder import why_not_compiled
    from heron.models.llama import LlamaForCausalLM, LlamaMLP

    llm = LLM(tiny_llama, dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 24)
    runner = runner_of(llm)
    model = runner.model
    assert why_not_compiled(model, runner.backend, runner.dtype) is None

    class LoadsDifferently(LlamaForCausalLM):
        def load_weights(self, weights):
            super().load_weights(weights)

    class OwnForward(LlamaForCausalLM):
        def forward(self, input_ids, positions):
            return super().forward(input_ids, positions) * 2

    class OtherMLP(LlamaMLP):
        def forward(self, x):
            return super().forward(x) * 2

    original_cls, original_mlp_cls = type(model), type(model.model.layers[0].mlp)
    try:
        model.__class__ = LoadsDifferently
        assert why_not_compiled(model, runner.backend, runner.dtype) is None
        model.__class__ = OwnForward
        assert "overrides forward" in why_not_compiled(model, runner.backend, runner.dtype)
        model.__class__ = original_cls
        model.model.layers[0].mlp.__class__ = OtherMLP
        assert "OtherMLP" in why_not_compiled(model, runner.backend, runner.dtype)
    finally:
        model.__class__ = original_cls
        model.model.layers[0].mlp.__class__ = original_mlp_cls
