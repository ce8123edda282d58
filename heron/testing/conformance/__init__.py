"""The platform conformance suite: does a platform keep the Platform contract?

It checks the detection contract (a fast `detect()` that never raises), that the
capabilities a platform declares match what it does (every declared dtype loads
and runs, prefix caching hits when claimed, chunked prefill keeps outputs equal),
a sane memory profile (total >= available >= 0, KV blocks > 0, an explicit byte
budget honoured), greedy equivalence with Hugging Face transformers on tiny
random Llama and Qwen2 models in float32, and batch invariance (a prompt alone,
in a mixed batch, and under a KV cache small enough to force preemption; for every
invariance a platform declares, in each dtype it names, the log-probabilities of the
greedy tokens must be equal bit for bit).

Run it for a platform by name (`auto` picks as `LLM(device="auto")` would)::

    python -m heron.testing.conformance --device NAME [pytest options]
    pytest -p heron.testing.conformance.plugin --pyargs heron.testing.conformance --device NAME
    HERON_DEVICE=NAME pytest --pyargs heron.testing.conformance

The suite builds its own tiny random models in a temporary folder: it needs
transformers, torch and pytest, and no network.
"""
