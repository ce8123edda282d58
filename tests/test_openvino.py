"""The openvino platform: heron's scheduler and KV cache driving a model compiled by OpenVINO.

The conformance suite covers the platform contract on tiny Llama and Qwen2 models
(greedy equal to Hugging Face in f32, batch invariance, preemption, chunked prefill,
prefix caching, bad input). Here: the same suite run as a plugin author runs it,
SmolLM2 against Hugging Face, and what is particular to openvino (options, the
converted-model cache, block sizes, detection without openvino).
"""
from __future__ import annotations

import pytest

from heron import LLM, SamplingParams
from heron.platforms.openvino.platform import OpenVinoPlatform

pytest.importorskip("openvino", reason="the openvino extra is not installed")

from heron.platforms.openvino.options import OpenVinoOptions  # noqa: E402
from test_conformance_runs import run_conformance  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(autouse=True)
def no_device_override(monkeypatch):
    """HERON_DEVICE in the environment would override device="openvino"."""
    monkeypatch.delenv("HERON_DEVICE", raising=False)


@pytest.fixture()
def ov_cache(tmp_path, monkeypatch):
    """A private converted-model cache for one test."""
    path = tmp_path / "ov-cache"
    monkeypatch.setenv("HERON_OPENVINO_CACHE_DIR", str(path))
    return path


def test_openvino_is_available_here():
    detection = OpenVinoPlatform().detect()
    assert detection.available, detection.reason
    assert "OpenVINO" in detection.reason and "CPU" in detection.reason
    from heron.platforms.registry import resolve_platform
    assert resolve_platform("auto").name == "cpu", "openvino is chosen by name only"


def test_conformance_suite_passes_for_openvino(tmp_path):
    result = run_conformance("openvino", tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_second_engine_reads_the_converted_model_from_the_cache(tiny_llama, ov_cache):
    first = LLM(tiny_llama, device="openvino", dtype="float32")
    runner = first.llm_engine.executor.runner
    assert not runner.converted.from_cache
    irs = sorted(ov_cache.rglob("model.xml"))
    assert len(irs) == 1
    expected = first.generate("w1 w2 w3", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    second = LLM(tiny_llama, device="openvino", dtype="float32")
    assert second.llm_engine.executor.runner.converted.from_cache
    assert sorted(ov_cache.rglob("model.xml")) == irs
    assert second.generate("w1 w2 w3", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_an_unreadable_cached_model_is_converted_again(tiny_llama, ov_cache):
    LLM(tiny_llama, device="openvino", dtype="float32")
    (xml,) = ov_cache.rglob("model.xml")
    xml.write_text("<net>truncated")
    llm = LLM(tiny_llama, device="openvino", dtype="float32")
    assert not llm.llm_engine.executor.runner.converted.from_cache
    assert len(llm.generate("w1 w2", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
    assert LLM(tiny_llama, device="openvino", dtype="float32").llm_engine.executor.runner \
        .converted.from_cache, "the IR was not saved again"


def test_an_unwritable_cache_still_runs(tiny_llama, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("HERON_OPENVINO_CACHE_DIR", str(blocked))
    llm = LLM(tiny_llama, device="openvino", dtype="float32")
    assert len(llm.generate("w1 w2", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_a_different_dtype_gets_its_own_converted_model(tiny_llama, ov_cache):
    LLM(tiny_llama, device="openvino", dtype="float32")
    LLM(tiny_llama, device="openvino", dtype="bfloat16")
    assert len(list(ov_cache.rglob("model.xml"))) == 2


def test_block_size_defaults_to_the_devices_and_others_are_refused(tiny_llama):
    llm = LLM(tiny_llama, device="openvino", dtype="float32")
    assert llm.llm_engine.config.cache.block_size == 32
    with pytest.raises(ValueError, match="block_size 16 is not supported on openvino"):
        LLM(tiny_llama, device="openvino", dtype="float32", block_size=16)


def test_kv_cache_space_variable_sets_the_number_of_blocks(tiny_llama, monkeypatch):
    monkeypatch.setenv("HERON_OPENVINO_KVCACHE_SPACE", "0.01")
    small = LLM(tiny_llama, device="openvino", dtype="float32").llm_engine
    block_bytes = small.executor.runner.kv_block_bytes()
    assert small.num_blocks == int(0.01 * 2**30) // block_bytes


@pytest.mark.parametrize("dtype,kv_precision", [("float32", "u8"), ("float32", "f16"),
                                                ("bfloat16", "bf16"), ("bfloat16", "u8")])
def test_kv_cache_precisions_run(tiny_llama, monkeypatch, dtype, kv_precision):
    monkeypatch.setenv("HERON_OPENVINO_KV_CACHE_PRECISION", kv_precision)
    if kv_precision == "bf16" and not _device_has_bf16():
        # An AVX2-only CPU computes in f32 and refuses a bf16 cache: a clear error, then.
        with pytest.raises(ValueError, match="KV_CACHE_PRECISION=bf16.*expect kvcache type f32"):
            LLM(tiny_llama, device="openvino", dtype=dtype)
        return
    llm = LLM(tiny_llama, device="openvino", dtype=dtype)
    runner = llm.llm_engine.executor.runner
    assert runner.compiled.get_property("KV_CACHE_PRECISION").to_string() == kv_precision
    out = llm.generate(["w1 w2 w3", "w4 w5"], GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]


def test_a_combination_the_device_refuses_is_a_clear_error(tiny_llama, monkeypatch):
    monkeypatch.setenv("HERON_OPENVINO_KV_CACHE_PRECISION", "bf16")
    with pytest.raises(ValueError, match="OpenVINO cannot compile the model for CPU with .*"
                                         "KV_CACHE_PRECISION=bf16.*HERON_OPENVINO_KV_CACHE_PRECISION"):
        LLM(tiny_llama, device="openvino", dtype="float32")


def test_only_the_cpu_device_is_accepted(tiny_llama, monkeypatch):
    monkeypatch.setenv("HERON_OPENVINO_DEVICE", "GPU")
    with pytest.raises(ValueError, match="OpenVINO device 'GPU' is not supported.*only CPU"):
        LLM(tiny_llama, device="openvino", dtype="float32")


def test_bad_options_say_which_variable(monkeypatch):
    monkeypatch.setenv("HERON_OPENVINO_INFERENCE_PRECISION", "fp8")
    with pytest.raises(ValueError, match="HERON_OPENVINO_INFERENCE_PRECISION"):
        OpenVinoOptions.from_env()
    monkeypatch.delenv("HERON_OPENVINO_INFERENCE_PRECISION")
    monkeypatch.setenv("HERON_OPENVINO_KVCACHE_SPACE", "0")
    with pytest.raises(ValueError, match="HERON_OPENVINO_KVCACHE_SPACE"):
        OpenVinoOptions.from_env()


def test_options_given_to_the_platform_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("HERON_OPENVINO_KV_CACHE_PRECISION", "u8")
    platform = OpenVinoPlatform(OpenVinoOptions(kv_cache_precision="f32"))
    assert platform.options.kv_cache_precision == "f32"
    assert OpenVinoPlatform().options.kv_cache_precision == "u8"


def test_f32_compiles_in_f32_and_bf16_follows_the_device():
    options = OpenVinoOptions()
    import torch
    assert options.compile_properties(torch.float32)["INFERENCE_PRECISION_HINT"] == "f32"
    assert options.compile_properties(torch.float32)["KV_CACHE_PRECISION"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in options.compile_properties(torch.bfloat16)


def test_detection_without_openvino_says_how_to_install(monkeypatch):
    import heron.platforms.openvino.platform as module
    monkeypatch.setattr(module, "module_installed", lambda name: False)
    detection = OpenVinoPlatform().detect()
    assert not detection.available
    assert detection.reason == "openvino is not installed (pip install 'heron[openvino]')"


def test_prompt_and_sample_logprobs_match_the_cpu_platform(tiny_llama):
    """Logits at many rows of one step (prompt logprobs) and at the sampled rows, in f32."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    prompts = ["w1 w2 w3 w4 w5 w6", "w7 w8"]
    ov_out = LLM(tiny_llama, device="openvino", dtype="float32").generate(prompts, params,
                                                                         use_tqdm=False)
    cpu_out = LLM(tiny_llama, device="cpu", dtype="float32").generate(prompts, params,
                                                                     use_tqdm=False)
    for ov_req, cpu_req in zip(ov_out, cpu_out):
        assert ov_req.outputs[0].token_ids == cpu_req.outputs[0].token_ids
        assert len(ov_req.prompt_logprobs) == len(ov_req.prompt_token_ids) > 1
        assert len(ov_req.outputs[0].logprobs) == 4
        for ov_pos, cpu_pos in zip(ov_req.prompt_logprobs[1:], cpu_req.prompt_logprobs[1:]):
            assert set(ov_pos) == set(cpu_pos)
            for token, lp in cpu_pos.items():
                assert ov_pos[token].logprob == pytest.approx(lp.logprob, abs=1e-4)
        for ov_pos, cpu_pos in zip(ov_req.outputs[0].logprobs, cpu_req.outputs[0].logprobs):
            for token, lp in cpu_pos.items():
                assert ov_pos[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def _device_has_bf16() -> bool:
    import openvino as ov
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_a_bf16_model_gets_a_cache_the_device_takes():
    import torch
    options = OpenVinoOptions()
    assert options.compile_properties(torch.bfloat16, ["FP32", "BF16"])["KV_CACHE_PRECISION"] == "bf16"
    assert options.compile_properties(torch.bfloat16, ["FP32", "INT8"])["KV_CACHE_PRECISION"] == "f32"
    asked = OpenVinoOptions(kv_cache_precision="bf16")   # what the user sets is kept
    assert asked.compile_properties(torch.bfloat16, ["FP32"])["KV_CACHE_PRECISION"] == "bf16"
