"""Testing tools for heron and for platform plugins.

`heron.testing.conformance` is the platform conformance suite that any plugin,
built-in or third-party, runs against itself::

    python -m heron.testing.conformance --device NAME
    pytest -p heron.testing.conformance.plugin --pyargs heron.testing.conformance --device NAME

Nothing here is imported by heron itself.
"""
