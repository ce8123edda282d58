"""Greedy output equal to Hugging Face transformers, token for token, on the same weights (fp32).

Logprob tolerance: 1e-4 absolute for the tiny models, 2e-3 for SmolLM2 (30 layers;
different but equally valid float32 summation orders drift by about 1e-4 there).
"""
import pytest

from conftest import hf_greedy
from heron import LLM, SamplingParams

TINY_CONFIGS = [
    # (arch, overrides): MHA, GQA, MQA, tied/untied embeddings, odd sizes, bias (qwen2)
    ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    ("llama", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                   intermediate_size=37, num_hidden_layers=3)),
    ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    ("qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=50, tie_word_embeddings=True)),
]

PROMPTS = [[5, 9, 17, 33, 2 + 60], list(range(3, 40)), [100] * 3 + list(range(50, 90, 3)), [7]]


@pytest.mark.parametrize("arch,overrides", TINY_CONFIGS)
def test_tiny_models_match_hf(tiny_model_factory, arch, overrides):
    path = tiny_model_factory(arch, seed=len(str(overrides)), **overrides)
    llm = LLM(path, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        tokens, logprobs = hf_greedy(path, prompt, 24)
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        ours = [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
        assert ours == pytest.approx(logprobs, abs=1e-4)


SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors:",
]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "openvino"])
def test_smollm2_matches_hf(smollm2_path, device, monkeypatch):
    if device == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    monkeypatch.delenv("HERON_DEVICE", raising=False)
    llm = LLM(smollm2_path, device=device, dtype="float32", max_model_len=512)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0)
    outputs = llm.generate(SMOL_PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(SMOL_PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        tokens, logprobs = hf_greedy(smollm2_path, ids, 32)
        completion = output.outputs[0]
        assert completion.token_ids == tokens, prompt
        assert completion.text == tokenizer.decode(tokens, skip_special_tokens=True)
        ours = [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
        assert ours == pytest.approx(logprobs, abs=2e-3)
