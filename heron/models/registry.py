"""Model classes by the `architectures` names of a Hugging Face config.

Built-in families register here at import; plugins add theirs through the
`register_models(register)` hook, which receives `ModelRegistry.register`.
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn


class ModelRegistry:
    """Process-wide map from architecture name (e.g. "LlamaForCausalLM") to model class.

    Class-level on purpose, as vLLM's: `ModelRegistry.register(...)` works from
    anywhere, and a bound `ModelRegistry.register` is the callback plugins get.
    """

    _models: ClassVar[dict[str, type[nn.Module]]] = {}

    @classmethod
    def register(cls, architecture: str, model_cls: type[nn.Module]) -> None:
        """Map `architecture` to `model_cls`; a later registration replaces an earlier one."""
        if not isinstance(architecture, str) or not architecture:
            raise ValueError(f"architecture must be a non-empty string, got {architecture!r}")
        cls._models[architecture] = model_cls

    @classmethod
    def supported_architectures(cls) -> list[str]:
        """Every registered architecture name, sorted."""
        return sorted(cls._models)

    @classmethod
    def resolve(cls, architectures: list[str]) -> type[nn.Module]:
        """The class of the first supported name in a config's `architectures` list."""
        for arch in architectures or []:
            if arch in cls._models:
                return cls._models[arch]
        names = ", ".join(architectures or []) or "(none: config.json has no 'architectures')"
        raise ValueError(f"unsupported model architecture {names}; heron supports: "
                         f"{', '.join(cls.supported_architectures())}. A plugin can add one "
                         f"through the register_models hook.")


def _register_builtins() -> None:
    from heron.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
    for model_cls in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
        ModelRegistry.register(model_cls.__name__, model_cls)


_register_builtins()
