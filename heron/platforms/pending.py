"""A base for built-in platforms whose detection works but whose execution is not built yet.

Such a platform is listed by ``heron platforms`` with an honest detection result.
When its hardware is present it still reports itself *unavailable*, with a reason
that says the hardware was found and what heron lacks to use it: so `device="auto"`
never picks a platform that cannot run, and `device="NAME"` fails with that reason.
It never hands the work to another device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from heron.platforms.interface import Capabilities, Detection, MemoryInfo, Platform

if TYPE_CHECKING:
    import torch

    from heron.config import EngineConfig
    from heron.kernels.interface import AttentionBackend


class PendingPlatform(Platform):
    """Detects its hardware; runs nothing yet (its capabilities declare no dtype)."""

    capabilities = Capabilities(dtypes=frozenset(), prefix_caching=False, chunked_prefill=False)
    missing: ClassVar[str] = "model execution"   # what is not implemented, in words

    def not_ready(self) -> str:
        """The error a user gets when choosing this platform."""
        return (f"heron cannot run models on {self.name} yet: its {self.missing} is not "
                "implemented (a later issue). Run on another platform, e.g. device='cpu'; "
                "`heron platforms` lists them")

    def available(self, reason: str) -> Detection:
        """What detect() returns when the hardware is there: still unavailable, because
        execution is missing, with both facts in the reason."""
        return Detection(False, f"{reason} found, but {self.not_ready()}")

    def validate(self, config: "EngineConfig") -> list[str]:
        return [self.not_ready()]

    def attention_backend(self, dtype: "torch.dtype", head_size: int) -> type["AttentionBackend"]:
        raise NotImplementedError(self.not_ready())

    def memory_info(self) -> MemoryInfo:
        raise NotImplementedError(self.not_ready())
