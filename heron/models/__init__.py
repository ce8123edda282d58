"""Model files, the architecture registry, weight loading and the embedded default model.

Names are imported lazily so that `import heron.models.registry` does not pull in
transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoadedModel": "heron.models.loader",
    "load_model": "heron.models.loader",
    "ModelRegistry": "heron.models.registry",
    "default_model_path": "heron.models.default_model",
    "default_gguf_path": "heron.models.default_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'heron.models' has no attribute {name!r}")
