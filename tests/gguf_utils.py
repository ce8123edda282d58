"""Tiny GGUF files written with gguf's GGUFWriter from a Hugging Face folder, laid out
as llama.cpp's converter lays them out (names, reversed shapes, q/k rows permuted for
`llama`), with a small gpt2-style tokenizer so transformers can read the metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from conftest import WORDS

_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_FLOATS = {"F32": np.float32, "F16": np.float16}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}.{suffix}"


def rope_interleave(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, HF's halves (2, d/2) become pairs (d/2, 2)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def randomize_vectors(hf_dir: str | Path, seed: int = 0) -> Path:
    """Give the model's biases and norm weights random values (HF initialises them to 0
    and 1, which would hide a loader that drops or misplaces them)."""
    from safetensors.torch import load_file, save_file

    path = Path(hf_dir) / "model.safetensors"
    weights = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if name.endswith(".bias"):
            tensor.normal_(0.0, 0.1, generator=generator)
        elif "norm" in name:
            tensor.uniform_(0.8, 1.2, generator=generator)
    save_file(weights, str(path), metadata={"format": "pt"})
    return Path(hf_dir)


def tensor_type(name: str, ndim: int, qtype: str, overrides: dict[str, str] | None) -> str:
    """The GGUF type `write_gguf` gives a tensor."""
    return (overrides or {}).get(name, qtype if ndim == 2 else "F32")


def quantized_roundtrip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a weight becomes after writing it as `qtype` and reading it back."""
    import gguf

    if qtype in ("F32", "F16"):
        return torch.from_numpy(weight.float().numpy().astype(_FLOATS[qtype])).float()
    kind = gguf.GGMLQuantizationType[qtype]
    data = gguf.quants.quantize(weight.float().numpy(), kind)
    return torch.from_numpy(gguf.quants.dequantize(data, kind).copy())


def roundtrip_hf_model(hf_dir: str | Path, qtype: str = "Q8_0",
                       overrides: dict[str, str] | None = None) -> Any:
    """The Hugging Face model of `hf_dir` (float32) with every weight replaced by what
    `write_gguf` with these types stores: the reference a GGUF loader must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            kind = tensor_type(gguf_name(name), param.dim(), qtype, overrides)
            param.copy_(quantized_roundtrip(param, kind))
    return model


def write_gguf(hf_dir: str | Path, out: Path, qtype: str = "Q8_0",
               overrides: dict[str, str] | None = None, split_max_tensors: int = 0,
               extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write the model in `hf_dir` as GGUF: matrices as `qtype`, vectors F32;
    `overrides` maps GGUF tensor names to other types (raw random bytes for types gguf
    cannot quantize); `extra` adds F32 tensors. With `split_max_tensors`, a split model
    (returns its first file)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    arch = config.model_type
    weights = load_file(str(Path(hf_dir) / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    _write_metadata(writer, config)
    rng = np.random.default_rng(0)
    # llama.cpp's order: the embedding first, the output head last.
    for hf, tensor in sorted(weights.items(), key=lambda item: item[0] == "lm_head.weight"):
        name = gguf_name(hf)
        array = tensor.float().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            array = rope_interleave(array, heads)
        kind = tensor_type(name, array.ndim, qtype, overrides)
        if kind in ("F32", "F16"):
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=_FLOATS[kind]))
            continue
        qkind = gguf.GGMLQuantizationType[kind]
        try:
            data = gguf.quants.quantize(array, qkind)
        except NotImplementedError:
            block, size = gguf.GGML_QUANT_SIZES[qkind]
            data = rng.integers(0, 256, (array.shape[0], array.shape[1] // block * size),
                                dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=qkind)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return out.with_name(f"{out.stem}-00001-of-{len(writer.tensors):05d}.gguf")
    return out


def _write_metadata(writer: Any, config: Any) -> None:
    writer.add_name(f"tiny {config.model_type}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + WORDS)
    writer.add_token_types([3, 3, 3] + [1] * len(WORDS))
    writer.add_token_scores([0.0] * (3 + len(WORDS)))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }} {% endfor %}")
