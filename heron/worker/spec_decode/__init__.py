"""Speculative decoding, the worker's half: verifying proposals against the target
model's logits (rejection sampling) and proposing with a draft model."""
