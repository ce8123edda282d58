"""Device resolution: which platform `device=` means. Core code, and loud about failures.

* ``device="auto"`` picks the available platform of highest priority. Two at the top
  with equal priority is an error naming both; so is a plugin that failed to load
  (it might have been the device the user meant: no guessing around it).
* ``device="NAME"`` gives that platform, or an error quoting its detection reason,
  the load error of a plugin of that name, or the installed names.
* ``HERON_DEVICE`` overrides `device=`.

There is never a fallback to another device.
"""
from __future__ import annotations

from dataclasses import dataclass

from heron import envs
from heron.logger import get_logger
from heron.platforms.interface import Platform
from heron.platforms.plugins import HeronPluginManager, PlatformEntry, PluginInfo, make_plugin_manager

logger = get_logger(__name__)

AUTO = "auto"


class PlatformError(RuntimeError):
    """`device=` cannot be resolved; the message says why and what to do."""


def _fix_hint(pm: HeronPluginManager) -> str:
    return ("fix or uninstall it, leave it out with HERON_PLUGINS, or name a device "
            f"(installed: {', '.join(_names(pm)) or 'none'})")


def _names(pm: HeronPluginManager) -> list[str]:
    return sorted({e.platform.name for e in pm.platforms()})


def _who(entry: PlatformEntry) -> str:
    return f"{entry.platform.name!r} (package {entry.plugin.package} {entry.plugin.version})"


def choose_platform(pm: HeronPluginManager, device: str = AUTO) -> PlatformEntry:
    """The platform `device` names (or "auto" picks) among `pm`'s, or PlatformError."""
    device = device.strip()
    if device.lower() == AUTO:
        return _choose_auto(pm)
    return _choose_by_name(pm, device)


def _choose_auto(pm: HeronPluginManager) -> PlatformEntry:
    entries = pm.platforms()
    if pm.failed:
        broken = "; ".join(f"{f.describe()}: {f.error}" for f in pm.failed)
        raise PlatformError(f"device='auto' will not choose while a plugin failed to load "
                            f"({broken}): {_fix_hint(pm)}")
    available = [e for e in entries if e.detection.available]
    if not available:
        if not entries:
            why = ("HERON_PLUGINS loads no plugin" if pm.allowlist is not None
                   else "no platform plugin is installed")
            raise PlatformError(f"no platform to run on: {why} (HERON_PLUGINS="
                                f"{envs.get('HERON_PLUGINS')!r})")
        reasons = "; ".join(f"{e.platform.name}: {e.detection.reason}" for e in entries)
        raise PlatformError(f"no platform is available here ({reasons})")
    top = max(e.platform.priority for e in available)
    best = [e for e in available if e.platform.priority == top]
    if len(best) > 1:
        names = " and ".join(_who(e) for e in best)
        raise PlatformError(
            f"device='auto' is ambiguous: {names} are all available with priority {top}; "
            f"pass one of them as device= (or set HERON_DEVICE), or leave one out with "
            "HERON_PLUGINS")
    return best[0]


def _choose_by_name(pm: HeronPluginManager, name: str) -> PlatformEntry:
    matches = [e for e in pm.platforms() if e.platform.name.lower() == name.lower()]
    if len(matches) > 1:
        raise PlatformError(f"device={name!r} is ambiguous: " + " and ".join(map(_who, matches))
                            + " share the name; uninstall one or leave one out with HERON_PLUGINS")
    if matches:
        entry = matches[0]
        if not entry.detection.available:
            raise PlatformError(f"device={name!r} is not available: {entry.detection.reason}")
        return entry
    raise PlatformError(_unknown_device_message(pm, name))


def _unknown_device_message(pm: HeronPluginManager, name: str) -> str:
    def same(info: PluginInfo) -> bool:
        return name.lower() in (info.name.lower(), info.package.lower())

    for failed in filter(same, pm.failed):
        return f"device={name!r}: {failed.describe()} failed to load: {failed.error}"
    for excluded in filter(same, pm.excluded):
        return (f"device={name!r}: {excluded.describe()} is installed but HERON_PLUGINS="
                f"{envs.get('HERON_PLUGINS')!r} does not list it")
    message = f"unknown device {name!r}; installed platforms: {', '.join(_names(pm)) or 'none'}"
    if pm.failed:
        message += "; plugins that failed to load: " + "; ".join(
            f"{f.describe()}: {f.error}" for f in pm.failed)
    if pm.excluded:
        message += "; left out by HERON_PLUGINS: " + ", ".join(e.name for e in pm.excluded)
    unmatched = pm.unmatched_allowlist()
    if unmatched:
        message += f"; HERON_PLUGINS names no installed plugin called {', '.join(unmatched)}"
    return message


def requested_device(device: str = AUTO) -> str:
    """`device`, unless HERON_DEVICE overrides it."""
    override = envs.get("HERON_DEVICE")
    if override and override.strip():
        if device.strip().lower() not in (AUTO, override.strip().lower()):
            logger.info("HERON_DEVICE=%s overrides device=%s", override, device)
        return override.strip()
    return device


def load_extensions(pm: HeronPluginManager | None = None) -> HeronPluginManager:
    """Run `register_models` and `register_attention_backends` of every loaded plugin
    into the process-wide registries. Called by `resolve_platform` in the engine's
    process, and by executors in each worker process before it loads the model."""
    from heron.kernels.registry import AttentionBackendRegistry  # imports torch: only now
    from heron.models.registry import ModelRegistry

    pm = pm if pm is not None else make_plugin_manager()
    errors = pm.call_each("register_models", lambda info: {"register": ModelRegistry.register})
    errors += pm.call_each("register_attention_backends",
                           lambda info: {"register": AttentionBackendRegistry.register})
    for info, error in errors:
        # Not fatal: the engine's own "unsupported architecture" or "unknown backend"
        # error follows if the missing piece is needed; this says which package broke.
        logger.error("%s: %s", info.describe(), error)
    return pm


def resolve_platform(device: str = AUTO, pm: HeronPluginManager | None = None) -> Platform:
    """The platform to run on: resolve `device` (HERON_DEVICE overrides it), then load the
    plugins' models and attention backends. Raises PlatformError with the reason."""
    pm = pm if pm is not None else make_plugin_manager()
    entry = choose_platform(pm, requested_device(device))
    load_extensions(pm)
    logger.info("platform %s (%s): %s", entry.platform.name, entry.plugin.package,
                entry.detection.reason)
    return entry.platform


@dataclass(frozen=True)
class PlatformRow:
    """One row of `heron platforms`: a platform, or a plugin that gave none."""
    name: str
    package: str
    version: str
    priority: str
    available: str
    reason: str
    chosen: bool
    tensor_parallel: str = "-"   # the distributed backend ranks talk through, or "no"


def platform_rows(pm: HeronPluginManager, device: str = AUTO) -> tuple[list[PlatformRow], str | None]:
    """The rows of `heron platforms` and, when `device` resolves to nothing, why."""
    try:
        chosen: PlatformEntry | None = choose_platform(pm, requested_device(device))
        error = None
    except PlatformError as e:
        chosen, error = None, str(e)
    entries = sorted(pm.platforms(), key=lambda e: (-e.platform.priority, e.platform.name))
    rows = [PlatformRow(e.platform.name, e.plugin.package, e.plugin.version,
                        str(e.platform.priority), "yes" if e.detection.available else "no",
                        e.detection.reason, e is chosen, _tensor_parallel(e.platform))
            for e in entries]
    with_platforms = {e.plugin.name for e in entries}
    for info in pm.loaded.values():
        if info.name not in with_platforms:
            rows.append(PlatformRow(info.name, info.package, info.version, "-", "-",
                                    "registers no platform (models or kernels only)", False))
    rows += [PlatformRow(f.name, f.package, f.version, "-", "ERROR", f"failed to load: {f.error}",
                         False) for f in pm.failed]
    rows += [PlatformRow(x.name, x.package, x.version, "-", "-", "not in HERON_PLUGINS", False)
             for x in pm.excluded]
    return rows, error


def _tensor_parallel(platform: Platform) -> str:
    """`heron platforms`' TP column: the backend the ranks use, or "no"."""
    return platform.distributed_backend if platform.capabilities.tensor_parallel else "no"


def format_platform_table(rows: list[PlatformRow]) -> str:
    """Rows as aligned text columns; the reason column comes last and is not cut."""
    header = ("NAME", "PACKAGE", "VERSION", "PRIORITY", "AVAILABLE", "CHOSEN", "TP", "REASON")
    cells = [header] + [(r.name, r.package, r.version, r.priority, r.available,
                         "*" if r.chosen else "", r.tensor_parallel, r.reason) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
                     for row in cells)
