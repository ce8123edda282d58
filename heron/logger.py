"""The heron logger: one named logger, level from HERON_LOGGING_LEVEL."""
from __future__ import annotations

import logging

from heron import envs

_configured = False


def get_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        root = logging.getLogger("heron")
        if not root.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s",
                                                   "%H:%M:%S"))
            root.addHandler(handler)
            root.propagate = False
        root.setLevel((envs.get("HERON_LOGGING_LEVEL") or "INFO").upper())
        _configured = True
    return logging.getLogger(name)
