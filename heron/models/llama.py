"""The Llama family: Llama 2/3, Mistral, Qwen2/2.5, SmolLM2.

One flat batch of tokens from many sequences goes through the decoder; the
attention layers find the paged KV cache and the batch layout in the forward
context. q/k/v and gate/up are each one fused Linear (rows concatenated at load
time) so that a layer is a handful of large matmuls and few Python ops.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from heron.models.layers import Attention, RMSNorm, RotaryEmbedding, RotaryInputs, \
    rope_parameters, silu_and_mul
from heron.quantization import QuantizedLinear, QuantizedTensor


def _head_dim(cfg: Any) -> int:
    # Some configs (Mistral, Qwen3-style) set head_dim apart from hidden / heads.
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _num_kv_heads(cfg: Any) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


class LlamaAttention(nn.Module):
    """Self-attention with grouped-query heads, fused qkv and rotary positions."""

    def __init__(self, cfg: Any, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = _num_kv_heads(cfg)
        self.head_dim = _head_dim(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Qwen2 always has q/k/v bias and no o bias; Llama's `attention_bias` covers
        # all four projections; Mistral has none.
        is_qwen2 = getattr(cfg, "model_type", "") == "qwen2"
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size,
                                  bias=attention_bias or is_qwen2, dtype=dtype)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=attention_bias and not is_qwen2,
                                dtype=dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx)

    def forward(self, x: torch.Tensor, rope: RotaryInputs) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # Rotate q and k heads together in one pass over their [T, H + H_kv, D] view.
        qk = rope.rotate(qkv[:, :self.q_size + self.kv_size].view(t, -1, self.head_dim))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with a fused gate|up projection."""

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: the llama family uses silu")
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias,
                                      dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), in HF's op order."""

    def __init__(self, cfg: Any, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, dtype)
        self.mlp = LlamaMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                rope: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the previous layer's (mlp output, residual) and returns its own; the
        residual additions happen inside the norms, where a platform can fuse them."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, dtype)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(_head_dim(cfg), cfg.max_position_embeddings,
                                          rope_parameters(cfg), dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rope = self.rotary_emb(positions)   # once per step, shared by every layer
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope)
        return self.norm(x, residual)[0]


# HF checkpoint names that land in a slice of one of our fused parameters:
# HF projection -> (fused projection, shard index in concatenation order).
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family model over a flat batch of tokens (no batch dim, no padding)."""

    def __init__(self, hf_config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        self.model = LlamaModel(hf_config, dtype)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        # When tied there is no lm_head module at all: sharing one Parameter between
        # two modules would be untied again by `to_empty()` on a meta-built model.
        self.lm_head = None if self.tie_word_embeddings else \
            nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False, dtype=dtype)
        # Attention sizes, for the runner that allocates KV caches and the backend.
        self.num_layers: int = hf_config.num_hidden_layers
        self.num_heads: int = hf_config.num_attention_heads
        self.num_kv_heads: int = _num_kv_heads(hf_config)
        self.head_dim: int = _head_dim(hf_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: LongTensor [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab] (matmul in the model dtype, as HF)."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        # A module call, not its .weight: a platform may have swapped in a prepacked linear.
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Copy HF-named tensors into this model, fusing q/k/v and gate/up on the fly.

        A QuantizedTensor for a linear layer's weight turns that layer into a
        QuantizedLinear (the platform then runs or dequantizes it); a quantized
        embedding is dequantized for lookups and, when tied, kept quantized as the head.
        Raises ValueError on an unknown name, a shape mismatch, or a parameter
        that no tensor filled.
        """
        params = dict(self.named_parameters())
        expected = set(self._hf_names())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue                      # derived from the config, never loaded
            if name == "lm_head.weight" and self.lm_head is None:
                continue                      # tied: the embedding is the head
            target, rows = self._locate(name)
            if target not in params:
                unexpected.append(name)
                continue
            dst = params[target].data if rows is None else params[target].data[rows]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)} but the model "
                                 f"built from config.json expects {tuple(dst.shape)}")
            if isinstance(tensor, QuantizedTensor):
                self._load_quantized(name, target, tensor, dst)
            else:
                dst.copy_(tensor)
            loaded.add(name)
        if unexpected:
            raise ValueError(f"checkpoint has weights this model does not know: {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")

    def _load_quantized(self, name: str, target: str, tensor: QuantizedTensor,
                        dst: torch.Tensor) -> None:
        """Place a quantized weight: its linear layer becomes (or already is) a
        QuantizedLinear holding it as the part its fused shard says."""
        if target == "model.embed_tokens.weight":
            dst.copy_(tensor.dequantize(torch.float32))
            if self.lm_head is None:   # tied: the head reads the quantized table
                self.lm_head = QuantizedLinear(tensor.in_features, tensor.out_features, None,
                                               self.dtype)
                self.lm_head.set_part(0, tensor)
            return
        module_name, _, leaf = target.rpartition(".")
        parent_name, _, child = module_name.rpartition(".")
        module = self.get_submodule(module_name)
        if leaf != "weight" or not isinstance(module, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"weight {name} is quantized ({tensor.qtype}) but is not a linear "
                             f"layer's weight")
        fused = _FUSED.get(name.split(".")[-2])
        shard, parts = (0, 1) if fused is None else (fused[1], len(self._shard_sizes(fused[0])))
        if isinstance(module, nn.Linear):
            layer = QuantizedLinear(module.in_features, module.out_features, None, self.dtype,
                                    parts)
            layer.bias = module.bias      # the same Parameter: loading fills it either way
            setattr(self.get_submodule(parent_name) if parent_name else self, child, layer)
            module = layer
        module.set_part(shard, tensor)

    def _locate(self, name: str) -> tuple[str, slice | None]:
        """Our parameter name for an HF name, and its row slice when fused."""
        parts = name.split(".")
        fused = _FUSED.get(parts[-2]) if len(parts) >= 2 else None
        if fused is None:
            return name, None
        fused_name, shard = fused
        parts[-2] = fused_name
        sizes = self._shard_sizes(fused_name)
        start = sum(sizes[:shard])
        return ".".join(parts), slice(start, start + sizes[shard])

    def _shard_sizes(self, fused_name: str) -> list[int]:
        if fused_name == "qkv_proj":
            q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return [q, kv, kv]
        return [self.config.intermediate_size] * 2

    def _hf_names(self) -> Iterable[str]:
        """Every HF checkpoint name this model needs, fused parameters expanded."""
        unfuse = {fused: [hf for hf, (f, _) in _FUSED.items() if f == fused]
                  for fused, _ in _FUSED.values()}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in unfuse:
                for hf in unfuse[parts[-2]]:
                    yield ".".join(parts[:-2] + [hf, parts[-1]])
            else:
                yield name


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama architecture without biases (sliding window capped by the loader)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2/2.5: the Llama architecture with q/k/v bias (keyed on model_type 'qwen2')."""
