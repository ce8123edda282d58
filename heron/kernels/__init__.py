"""Attention backends. Each reads the paged KV cache through `AttentionMetadata`."""
from heron.kernels.interface import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata"]
