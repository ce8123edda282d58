"""Shared fixtures: tiny random Hugging Face models (with a tiny word-level tokenizer)
and the embedded SmolLM2 model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small KV caches keep the suite light; tests that need a size pass it explicitly.
os.environ.setdefault("HERON_CPU_KVCACHE_SPACE", "0.25")
os.environ.setdefault("HERON_OPENVINO_KVCACHE_SPACE", "0.25")

TINY_VOCAB = 256
WORDS = [f"w{i}" for i in range(TINY_VOCAB - 3)]


def save_tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random-initialised tiny model saved as a Hugging Face folder (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    kwargs = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, initializer_range=0.15,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    def make(arch: str = "llama", seed: int = 0, **overrides) -> str:
        return str(build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, seed, **overrides))
    return make


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from heron.models.default_model import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_gguf_folder() -> str:
    """The embedded model's GGUF folder (config and tokenizer; weights stay quantized)."""
    from heron.models.default_model import default_gguf_path
    from heron.models.gguf_file import gguf_model_folder
    return gguf_model_folder(default_gguf_path())


def hf_greedy(model_path: str, prompt_ids: list[int], max_new_tokens: int):
    """Greedy continuation and per-step log-probabilities from Hugging Face, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    tokens, logprobs = [], []
    with torch.inference_mode():
        for _ in range(max_new_tokens):  # full recompute: no cache API, nothing to drift
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            ids.append(token)
    return tokens, logprobs
