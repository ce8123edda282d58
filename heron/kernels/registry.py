"""Attention backends by name: the built-in reference backend plus what plugins register.

Plugins add backends through the `register_attention_backends(register)` hook, which
receives `AttentionBackendRegistry.register`; a platform's `attention_backend()` may
then look one up by name, so a kernel package can serve a platform it does not
define.
"""
from __future__ import annotations

from typing import ClassVar

from heron.kernels.interface import AttentionBackend
from heron.kernels.reference import ReferenceAttention


class AttentionBackendRegistry:
    """Process-wide map from backend name (e.g. "reference") to backend class."""

    _backends: ClassVar[dict[str, type[AttentionBackend]]] = {}

    @classmethod
    def register(cls, name: str, backend_cls: type[AttentionBackend]) -> None:
        """Map `name` to `backend_cls`. Registering the same class again is a no-op;
        another class under a taken name raises ValueError (blamed on the later plugin)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an attention backend name must be a non-empty string, got {name!r}")
        if not (isinstance(backend_cls, type) and issubclass(backend_cls, AttentionBackend)):
            raise ValueError(f"attention backend {name!r} must be an AttentionBackend subclass, "
                             f"got {backend_cls!r}")
        existing = cls._backends.get(name)
        if existing is not None and existing is not backend_cls:
            raise ValueError(f"attention backend name {name!r} is already taken by "
                             f"{existing.__module__}.{existing.__qualname__}")
        cls._backends[name] = backend_cls

    @classmethod
    def get(cls, name: str) -> type[AttentionBackend]:
        """The backend class registered under `name`; ValueError naming the known ones."""
        try:
            return cls._backends[name]
        except KeyError:
            raise ValueError(f"unknown attention backend {name!r}; registered: "
                             f"{', '.join(cls.names())}. A plugin adds one through the "
                             "register_attention_backends hook.") from None

    @classmethod
    def names(cls) -> list[str]:
        """Every registered backend name, sorted."""
        return sorted(cls._backends)


AttentionBackendRegistry.register(ReferenceAttention.name, ReferenceAttention)
