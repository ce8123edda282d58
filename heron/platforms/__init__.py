"""Platforms: the hardware plugins and how device= picks one."""
from heron.platforms.interface import Capabilities, Detection, MemoryInfo, MemoryProfile, Platform
from heron.platforms.registry import resolve_platform

__all__ = ["Capabilities", "Detection", "MemoryInfo", "MemoryProfile", "Platform", "resolve_platform"]
