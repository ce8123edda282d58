"""Tiny random Hugging Face models for the suite, and greedy decoding by transformers.

The models are saved as ordinary Hugging Face folders (config.json, safetensors,
a word-level tokenizer), so heron loads them through its normal path while
transformers provides the reference output on the very same weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB_SIZE = 256
# Large enough initial weights that logits are far apart: greedy choices are then
# stable under the float32 rounding differences between two correct implementations.
INIT_RANGE = 0.15

# Two families with different code paths in heron: Llama (GQA, no biases) and
# Qwen2 (q/k/v biases, tied embeddings).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
}


def _save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over "t3" ... "t255"; the suite feeds token ids anyway."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, VOCAB_SIZE)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def build_tiny_model(path: Path, family: str, seed: int = 0) -> Path:
    """Save a random-initialised float32 model of `family` ("llama" or "qwen2") at `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = config_cls(vocab_size=VOCAB_SIZE, max_position_embeddings=256,
                        initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, **TINY_CONFIGS[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _save_tokenizer(path)
    return path


def hf_greedy(model_path: str | Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers in float32, recomputing the whole sequence each
    step (no KV cache: nothing that could drift between the two implementations)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
