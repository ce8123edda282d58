"""`ExampleLlamaForCausalLM`: an out-of-tree architecture built on heron's Llama layers.

Its checkpoints store every tensor under an ``example.`` prefix (as a training
framework that wraps the model in another module would save them); otherwise
they are Llama checkpoints, with ``model_type: llama`` in config.json.
"""
from __future__ import annotations

from typing import Iterable

import torch

from heron.models.llama import LlamaForCausalLM

PREFIX = "example."


class ExampleLlamaForCausalLM(LlamaForCausalLM):
    """Llama, loading weights whose names carry the ``example.`` prefix."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.removeprefix(PREFIX), tensor) for name, tensor in weights)
