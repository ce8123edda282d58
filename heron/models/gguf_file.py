"""GGUF files as models: `LLM("model.gguf")` and `heron serve model.gguf`, as in vLLM.

A GGUF file runs with its weights as they are in the file: `gguf_model_folder` makes,
once, a small Hugging Face folder beside heron's other cached models holding only
config.json, generation_config.json, the tokenizer with its chat template (all from
the file's metadata, read by transformers) and a marker, `heron-gguf.json`, naming the
GGUF file(s). The loader sees the marker and reads the weights from the GGUF files
(heron/models/gguf_weights.py); formats a platform has no kernel for are dequantized
then, with a log line. Writing the folder reads no weight data, but checks every
tensor's header (type, name, length), so a broken file fails before an engine starts.

The folder's name and manifest are keyed by the path, size and modification time of
every file: an edited or replaced file gets a new folder; later starts only verify it.

The config's dtype is bfloat16, the precision transformers' own conversion would
store, unless every weight matrix of the file is F32, in which case it is float32 (a
float32 checkpoint should not lose precision by default). F16 matrices also become
bfloat16 by default: float16 activations can overflow where llama.cpp's float32
arithmetic does not; pass dtype="float32" to keep them exact.

`dequantized_gguf_folder` keeps the earlier path, a full bfloat16 safetensors
conversion, for a platform that needs dense weights in a folder.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

from heron import envs
from heron.logger import get_logger
from heron.models import default_model as converter
from heron.models.gguf_weights import GGUFTensorInfo, describe_tensors, gguf_files
from heron.quantization import UnsupportedQuantType

logger = get_logger(__name__)

MARKER = "heron-gguf.json"

# Hugging Face model_type (as transformers reads it from GGUF) -> heron architecture.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}


def is_gguf_file(model: str) -> bool:
    """Whether `model` names a GGUF file (rather than a Hugging Face folder)."""
    return model.lower().endswith(".gguf") and Path(model).is_file()


def gguf_model_folder(model: str) -> str:
    """The folder heron runs for the GGUF file `model` (made on first use): config and
    tokenizer, with the weights read from the GGUF file(s) at load time.

    For a split model, `model` is its first file. Raises ValueError naming the file
    (and the tensor and its type, where one is at fault) when it cannot be read as a
    model: truncated, corrupt, an architecture or a tensor type heron cannot read."""
    gguf = Path(model).resolve()
    try:
        files = gguf_files(gguf)
        target = _cache_folder(files, "gguf")
        key = _source_key(files)
        if converter.verify_manifest(target, key, MARKER):
            return str(target)
        tensors = describe_tensors(files)
        converter.build_atomically(target, lambda out: _write_folder(files, tensors, out),
                                   gguf.name, key, MARKER)
    except converter.DefaultModelError:
        raise
    except Exception as e:   # from gguf and transformers, or our own checks
        cls = UnsupportedQuantType if isinstance(e, UnsupportedQuantType) else ValueError
        raise cls(f"cannot load {gguf.name} as a GGUF model: {type(e).__name__}: "
                  f"{str(e)[:400]}") from e
    logger.info("%s: config and tokenizer at %s; weights stay in the GGUF file", gguf.name,
                target)
    return str(target)


def gguf_weight_files(folder: Path) -> list[Path] | None:
    """The GGUF files a folder made by `gguf_model_folder` reads its weights from, or
    None for an ordinary folder. Raises ValueError when a file changed or disappeared
    since the folder was made (start from the .gguf file again)."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        entries = json.loads(marker.read_text())["files"]
        files = [Path(entry["path"]) for entry in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{marker} is damaged ({e}); delete {folder} and load the .gguf "
                         f"file again") from e
    for path, entry in zip(files, entries):
        stat = path.stat() if path.is_file() else None
        if stat is None or (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            raise ValueError(f"{path} is missing or changed since {folder} was made from it; "
                             f"load the .gguf file itself again")
    return files


def dequantized_gguf_folder(model: str) -> str:
    """A bfloat16 safetensors folder converted from the GGUF file `model` (once, cached):
    for platforms that need dense weights in a Hugging Face folder."""
    gguf = Path(model).resolve()
    target = _cache_folder([gguf], "gguf-bf16")
    key = _source_key([gguf])
    if converter.verify_manifest(target, key):
        return str(target)
    converter._check_converter_dependencies()
    logger.warning("%s: dequantizing it into bfloat16 at %s (once per file)", gguf.name, target)
    try:
        converter._convert_atomically(gguf, target, key)
    except converter.DefaultModelError:
        raise
    except Exception as e:   # the converter's errors come from gguf and transformers
        raise ValueError(f"cannot load {gguf.name} as a GGUF model: {type(e).__name__}: "
                         f"{str(e)[:300]}") from e
    return str(target)


def _source_key(files: Sequence[Path]) -> str:
    text = ";".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_folder(files: Sequence[Path], prefix: str) -> Path:
    stem = re.sub(r"[^a-z0-9._-]+", "-", files[0].stem.lower())
    return envs.cache_dir() / "models" / f"{prefix}-{stem}-{_source_key(files)[:12]}"


def _write_folder(files: Sequence[Path], tensors: Sequence[GGUFTensorInfo], out: Path) -> None:
    """config.json, generation_config.json, tokenizer files and the marker into `out`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, name = str(files[0].parent), files[0].name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model_type = getattr(config, "model_type", "")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"{name} is a {model_type!r} model; heron runs GGUF files of "
                         f"{', '.join(_ARCHITECTURES)}")
    config.architectures = [_ARCHITECTURES[model_type]]
    # transformers looks for output.weight in the first file only; in a split model it
    # may be in any part.
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in tensors)
    matrices = {t.type_name for t in tensors if len(t.shape) == 2}
    config.dtype = "float32" if matrices == {"F32"} else "bfloat16"
    config.save_pretrained(str(out))
    generation = GenerationConfig.from_model_config(config)
    if generation.to_diff_dict():
        generation.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(str(out))
    if tokenizer.chat_template and not AutoTokenizer.from_pretrained(str(out)).chat_template:
        raise ValueError(f"the chat template of {name} was lost on the way to {out}")
    entries = [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
               for f in files]
    (out / MARKER).write_text(json.dumps({"files": entries}, indent=1))
