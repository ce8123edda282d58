"""GGUF files as models: `LLM("model.gguf")` and `heron serve model.gguf`, as in vLLM.

heron has no kernels for GGUF's quantized weight formats yet, so a GGUF file is
dequantized once into a bfloat16 Hugging Face folder (weights, tokenizer and chat
template from the file's metadata) under `$HERON_CACHE_DIR/models`, by the same
converter as the embedded default model, and a log line says so. The folder's name
and manifest are keyed by the file's path, size and modification time: an edited or
replaced file is converted again; every later start only verifies the folder.
Architectures are those transformers reads from GGUF (Llama, Mistral, Qwen2 ...).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from heron import envs
from heron.logger import get_logger
from heron.models import default_model as converter

logger = get_logger(__name__)


def is_gguf_file(model: str) -> bool:
    """Whether `model` names a GGUF file (rather than a Hugging Face folder)."""
    return model.lower().endswith(".gguf") and Path(model).is_file()


def _source_key(gguf: Path) -> str:
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def gguf_model_folder(model: str) -> str:
    """The Hugging Face folder heron runs for the GGUF file `model` (converted on first use).

    Raises ValueError naming the file when it cannot be read as a model (truncated,
    corrupt, or an architecture or quantization type the converter does not know)."""
    gguf = Path(model).resolve()
    key = _source_key(gguf)
    stem = re.sub(r"[^a-z0-9._-]+", "-", gguf.stem.lower())
    target = envs.cache_dir() / "models" / f"gguf-{stem}-{key[:12]}"
    if converter.verify_manifest(target, key):
        return str(target)
    converter._check_converter_dependencies()
    logger.warning("%s: heron has no kernels for quantized GGUF weights yet; dequantizing it "
                   "into bfloat16 at %s (once per file)", gguf.name, target)
    try:
        converter._convert_atomically(gguf, target, key)
    except converter.DefaultModelError:
        raise
    except Exception as e:   # the converter's errors come from gguf and transformers
        raise ValueError(f"cannot load {gguf.name} as a GGUF model: {type(e).__name__}: "
                         f"{str(e)[:300]}") from e
    return str(target)
