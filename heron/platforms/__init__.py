"""Platforms: the hardware plugins and how device= picks one.

What a plugin author needs is importable from here: `Platform`, `Capabilities`,
`Detection`, `Invariance`, `MemoryInfo`, `MemoryProfile`, `RankPlacement` and the
`hookimpl` marker.
"""
from heron.platforms.hookspecs import hookimpl
from heron.platforms.interface import (Capabilities, Detection, Invariance, MemoryInfo,
                                      MemoryProfile, Platform, RankPlacement)
from heron.platforms.plugins import HeronPluginManager, PluginInfo, make_plugin_manager
from heron.platforms.registry import PlatformError, load_extensions, resolve_platform

__all__ = ["Capabilities", "Detection", "HeronPluginManager", "Invariance", "MemoryInfo",
           "MemoryProfile", "Platform", "PlatformError", "PluginInfo", "RankPlacement", "hookimpl",
           "load_extensions", "make_plugin_manager", "resolve_platform"]
