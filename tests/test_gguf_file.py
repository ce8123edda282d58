"""GGUF files as models (`LLM("model.gguf")`): dequantized once into a cached folder,
tokenizer and chat template from the file; broken files give an error naming them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0)
    chat = [{"role": "user", "content": "Say hello."}]
    from_file = LLM(str(embedded_gguf), device="cpu", dtype="bfloat16", max_model_len=512,
                    kv_cache_memory_bytes=1 << 26)
    folder = Path(from_file.llm_engine.model_path)
    assert folder.parent == Path(str(embedded_gguf.parent / "cache" / "models"))
    got = from_file.chat(chat, params, use_tqdm=False)[0].outputs[0]
    del from_file
    reference = LLM(smollm2_path, device="cpu", dtype="bfloat16", max_model_len=512,
                    kv_cache_memory_bytes=1 << 26)
    want = reference.chat(chat, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    # A second start reuses the folder: converting again would fail here.
    monkeypatch.setattr(default_model, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert gguf_file.gguf_model_folder(str(embedded_gguf)) == str(folder)


def test_truncated_gguf_is_a_clear_error(embedded_gguf):
    data = embedded_gguf.read_bytes()
    embedded_gguf.write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match=f"cannot load {embedded_gguf.name} as a GGUF model"):
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
