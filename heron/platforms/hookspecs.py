"""pluggy hook specifications: the only way plugins (built-in or third-party) extend heron."""
from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("heron")
hookimpl = pluggy.HookimplMarker("heron")


@hookspec
def register_platforms(register: Callable[[object], None]) -> None:
    """Call `register(platform)` with a `heron.platforms.interface.Platform` instance for
    each platform the plugin provides. Called once per plugin manager, in the engine's
    process, before device resolution; must be cheap (no device probing, no heavy imports)."""
