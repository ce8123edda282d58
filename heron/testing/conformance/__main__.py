"""``python -m heron.testing.conformance --device NAME [pytest options]``: run the suite."""
from __future__ import annotations

import sys
from importlib import metadata

PLUGIN = "heron.testing.conformance.plugin"


def main(argv: list[str] | None = None) -> int:
    import pytest

    args = list(sys.argv[1:] if argv is None else argv)
    # Load the option plugin unless an installed pytest11 entry point already does:
    # registering the same module twice is an error in pytest.
    auto_loaded = any(ep.value.split(":")[0] == PLUGIN
                      for ep in metadata.entry_points(group="pytest11"))
    extra = [] if auto_loaded else ["-p", PLUGIN]
    return int(pytest.main([*extra, "--pyargs", "heron.testing.conformance", *args]))


if __name__ == "__main__":
    sys.exit(main())
