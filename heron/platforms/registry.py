"""Plugin manager and device resolution (core code, and loud about failures)."""
from __future__ import annotations

from importlib.metadata import entry_points

import pluggy

from heron import envs
from heron.platforms import hookspecs
from heron.platforms.interface import Platform


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("heron")
    pm.add_hookspecs(hookspecs)
    for ep in entry_points(group="heron"):
        pm.register(ep.load(), name=ep.name)
    pm.check_pending()
    return pm


def collect_platforms(pm: pluggy.PluginManager) -> dict[str, Platform]:
    platforms: dict[str, Platform] = {}
    pm.hook.register_platforms(register=lambda p: platforms.setdefault(p.name, p))
    return platforms


def resolve_platform(device: str = "auto") -> Platform:
    device = envs.get("HERON_DEVICE") or device
    platforms = collect_platforms(make_plugin_manager())
    if device != "auto":
        if device not in platforms:
            raise ValueError(f"unknown device {device!r}; installed platforms: {', '.join(sorted(platforms))}")
        platform = platforms[device]
        detection = platform.detect()
        if not detection.available:
            raise RuntimeError(f"device {device!r} is not available: {detection.reason}")
        return platform
    available = [p for p in platforms.values() if p.detect().available]
    if not available:
        raise RuntimeError("no platform is available")
    return max(available, key=lambda p: p.priority)
