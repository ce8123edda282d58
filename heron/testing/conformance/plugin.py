"""The pytest plugin of the conformance suite: the ``--device`` option.

pytest parses the command line before it imports a package named by ``--pyargs``,
so an option of the suite's own conftest.py would come too late; this module is
loaded first, with ``-p heron.testing.conformance.plugin`` (which
``python -m heron.testing.conformance`` adds). It defines no fixtures, so loading it
into any other pytest run changes nothing but the option list.
"""
from __future__ import annotations

import pytest

from heron import envs

OPTION = "--heron-device"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("heron", "heron platform conformance")
    group.addoption(OPTION, dest="heron_device", default=None, metavar="NAME",
                    help="platform the conformance suite checks (default: HERON_DEVICE, else auto)")
    try:
        # The short spelling, unless another plugin or conftest already owns it.
        group.addoption("--device", dest="heron_device_short", default=None, metavar="NAME",
                        help=f"same as {OPTION}")
    except ValueError:
        pass


def requested_device(config: pytest.Config) -> str:
    """The device the suite checks: the option, else HERON_DEVICE, else "auto"."""
    for dest in ("heron_device", "heron_device_short"):
        value = getattr(config.option, dest, None)
        if value:
            return str(value)
    return envs.get("HERON_DEVICE") or "auto"
