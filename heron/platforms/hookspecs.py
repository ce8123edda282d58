"""pluggy hook specifications: the only way plugins, built-in or third-party, extend heron.

A plugin is a module (or any object) with functions decorated by `hookimpl`,
published in the entry-point group ``heron``::

    [project.entry-points.heron]
    mydevice = "heron_mydevice"

Every hook here is a *registration* hook: it receives a `register` callback and
returns nothing. heron calls each plugin's implementation separately (not as one
pluggy call over all plugins), so a plugin whose hook raises is reported with its
package name while the others still register. None of these hooks is
`firstresult`: every plugin's implementation runs.

Hooks run in the process that builds the plugin manager
(`heron.platforms.plugins.make_plugin_manager`): the engine's process when
`LLM(...)` starts, the `heron platforms` command, or a worker process that an
executor starts (it calls `heron.platforms.registry.load_extensions()` before
loading the model). They may run more than once per process, so they must be
idempotent and must not allocate device memory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # the hooks are imported by `heron platforms`: keep torch out of it
    from torch import nn

    from heron.kernels.interface import AttentionBackend
    from heron.platforms.interface import Platform

PROJECT = "heron"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_platforms(register: Callable[["Platform"], None]) -> None:
    """Call ``register(platform)`` once per platform this plugin provides.

    `platform` is an instance of a `heron.platforms.interface.Platform` subclass whose
    `name` is what users pass as ``device=``. Called every time a plugin manager is
    built, before any platform is probed: in the engine's process (device
    resolution) and in ``heron platforms``. Must be cheap: import nothing heavy
    (no torch, no device SDK) and touch no device; detection belongs in
    `Platform.detect()`. Returns nothing; not firstresult.
    """


@hookspec
def register_models(register: Callable[[str, type["nn.Module"]], None]) -> None:
    """Call ``register(architecture, model_cls)`` for each out-of-tree model architecture.

    `architecture` is a name from a Hugging Face config's ``architectures`` list (for
    example ``"MyLlamaForCausalLM"``); `model_cls` follows the contract of
    `heron.models.llama.LlamaForCausalLM` (``__init__(hf_config, dtype)``,
    ``forward(input_ids, positions)``, ``compute_logits``, ``load_weights``). A later
    registration of the same name replaces an earlier one, so a plugin may override
    a built-in architecture. Called after the platform is resolved and before the
    model loads, in every process that loads a model (the engine's process, and
    each worker process of a multi-process executor). Importing torch here is fine.
    Returns nothing; not firstresult.
    """


@hookspec
def register_attention_backends(register: Callable[[str, type["AttentionBackend"]], None]) -> None:
    """Call ``register(name, backend_cls)`` for each attention backend this plugin provides.

    `backend_cls` subclasses `heron.kernels.interface.AttentionBackend`. Platforms
    look backends up by name (`heron.kernels.registry.AttentionBackendRegistry.get`),
    so a kernel package can serve a platform it does not define. Called at the same
    time and in the same processes as `register_models`. Registering a name that
    another plugin already registered with a different class is reported as an
    error of the later plugin. Returns nothing; not firstresult.
    """
