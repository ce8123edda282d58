"""Tensor parallelism for the Llama family, applied from outside the model files.

Each rank builds the ordinary model from a *shard config* (its share of the attention
heads and of the MLP's intermediate size), so the fused q/k/v and gate/up projections
come out column-parallel by construction. Around that:

- the checkpoint's tensors are cut to the rank's rows or columns on their way into
  `load_weights` (`shard_weights`);
- the output and down projections are row-parallel: their partial sums meet in an
  all-reduce wrapped around the module (`reduce_row_parallel_outputs`), and their bias
  is added by rank 0 only;
- the embedding and LM head are split along the vocabulary (padded to a multiple of
  the rank count); the runner gathers the logits' shards on rank 0.

KV heads are split like query heads when there are at least as many as ranks, and
replicated otherwise (MQA/GQA): rank r then holds KV head r * num_kv_heads // tp.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from heron.distributed import TensorParallelGroup

_COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
_ROW_PARALLEL = {"o_proj", "down_proj"}
_VOCAB_PARALLEL = {"model.embed_tokens.weight", "lm_head.weight"}


def _heads(cfg: Any) -> tuple[int, int, int]:
    """(attention heads, KV heads, head size) of an HF config."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv_heads, head_dim


def tensor_parallel_problems(hf_config: Any, model_cls: type, tp: int) -> list[str]:
    """Why this model cannot be split over `tp` ranks (empty when it can)."""
    if tp == 1:
        return []
    from heron.models.llama import LlamaForCausalLM

    if not issubclass(model_cls, LlamaForCausalLM):
        return [f"tensor parallelism covers the Llama family; {model_cls.__name__} is not one"]
    heads, kv_heads, _ = _heads(hf_config)
    problems = []
    if heads % tp:
        problems.append(f"the model's {heads} attention heads do not split over "
                        f"tensor_parallel_size={tp}; use a size that divides {heads}")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"the model's {kv_heads} KV heads neither split over nor replicate "
                        f"evenly across tensor_parallel_size={tp}")
    if hf_config.intermediate_size % tp:
        problems.append(f"the MLP's intermediate size {hf_config.intermediate_size} does not "
                        f"split over tensor_parallel_size={tp}")
    return problems


def shard_config(hf_config: Any, group: TensorParallelGroup) -> Any:
    """A copy of `hf_config` with this rank's heads and intermediate size (what it builds)."""
    if group.world_size == 1:
        return hf_config
    tp = group.world_size
    heads, kv_heads, head_dim = _heads(hf_config)
    cfg = copy.deepcopy(hf_config)
    cfg.num_attention_heads = heads // tp
    cfg.num_key_value_heads = max(1, kv_heads // tp)
    cfg.head_dim = head_dim
    cfg.intermediate_size = hf_config.intermediate_size // tp
    return cfg


def vocab_shard_size(vocab_size: int, tp: int) -> int:
    """Rows of the embedding and LM head on each rank (the vocabulary padded to tp)."""
    return -(-vocab_size // tp)


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the token embedding; tokens other ranks hold embed to zero,
    and the all-reduce adds the one non-zero row per token (exact: x + 0 = x)."""

    def __init__(self, rows: int, dim: int, first_token: int, group: TensorParallelGroup,
                 dtype: torch.dtype) -> None:
        super().__init__(rows, dim, dtype=dtype)
        self.first_token = first_token
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first_token
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(out)


class AllReduceOutput(nn.Module):
    """A row-parallel projection: the wrapped module's partial output, summed over ranks."""

    def __init__(self, inner: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.inner(x))


def shard_vocab(model: nn.Module, hf_config: Any, group: TensorParallelGroup) -> None:
    """Replace the embedding and an untied LM head with this rank's vocabulary rows
    (before the weights load; cheap on the meta device)."""
    if group.world_size == 1:
        return
    rows = vocab_shard_size(hf_config.vocab_size, group.world_size)
    embed = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(rows, embed.embedding_dim,
                                                      group.rank * rows, group, embed.weight.dtype)
    if model.lm_head is not None:
        model.lm_head = nn.Linear(model.lm_head.in_features, rows, bias=False,
                                  dtype=model.lm_head.weight.dtype)


def reduce_row_parallel_outputs(model: nn.Module, group: TensorParallelGroup) -> None:
    """Wrap every output and down projection in an all-reduce (after the weights load, so
    that parameter names stay the checkpoint's, and before a platform repacks them)."""
    if group.world_size == 1:
        return
    for layer in model.model.layers:
        layer.self_attn.o_proj = AllReduceOutput(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = AllReduceOutput(layer.mlp.down_proj, group)


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], hf_config: Any,
                  group: TensorParallelGroup) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (name, tensor) pairs cut to this rank's share."""
    if group.world_size == 1:
        yield from weights
        return
    for name, tensor in weights:
        yield name, _shard(name, tensor, hf_config, group)


def _shard(name: str, tensor: torch.Tensor, cfg: Any, group: TensorParallelGroup) -> torch.Tensor:
    rank, tp = group.rank, group.world_size
    if name in _VOCAB_PARALLEL:
        rows = vocab_shard_size(cfg.vocab_size, tp)
        part = tensor[rank * rows:(rank + 1) * rows]
        return F.pad(part, (0, 0, 0, rows - part.shape[0]))   # zero rows past the vocabulary
    parts = name.split(".")
    if len(parts) < 2:
        return tensor
    proj, kind = parts[-2], parts[-1]
    heads, kv_heads, head_dim = _heads(cfg)
    if proj in _COLUMN_PARALLEL:
        if proj == "q_proj":
            size = heads // tp * head_dim
            start = rank * size
        elif proj in ("k_proj", "v_proj"):
            # Split when kv_heads >= tp; else ranks tp // kv_heads apart share one head.
            size = max(1, kv_heads // tp) * head_dim
            start = rank * kv_heads // tp * head_dim
        else:
            size = cfg.intermediate_size // tp
            start = rank * size
        return tensor.narrow(0, start, size)
    if proj in _ROW_PARALLEL:
        if kind == "bias":   # added once, after the sum
            return tensor if rank == 0 else torch.zeros_like(tensor)
        size = tensor.shape[1] // tp
        return tensor.narrow(1, rank * size, size)
    return tensor
