"""GGUF files as models (`LLM("model.gguf")`): a cached folder of config and tokenizer
(chat template included) made once from the file's metadata, weights read from the file
itself; broken files give an error naming them."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import build_tiny_model
from gguf_utils import write_gguf
from heron import LLM, SamplingParams
from heron.models import default_model, gguf_file


@pytest.fixture
def embedded_gguf(tmp_path, monkeypatch) -> Path:
    """A copy of the embedded model's GGUF file, with heron's cache in tmp_path."""
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(default_model.find_gguf(), copy)
    return copy


@pytest.mark.slow
def test_gguf_file_runs_like_the_embedded_model(embedded_gguf, smollm2_path, monkeypatch):
    """Dequantized at load time (as on a platform without quantized kernels), the file's
    weights are the converter's bf16 ones, so the chat reply is the bf16 folder's token
    for token. Kept quantized (the cpu platform's default) the same folder serves the
    file's own formats; how close that stays to Hugging Face is test_quantized_accuracy's."""
    from heron.kernels import cpu_quant
    from heron.kernels.cpu_quant import CpuQuantLinear
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0)
    chat = [{"role": "user", "content": "Say hello."}]
    kernel_formats = cpu_quant.CPU_KERNEL_FORMATS
    monkeypatch.setattr(cpu_quant, "CPU_KERNEL_FORMATS", frozenset())
    from_file = LLM(str(embedded_gguf), device="cpu", dtype="bfloat16", max_model_len=512,
                    kv_cache_memory_bytes=1 << 26)
    folder = Path(from_file.llm_engine.model_path)
    assert folder.parent == Path(str(embedded_gguf.parent / "cache" / "models"))
    got = from_file.chat(chat, params, use_tqdm=False)[0].outputs[0]
    del from_file
    reference = LLM(smollm2_path, device="cpu", dtype="bfloat16", max_model_len=512,
                    kv_cache_memory_bytes=1 << 26)
    want = reference.chat(chat, params, use_tqdm=False)[0].outputs[0]
    del reference
    assert got.token_ids == want.token_ids and got.text == want.text
    monkeypatch.setattr(cpu_quant, "CPU_KERNEL_FORMATS", kernel_formats)
    quantized = LLM(str(embedded_gguf), device="cpu", dtype="bfloat16", max_model_len=512,
                    kv_cache_memory_bytes=1 << 26)
    model = quantized.llm_engine.executor.runner.model
    assert sum(isinstance(m, CpuQuantLinear) for m in model.modules()) == 4 * 30 + 1
    reply = quantized.chat(chat, params, use_tqdm=False)[0].outputs[0]
    assert len(reply.token_ids) == 12 and reply.text.strip()
    # A second start reuses the folder: making it again would fail here.
    monkeypatch.setattr(gguf_file, "_write_folder", lambda *a: pytest.fail("made again"))
    assert gguf_file.gguf_model_folder(str(embedded_gguf)) == str(folder)


@pytest.mark.slow
def test_default_gguf_path_runs_the_embedded_model_quantized(smollm2_gguf_folder):
    """LLM(model=default_gguf_path()) runs the embedded file's quantized weights from the
    shared GGUF folder (that they equal the bf16 folder's, token for token, is the test
    above, on a copy of the same file)."""
    llm = LLM(model=default_model.default_gguf_path(), device="cpu", dtype="bfloat16",
              max_model_len=256, kv_cache_memory_bytes=1 << 25)
    assert llm.llm_engine.model_path == smollm2_gguf_folder
    assert not list(Path(smollm2_gguf_folder).glob("*.safetensors"))
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4


def test_folder_holds_config_tokenizer_and_marker_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = build_tiny_model(tmp_path / "hf", "llama")
    gguf = write_gguf(hf_dir, tmp_path / "tiny.gguf")
    folder = Path(gguf_file.gguf_model_folder(str(gguf)))
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", gguf_file.MARKER,
            default_model.MANIFEST} <= names
    assert not [n for n in names if n.endswith((".safetensors", ".gguf", ".bin"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template
    marker = json.loads((folder / gguf_file.MARKER).read_text())
    assert marker["files"][0]["path"] == str(gguf.resolve())
    assert gguf_file.gguf_weight_files(folder) == [gguf.resolve()]
    # An all-F32 file keeps float32 by default.
    f32 = write_gguf(hf_dir, tmp_path / "f32.gguf", qtype="F32")
    f32_config = json.loads((Path(gguf_file.gguf_model_folder(str(f32))) / "config.json")
                            .read_text())
    assert f32_config["dtype"] == "float32"


def test_a_changed_file_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_gguf(build_tiny_model(tmp_path / "hf", "llama"), tmp_path / "tiny.gguf")
    old = Path(gguf_file.gguf_model_folder(str(gguf)))
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="changed since"):
        gguf_file.gguf_weight_files(old)
    new = Path(gguf_file.gguf_model_folder(str(gguf)))
    assert new != old and gguf_file.gguf_weight_files(new) == [gguf.resolve()]


def test_truncated_gguf_is_a_clear_error(embedded_gguf):
    data = embedded_gguf.read_bytes()
    embedded_gguf.write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match=f"cannot load {embedded_gguf.name} as a GGUF model: "
                                         r".*tensor blk\.\d+\.\w+\.weight \(Q4_1\) .*truncated"):
        LLM(str(embedded_gguf), device="cpu")
    assert not list((embedded_gguf.parent / "cache" / "models").glob("gguf-*"))


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    bogus = tmp_path / "notes.gguf"
    bogus.write_bytes(b"this is not a GGUF file at all" * 100)
    with pytest.raises(ValueError, match="cannot load notes.gguf as a GGUF model"):
        LLM(str(bogus), device="cpu")


def test_only_gguf_files_take_this_path(tmp_path):
    assert gguf_file.is_gguf_file(str(_touch(tmp_path / "m.GGUF")))
    assert not gguf_file.is_gguf_file(str(tmp_path / "absent.gguf"))
    assert not gguf_file.is_gguf_file(str(tmp_path))


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path
