"""Tokenizer loading and the model's end-of-sequence ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local folder, with a clear error if there is none."""
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist: pass a local Hugging Face "
                                "model folder (config.json, tokenizer files, .safetensors)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e


def resolve_eos_token_ids(model_path: str, tokenizer: Any) -> list[int]:
    """EOS ids from generation_config.json (which may list several) and the tokenizer."""
    ids: list[int] = []
    gen_config = Path(model_path) / "generation_config.json"
    if gen_config.exists():
        value = json.loads(gen_config.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else ([value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def check_unicode(text: str, what: str = "the prompt") -> None:
    """Refuse text that is not valid Unicode: a lone surrogate such as "\\ud800" decodes
    from JSON, but cannot be encoded, and the tokenizer fails on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: {e.reason} at character "
                         f"{e.start}") from None
