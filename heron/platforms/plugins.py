"""The plugin manager: built-ins and third-party plugins, loaded the same way.

`make_plugin_manager()` is the factory (nothing is built at import time). It reads
the entry-point group ``heron``, where heron's own pyproject lists the built-in
platforms exactly as a third-party package lists its own, applies the
``HERON_PLUGINS`` allowlist, imports and registers each plugin, and checks its
hooks (`check_pending`). A plugin that fails at any of these steps is recorded
with its package name, version and the error, never silently skipped: the
resolution code and ``heron platforms`` report it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from types import EllipsisType
from typing import Any, Callable, Iterable

import pluggy

from heron import envs
from heron.logger import get_logger
from heron.platforms import hookspecs
from heron.platforms.interface import Detection, Platform

logger = get_logger(__name__)

GROUP = "heron"
# Mirrors [project.entry-points.heron] in pyproject.toml. Used only for names the
# installed metadata lacks (a source tree without `pip install -e .`, or a stale
# heron.egg-info earlier on sys.path), so that the built-ins still load through
# the entry-point path.
BUILTIN_ENTRY_POINTS = {
    name: f"heron.platforms.{name}" for name in ("cpu", "cuda", "rocm", "openvino", "xla", "neuron")
}


@dataclass(frozen=True)
class PluginInfo:
    """One entry point of the ``heron`` group: which package provides it and how it went.

    `name` is the entry-point name (what ``HERON_PLUGINS`` lists); `error` is None for
    a plugin that loaded, else what went wrong ("ImportError: ...")."""
    name: str
    package: str
    version: str
    value: str
    error: str | None = None

    def describe(self) -> str:
        return f"plugin {self.name!r} (package {self.package} {self.version})"


@dataclass(frozen=True)
class PlatformEntry:
    """A registered platform, the plugin that registered it, and what its detect() said."""
    platform: Platform
    plugin: PluginInfo
    detection: Detection


def safe_detect(platform: Platform) -> Detection:
    """`platform.detect()`, with an exception or a wrong return type turned into an
    unavailable Detection that quotes it."""
    try:
        detection = platform.detect()
    except Exception as e:  # noqa: BLE001 - the contract says never raise; enforce it here
        return Detection(False, f"detect() raised {type(e).__name__}: {e}")
    if not isinstance(detection, Detection):
        return Detection(False, f"detect() returned {detection!r}, not a Detection")
    return detection


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_allowlist(value: str | None) -> frozenset[str] | None:
    """``HERON_PLUGINS`` as a set of names: None (unset) allows all, "" allows none."""
    if value is None:
        return None
    return frozenset(_normalize(n.strip()) for n in value.split(",") if n.strip())


class HeronPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers which plugins loaded, failed or were excluded."""

    def __init__(self, allowlist: frozenset[str] | None = None) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.allowlist = allowlist
        self.loaded: dict[str, PluginInfo] = {}     # by plugin (entry-point) name
        self.failed: list[PluginInfo] = []
        self.excluded: list[PluginInfo] = []
        self._platforms: list[PlatformEntry] | None = None

    # -- loading ------------------------------------------------------------------------

    def allows(self, info: PluginInfo) -> bool:
        """Whether the allowlist names this plugin (by entry-point or package name)."""
        if self.allowlist is None:
            return True
        return _normalize(info.name) in self.allowlist or _normalize(info.package) in self.allowlist

    def unmatched_allowlist(self) -> list[str]:
        """Names in HERON_PLUGINS that match no installed plugin (typos, usually)."""
        if not self.allowlist:
            return []
        known = {_normalize(i.name) for i in self.all_plugins()}
        known |= {_normalize(i.package) for i in self.all_plugins()}
        return sorted(self.allowlist - known)

    def all_plugins(self) -> list[PluginInfo]:
        return [*self.loaded.values(), *self.failed, *self.excluded]

    def load_entry_point(self, ep: metadata.EntryPoint) -> None:
        """Import one entry point and register it, recording any failure."""
        info = _info(ep)
        if not self.allows(info):
            self.excluded.append(info)
            return
        try:
            plugin = ep.load()
        except Exception as e:  # noqa: BLE001 - any import failure is reported, with its package
            self.record_failure(info, f"{type(e).__name__}: {e}")
            return
        self.add_plugin(plugin, info)

    def add_plugin(self, plugin: object, info: PluginInfo) -> bool:
        """Register an imported plugin object; False (and a recorded failure) when its
        name is taken or its hooks do not match heron's hookspecs."""
        if info.name in self.loaded:
            self.record_failure(info, f"the plugin name {info.name!r} is already taken by "
                                      f"{self.loaded[info.name].describe()}")
            return False
        try:
            self.register(plugin, name=info.name)
        except (ValueError, pluggy.PluginValidationError) as e:
            if self.get_plugin(info.name) is plugin:  # pluggy < 1.6 registers before validating
                self.unregister(plugin)
            self.record_failure(info, f"{type(e).__name__}: {e}")
            return False
        try:
            self.check_pending()  # per plugin, so an unknown hook is blamed on its owner
        except pluggy.PluginValidationError as e:
            self.unregister(plugin)
            self.record_failure(info, f"unknown hook: {e}")
            return False
        self.loaded[info.name] = info
        return True

    def record_failure(self, info: PluginInfo, error: str) -> None:
        failed = PluginInfo(info.name, info.package, info.version, info.value, error)
        self.failed.append(failed)
        logger.warning("%s failed to load: %s", failed.describe(), error)

    # -- calling hooks ------------------------------------------------------------------

    def platforms(self) -> list[PlatformEntry]:
        """Every registered platform with its detection, computed once per manager.

        A plugin whose `register_platforms` raises or registers something that is not
        a Platform moves to `failed` and contributes no platform."""
        if self._platforms is not None:
            return self._platforms
        registered: dict[str, list[Platform]] = {}
        problems: dict[str, str] = {}
        infos: dict[str, PluginInfo] = {}

        def make_kwargs(info: PluginInfo) -> dict[str, Any]:
            infos[info.name] = info

            def register(platform: Platform) -> None:
                if not isinstance(platform, Platform) or not getattr(platform, "name", None):
                    problems.setdefault(info.name, f"register_platforms registered {platform!r}, "
                                                   "not an instance of a named heron Platform")
                    return
                registered.setdefault(info.name, []).append(platform)
            return {"register": register}

        for info, error in self.call_each("register_platforms", make_kwargs):
            problems.setdefault(info.name, error)
        for name, error in problems.items():
            registered.pop(name, None)
            self.loaded.pop(name, None)
            self.unregister(name=name)  # its other hooks must not run either
            self.record_failure(infos[name], error)
        self._platforms = [PlatformEntry(p, infos[name], safe_detect(p))
                           for name, platforms in registered.items() for p in platforms]
        return self._platforms

    def call_each(self, hook_name: str, make_kwargs: Callable[[PluginInfo], dict[str, Any]]
                  ) -> list[tuple[PluginInfo, str]]:
        """Call one registration hook plugin by plugin, each with its own kwargs.

        Returns (plugin, error) for every implementation that raised, so one broken
        plugin neither hides the others nor goes unreported."""
        errors: list[tuple[PluginInfo, str]] = []
        caller: pluggy.HookCaller = getattr(self.hook, hook_name)
        for impl in caller.get_hookimpls():  # registration order
            if impl.hookwrapper or impl.wrapper:  # wrappers make no sense for registration
                continue
            info = (self.loaded.get(impl.plugin_name)
                    or PluginInfo(impl.plugin_name, "(registered directly)", "-", repr(impl.plugin)))
            kwargs = make_kwargs(info)
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception as e:  # noqa: BLE001 - blamed on the plugin, with its package
                errors.append((info, f"{hook_name} raised {type(e).__name__}: {e}"))
        return errors


def _info(ep: metadata.EntryPoint) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    if dist is None:  # a built-in synthesized by discover_entry_points
        return PluginInfo(ep.name, "heron", _heron_version(), ep.value)
    return PluginInfo(ep.name, dist.metadata["Name"] or "?", dist.version or "?", ep.value)


def _heron_version() -> str:
    from heron import __version__
    return __version__


def discover_entry_points(group: str = GROUP) -> list[metadata.EntryPoint]:
    """Every entry point of the group, plus the built-ins when heron's own metadata is
    missing (a source checkout on sys.path without `pip install -e .`)."""
    found = list(metadata.entry_points(group=group))
    if group == GROUP:
        names = {ep.name for ep in found}
        found += [metadata.EntryPoint(name, value, group)
                  for name, value in BUILTIN_ENTRY_POINTS.items() if name not in names]
    return found


def make_plugin_manager(entry_points: Iterable[metadata.EntryPoint] | None = None,
                        allowlist: str | None | EllipsisType = ...) -> HeronPluginManager:
    """Build a plugin manager: load `entry_points` (default: the ``heron`` group) that the
    allowlist admits, then `check_pending()`.

    `allowlist` defaults (``...``) to ``HERON_PLUGINS``; None loads every plugin, an empty
    string none, else a comma-separated list of entry-point or package names."""
    value = envs.get("HERON_PLUGINS") if allowlist is ... else allowlist
    pm = HeronPluginManager(parse_allowlist(value))
    for ep in discover_entry_points() if entry_points is None else entry_points:
        pm.load_entry_point(ep)
    pm.check_pending()
    return pm
