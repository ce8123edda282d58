"""Speculative decoding, the hardware-neutral half: proposing by n-gram lookup, how many
tentative tokens a request may take in a step, and the acceptance counters.

Verification (the rejection sampler) and the draft model run in the worker
(heron/worker/spec_decode/)."""
