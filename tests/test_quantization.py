"""Weight-only quantization (`quantization="int8"/"int4"`) and quantized layers in the engine.

Accuracy of the kernels themselves is in test_cpu_quant.py; here: the quantizers' own
error bounds, the engine running quantized models (compiled and eager giving the same
tokens, batches not changing them), load-time dequantization where no kernel runs a
format, and the refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from heron import LLM, SamplingParams
from heron.config import EngineConfig
from heron.kernels.cpu_quant import CpuQuantLinear, load_quant
from heron.quantization import QuantizedLinear, dequantize_linears
from heron.quantization.weight_only import quantize_int4, quantize_int8
from model_utils import generations

needs_kernel = pytest.mark.skipif(load_quant()[0] is None, reason="cpu_quant.c does not build")


def test_int8_is_within_half_a_step_per_channel():
    w = torch.randn(24, 96) * torch.linspace(0.1, 3, 24)[:, None]
    t = quantize_int8(w, "w")
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((t.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert t.nbytes() == 24 * (96 + 4)


def test_int4_is_within_half_a_step_per_group():
    w = torch.randn(16, 128)
    t = quantize_int4(w, "w")
    groups = w.reshape(16, 4, 32)
    step = (groups.amax(dim=2) - groups.amin(dim=2)) / 15
    err = (t.dequantize() - w).abs().reshape(16, 4, 32)
    assert (err <= step[..., None] / 2 + 1e-6).all()
    assert t.nbytes() == 16 * 4 * 24          # 6 bits per weight with float32 scale and offset


def test_int4_refuses_features_off_the_group():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(4, 40), "odd")


def test_dequantize_linears_gives_the_dense_layer():
    layer = QuantizedLinear(64, 16, torch.randn(16), torch.float32)
    layer.set_part(0, quantize_int8(torch.randn(16, 64), "w"))
    model = nn.Sequential(layer)
    assert dequantize_linears(model, keep={"int8"}) == 0
    assert dequantize_linears(model) == 1
    dense = model[0]
    assert isinstance(dense, nn.Linear)
    assert torch.equal(dense.weight, layer.dequantized_weight())
    x = torch.randn(3, 64)
    assert torch.allclose(dense(x), layer(x))



@needs_kernel
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_model_compiled_equals_eager_and_ignores_batching(tiny_model_factory, method,
                                                                    dtype):
    path = tiny_model_factory("qwen2")      # biases on q/k/v, untied head
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], list(range(3, 40))]
    kwargs = dict(dtype=dtype, device="cpu", kv_cache_memory_bytes=1 << 24, quantization=method)
    compiled = LLM(path, **kwargs)
    runner = compiled.llm_engine.executor.runner
    assert runner.compiled is not None
    layers = [m for m in runner.model.modules() if isinstance(m, CpuQuantLinear)]
    assert len(layers) == 2 * 4 + 1                      # every linear, the head included
    together = generations(compiled, prompts, params)
    alone = [generations(compiled, [p], params)[0] for p in prompts]
    assert together == alone
    eager = LLM(path, enforce_eager=True, **kwargs)
    assert generations(eager, prompts, params) == together


@needs_kernel
def test_quantized_head_of_a_tied_model(tiny_model_factory):
    path = tiny_model_factory("llama", tie_word_embeddings=True)
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 24,
              quantization="int8")
    model = llm.llm_engine.executor.runner.model
    assert isinstance(model.lm_head, CpuQuantLinear)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="unknown quantization 'awq'"):
        EngineConfig.create(quantization="awq")
    with pytest.raises(ValueError, match="needs a .gguf model file"):
        EngineConfig.create(quantization="gguf", model="/some/folder")


def test_platform_without_kernels_refuses_int8():
    from heron.platforms.cpu.platform import CpuPlatform
    from heron.platforms.interface import Capabilities
    cpu = CpuPlatform()
    config = EngineConfig.create(quantization="int4", device="cpu")

    class NoKernels(CpuPlatform):
        name = "nokernels"

        @property
        def capabilities(self) -> Capabilities:
            return Capabilities(dtypes=frozenset({"float32"}))

    reasons = NoKernels().validate(config)
    assert any("no kernel for int4 weights" in r for r in reasons)
    tp = EngineConfig.create(quantization="int8", device="cpu", tensor_parallel_size=2)
    if "int8" in cpu.capabilities.quantization:
        assert any("one rank only" in r for r in cpu.validate(tp))


def test_quantization_flag_reaches_the_engine():
    from heron.entrypoints.cli import build_parser, parallel_kwargs
    args = build_parser().parse_args(["generate", "hi", "--quantization", "int4"])
    assert parallel_kwargs(args)["quantization"] == "int4"
