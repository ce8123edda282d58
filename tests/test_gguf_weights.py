"""GGUF weights read as stored (heron/models/gguf_weights.py) and loaded by load_model.

The embedded SmolLM2 file checks the name mapping and the q/k row order against the
bfloat16 folder transformers converted from it; tiny random models written with
GGUFWriter check quantized, split, Qwen2 (biases, no permutation) and broken files
against Hugging Face running the same (round-tripped) weights.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import build_tiny_model
from gguf_utils import randomize_vectors, roundtrip_hf_model, write_gguf
from heron.distributed import TensorParallelGroup
from heron.models import default_model
from heron.models.gguf_file import gguf_model_folder
from heron.models.gguf_weights import gguf_files, iter_gguf_weights
from heron.models.loader import describe_model, iter_safetensors, load_model, safetensors_files
from heron.quantization import QuantizedLinear, QuantizedTensor, UnsupportedQuantType
from model_utils import PagedRunner, PagedSeq

PROMPT = [1, 9690, 28, 1530, 339, 253, 1046, 2, 19556, 905]
TINY_PROMPT = [1, 17, 200, 45, 3, 99, 250, 8]


def heron_logits(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    """float32 logits of every position of one prefill."""
    block_size = 16
    blocks = list(range(1, 2 + len(tokens) // block_size))
    seq = PagedSeq(tokens=list(tokens), blocks=blocks)
    PagedRunner(model, num_blocks=len(blocks) + 1, block_size=block_size).step([(seq, len(tokens))])
    return torch.stack(seq.logits)


def hf_logits(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_llama_hf(tmp_path_factory) -> Path:
    return randomize_vectors(build_tiny_model(tmp_path_factory.mktemp("hf-llama"), "llama"))


# ---- the embedded model ---------------------------------------------------------------

@pytest.mark.slow
def test_embedded_weights_are_those_of_the_bf16_conversion(smollm2_path):
    """Every tensor, dequantized and rounded to bf16, is the converted folder's tensor:
    names, shapes and the q/k row order (un-permuted here, by transformers there) agree."""
    folder = Path(smollm2_path)
    reference = dict(iter_safetensors(safetensors_files(folder)))
    config = describe_model(str(folder)).hf_config
    seen = set()
    for name, tensor in iter_gguf_weights([default_model.default_gguf_path()], config):
        dense = tensor.dequantize() if isinstance(tensor, QuantizedTensor) else tensor
        assert torch.equal(dense.to(torch.bfloat16), reference[name]), name
        seen.add(name)
    assert seen == set(reference)


@pytest.mark.slow
def test_embedded_model_logits_match_the_bf16_folder(smollm2_path, smollm2_gguf_folder):
    """Both in float32: the GGUF model's weights are the file's values exactly, the
    folder's are those rounded to bf16 (relative error up to 2^-9 per weight). Over 30
    layers that moves logits of magnitude ~35 by at most 0.2 (measured); 0.5 leaves room
    for other BLAS builds while a wrong row order or tensor moves them by whole units."""
    ours = heron_logits(load_model(smollm2_gguf_folder, "float32", keep_quantized=()).model,
                        PROMPT)
    ref = heron_logits(load_model(smollm2_path, "float32").model, PROMPT)
    assert (ours - ref).abs().max() < 0.5
    assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_default_gguf_path_is_the_checked_embedded_file(tmp_path, monkeypatch):
    assert Path(default_model.default_gguf_path()) == default_model.find_gguf()
    bad = tmp_path / default_model.GGUF_NAME
    bad.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(default_model, "find_gguf", lambda: bad)
    with pytest.raises(default_model.DefaultModelError, match="sha256"):
        default_model.default_gguf_path()


# ---- tiny models ----------------------------------------------------------------------

@pytest.mark.parametrize("arch,qtype,overrides,tied", [
    pytest.param("llama", "Q8_0", None, False, id="llama-q8_0"),
    pytest.param("llama", "Q4_0", {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0",
                                   "blk.1.ffn_down.weight": "F16", "output.weight": "Q4_1",
                                   "blk.1.attn_k.weight": "BF16", "output_norm.weight": "BF16"},
                 False, id="llama-mixed-formats"),
    pytest.param("qwen2", "Q8_0", None, True, id="qwen2-biases-tied"),
])
def test_tiny_gguf_runs_like_hf_on_the_same_weights(cache, arch, qtype, overrides, tied):
    hf_dir = randomize_vectors(build_tiny_model(cache / "hf", arch, tie_word_embeddings=tied))
    gguf = write_gguf(hf_dir, cache / "tiny.gguf", qtype, overrides)
    folder = gguf_model_folder(str(gguf))
    ref = hf_logits(roundtrip_hf_model(hf_dir, qtype, overrides), TINY_PROMPT)
    dense = load_model(folder, "float32").model
    assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())
    torch.testing.assert_close(heron_logits(dense, TINY_PROMPT), ref, atol=1e-4, rtol=0)
    # Formats kept: the layers stay quantized (run here by QuantizedLinear's own forward).
    kept = load_model(folder, "float32", keep_quantized={"q8_0", "q4_0", "q4_1", "q5_0"}).model
    layers = [m for m in kept.modules() if isinstance(m, QuantizedLinear)]
    assert layers and (kept.lm_head is not None)
    torch.testing.assert_close(heron_logits(kept, TINY_PROMPT), ref, atol=1e-4, rtol=0)


def test_qwen2_biases_are_mapped_and_rows_left_in_order(tmp_path):
    hf_dir = randomize_vectors(build_tiny_model(tmp_path / "hf", "qwen2"))
    gguf = write_gguf(hf_dir, tmp_path / "qwen2.gguf")
    reference = dict(iter_safetensors([hf_dir / "model.safetensors"]))
    weights = dict(iter_gguf_weights([gguf], describe_model(str(hf_dir)).hf_config))
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = f"model.layers.1.self_attn.{proj}.bias"
        assert torch.equal(weights[bias], reference[bias]) and reference[bias].any(), bias
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, QuantizedTensor) and q.qtype == "q8_0"
    ref_q = reference["model.layers.0.self_attn.q_proj.weight"]
    assert (q.dequantize() - ref_q).abs().max() < ref_q.abs().max() / 100


def test_split_gguf_loads_like_the_single_file(cache, tiny_llama_hf):
    single = write_gguf(tiny_llama_hf, cache / "one.gguf")
    first = write_gguf(tiny_llama_hf, cache / "two.gguf", split_max_tensors=12)
    parts = gguf_files(first)
    assert [p.name for p in parts] == ["two-00001-of-00002.gguf", "two-00002-of-00002.gguf"]
    config = describe_model(str(tiny_llama_hf)).hf_config
    a = list(iter_gguf_weights([single], config))
    b = list(iter_gguf_weights([first], config))
    assert [n for n, _ in a] == [n for n, _ in b]
    assert all(torch.equal(x.data, y.data) if isinstance(x, QuantizedTensor) else torch.equal(x, y)
               for (_, x), (_, y) in zip(a, b))
    folder = gguf_model_folder(str(first))
    assert describe_model(folder).weight_files == parts
    # output.weight is in the second part: the model is still untied.
    assert not describe_model(folder).hf_config.tie_word_embeddings
    torch.testing.assert_close(heron_logits(load_model(folder, "float32").model, TINY_PROMPT),
                               heron_logits(load_model(gguf_model_folder(str(single)),
                                                       "float32").model, TINY_PROMPT),
                               atol=0, rtol=0)


def test_split_gguf_needs_its_first_and_every_part(cache, tiny_llama_hf):
    first = write_gguf(tiny_llama_hf, cache / "two.gguf", split_max_tensors=12)
    with pytest.raises(ValueError, match="pass its first part, two-00001-of-00002.gguf"):
        gguf_files(first.with_name("two-00002-of-00002.gguf"))
    first.with_name("two-00002-of-00002.gguf").unlink()
    with pytest.raises(ValueError, match="two-00002-of-00002.gguf is missing"):
        gguf_model_folder(str(first))


def test_tensor_parallel_dequantizes_before_sharding(cache, tiny_llama_hf):
    folder = gguf_model_folder(str(write_gguf(tiny_llama_hf, cache / "tiny.gguf")))
    full = load_model(folder, "float32").model
    half = load_model(folder, "float32", group=TensorParallelGroup(1, 2),
                      keep_quantized={"q8_0"}).model
    assert not any(isinstance(m, QuantizedLinear) for m in half.modules())
    down = half.get_submodule("model.layers.0.mlp.down_proj.inner")   # its all-reduce wrapper
    assert torch.equal(down.weight, full.model.layers[0].mlp.down_proj.weight[:, 48:])


# ---- broken files ---------------------------------------------------------------------

def test_truncated_file_names_the_tensor(cache, tiny_llama_hf):
    gguf = write_gguf(tiny_llama_hf, cache / "tiny.gguf")
    data = gguf.read_bytes()
    gguf.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ValueError, match=r"tiny.gguf: tensor \S+ \((Q8_0|F32)\) .*truncated"):
        list(iter_gguf_weights([gguf], None))
    with pytest.raises(ValueError, match=r"cannot load tiny.gguf .*truncated"):
        gguf_model_folder(str(gguf))
    assert not list((cache / "cache" / "models").glob("gguf-*"))


def test_unsupported_type_names_the_tensor_and_type(cache):
    # IQ2_XXS blocks span 256 inputs: ffn_down's input is the intermediate size.
    hf_dir = build_tiny_model(cache / "hf", "llama", intermediate_size=256)
    gguf = write_gguf(hf_dir, cache / "iq.gguf", overrides={"blk.1.ffn_down.weight": "IQ2_XXS"})
    with pytest.raises(UnsupportedQuantType, match="tensor blk.1.ffn_down.weight has type IQ2_XXS"):
        list(iter_gguf_weights([gguf], describe_model(str(hf_dir)).hf_config))
    with pytest.raises(UnsupportedQuantType, match="blk.1.ffn_down.weight has type IQ2_XXS"):
        gguf_model_folder(str(gguf))


def test_unknown_type_id_names_the_tensor(cache, tiny_llama_hf):
    gguf = write_gguf(tiny_llama_hf, cache / "tiny.gguf")
    data = bytearray(gguf.read_bytes())
    # Tensor info: name, n_dims (u32), dims (u64 each; one for a norm), type (u32), offset.
    at = data.index(b"output_norm.weight") + len(b"output_norm.weight") + 4 + 8
    data[at:at + 4] = struct.pack("<I", 200)
    gguf.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="tensor output_norm.weight has type id 200"):
        gguf_model_folder(str(gguf))


def test_unknown_tensor_name_is_an_error(cache, tiny_llama_hf):
    gguf = write_gguf(tiny_llama_hf, cache / "extra.gguf",
                      extra={"blk.0.attn_q_norm.weight": np.ones(16)})
    with pytest.raises(ValueError, match=r"tensor blk.0.attn_q_norm.weight \(F32\) is not a weight"):
        gguf_model_folder(str(gguf))
