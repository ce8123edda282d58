"""The cpu platform's compiled forward pass: the whole decoder in one C call (csrc/cpu_decoder.c).

The eager forward of a Llama-family model calls about ten C kernels per layer from
Python; at one token per step that Python costs more than the kernels. `CpuDecoder`
hands the C loop the same kernels' entry points, the packed weights and the KV caches
once, then runs a step with one call. It computes exactly what the eager path computes
(same kernels, same order, same roundings): tests/test_cpu_decoder.py checks the
hidden states bit for bit.

`build_cpu_decoder` returns None, with the reason logged, for a model it does not
cover (another architecture, linears not on heron's invariant kernel, a sharded
model, float16); the runner then stays eager.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from heron.kernels import cbuild
from heron.kernels.interface import AttentionBackend, AttentionMetadata
from heron.logger import get_logger

logger = get_logger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_decoder.c"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_ERRORS = {-7: "a token id is outside the vocabulary",
           -8: "a position is past the rotary table (max_position_embeddings)",
           -9: "a linear layer's kernel failed (out of memory?)"}

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class _Kernels(ctypes.Structure):
    _fields_ = [("linear", _p), ("rms_norm", _p), ("rotary", _p), ("silu_and_mul", _p),
                ("attention", _p)]


class _Linear(ctypes.Structure):
    _fields_ = [("fn", _p), ("w", _p), ("bias", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("kv_cache", _p)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64),
                ("num_kv_heads", _i64), ("head_dim", _i64), ("intermediate", _i64),
                ("vocab", _i64), ("max_positions", _i64), ("num_blocks", _i64),
                ("block_size", _i64), ("dtype", _i32), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("embed", _p), ("final_norm", _p), ("rope", _p),
                ("layers", ctypes.POINTER(_Layer)),
                # the KV cache's dtype code (cpu.py's: fp8 caches too) and fp8 scales
                ("kv_dtype", _i32), ("k_scale", ctypes.c_float), ("v_scale", ctypes.c_float)]


class _Batch(ctypes.Structure):
    _fields_ = [("num_tokens", _i64), ("num_seqs", _i32), ("token_ids", _p), ("positions", _p),
                ("query_start_loc", _p), ("seq_lens", _p), ("block_tables", _p),
                ("bt_stride", _i64), ("max_blocks", _i64), ("slot_mapping", _p)]


def _declare(lib: ctypes.CDLL) -> None:
    lib.heron_decoder_forward.argtypes = [ctypes.POINTER(_Kernels), ctypes.POINTER(_Model),
                                          ctypes.POINTER(_Batch), _p, _p, _i32, _p]
    lib.heron_decoder_forward.restype = _i32
    lib.heron_decoder_scratch_bytes.argtypes = [ctypes.POINTER(_Model), _i64]
    lib.heron_decoder_scratch_bytes.restype = _i64


@functools.lru_cache(maxsize=None)
def load_decoder() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not); compiles on the first call of the process."""
    return cbuild.load_library(_SOURCE, _declare)


def _address(fn: ctypes._CFuncPtr) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def why_not_compiled(model: nn.Module, backend: AttentionBackend,
                     dtype: torch.dtype) -> str | None:
    """Why `CpuDecoder` cannot run this model (None: it can)."""
    from heron.kernels.cpu import CpuAttention
    from heron.kernels.cpu_linear import InvariantLinear
    from heron.kernels.cpu_quant import CpuQuantLinear
    why = _not_heron_llama(model)
    if why is not None:
        return why
    if dtype not in _DTYPE_CODES:
        return f"{dtype} runs on torch's kernels"
    if not isinstance(backend, CpuAttention) or backend._lib is None:
        return "the C attention kernel is not in use"
    if backend.head_size % 16:
        return f"head size {backend.head_size} is not a multiple of 16"
    for layer in model.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_up_proj, layer.mlp.down_proj):
            if not isinstance(linear, (InvariantLinear, CpuQuantLinear)):
                return "linear layers are not on heron's invariant or quantized kernels " \
                       "(HERON_BATCH_INVARIANT=0, or the model is split over ranks)"
    if type(model.model.embed_tokens) is not nn.Embedding:
        return "the embedding is sharded"
    return None


def _not_heron_llama(model: nn.Module) -> str | None:
    """Why `model` may compute something other than heron's Llama layers (None: it cannot).

    The C loop hard-codes those layers. A subclass that only changes how weights load
    (as the example plugin's architecture does) is fine; one that overrides a forward,
    or swaps a layer for another module, runs eagerly."""
    from heron.models.layers import Attention, RMSNorm
    from heron.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM,
                                    LlamaMLP, LlamaModel)
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family model"
    for method in ("forward", "compute_logits"):
        if getattr(type(model), method) is not getattr(LlamaForCausalLM, method):
            return f"{type(model).__name__} overrides {method}"
    inner = model.model
    modules = [(inner, LlamaModel), (inner.norm, RMSNorm)]
    for layer in inner.layers:
        modules += [(layer, LlamaDecoderLayer), (layer.self_attn, LlamaAttention),
                    (layer.self_attn.attn, Attention), (layer.mlp, LlamaMLP),
                    (layer.input_layernorm, RMSNorm), (layer.post_attention_layernorm, RMSNorm)]
    for module, expected in modules:
        if type(module) is not expected:
            return f"{type(module).__name__} stands where heron's {expected.__name__} should"
    return None


def build_cpu_decoder(model: nn.Module, backend: AttentionBackend,
                      dtype: torch.dtype) -> "CpuDecoder | None":
    """A CpuDecoder for `model`, or None (logged) when the model or the build does not allow."""
    why = why_not_compiled(model, backend, dtype)
    if why is None:
        from heron.kernels.cpu import _load_kernel
        from heron.kernels.cpu_linear import load_gemm
        from heron.kernels.cpu_ops import load_ops
        libs = [load_decoder(), load_gemm(), _load_kernel()]
        why = next((reason for lib, reason in libs if lib is None), None)
        if why is None and load_ops() is None:
            why = "the C layer ops do not build here"
    if why is not None:
        logger.info("forward passes run eagerly: %s", why)
        return None
    return CpuDecoder(model, backend, dtype)


class CpuDecoder:
    """One C call per forward pass of a Llama-family model on the cpu platform."""

    def __init__(self, model: nn.Module, backend: AttentionBackend, dtype: torch.dtype) -> None:
        from heron.kernels.cpu import _load_kernel
        from heron.kernels.cpu_linear import load_gemm
        from heron.kernels.cpu_ops import load_ops
        self._lib = load_decoder()[0]
        gemm, attention, ops = load_gemm()[0], _load_kernel()[0], load_ops()._lib
        self._kernels = _Kernels(_address(gemm.heron_linear), _address(ops.heron_add_rms_norm),
                                 _address(ops.heron_rotary), _address(ops.heron_silu_and_mul),
                                 _address(attention.heron_attention))
        self.model = model
        self.backend = backend
        self.dtype = dtype
        cfg = model.config
        inner = model.model
        self._rope = inner.rotary_emb.cache(torch.device("cpu"))
        norm = inner.norm
        self._layers = (_Layer * model.num_layers)()
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self._layers[i] = _Layer(
                _ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight),
                self._linear(attn.qkv_proj), self._linear(attn.o_proj),
                self._linear(mlp.gate_up_proj), self._linear(mlp.down_proj), None)
        self._model = _Model(
            model.num_layers, cfg.hidden_size, model.num_heads, model.num_kv_heads,
            model.head_dim, cfg.intermediate_size, cfg.vocab_size, self._rope.shape[0], 0, 0,
            _DTYPE_CODES[dtype], norm.eps, backend.scale, _ptr(inner.embed_tokens.weight),
            _ptr(norm.weight), _ptr(self._rope), self._layers, _DTYPE_CODES[dtype], 1.0, 1.0)
        self._caches_key: tuple[int, ...] = ()
        self._warned_layout = False
        self._scratch = torch.empty(0, dtype=torch.uint8)
        # Seconds spent in linears, attention and element-wise ops, when profiling.
        self.timings: torch.Tensor | None = None
        logger.info("forward passes run as one C call per step (cpu_decoder.c); "
                    "enforce_eager=True runs the layers from Python")

    def start_profile(self) -> None:
        """From now on, accumulate the seconds of each kind of kernel (see `profile`)."""
        self.timings = torch.zeros(3, dtype=torch.float64)

    def profile(self) -> dict[str, float]:
        """Seconds in linear layers, attention and the element-wise ops since start_profile."""
        names = ("linears", "attention", "elementwise")
        return {} if self.timings is None else dict(zip(names, self.timings.tolist()))

    @staticmethod
    def _linear(linear: nn.Module) -> _Linear:
        # Contiguity of weights and biases was established when the layers packed them.
        from heron.kernels.cpu_quant import CpuQuantLinear
        if isinstance(linear, CpuQuantLinear):
            return _Linear(_address(linear._lib.heron_qlinear), linear.weight_address,
                           _ptr(linear.bias))
        return _Linear(None, _ptr(linear.packed), _ptr(linear.bias))

    def _bind_caches(self, kv_caches: list[torch.Tensor]) -> bool:
        """Point every layer at its cache (once per list of caches: the runner's stay put).
        False when the caches are not in the C attention kernel's layout (e.g. bfloat16 in
        blocks of one token, which the attention backend keeps in the reference layout).
        The caches hold the model's dtype or one fp8 dtype (kv_cache_dtype="fp8")."""
        from heron.kernels.cpu import FP8_DTYPES
        key = tuple(c.data_ptr() for c in kv_caches)
        if key == self._caches_key:
            return True
        if len(kv_caches) != self.model.num_layers:
            raise ValueError(f"{len(kv_caches)} KV caches for {self.model.num_layers} layers")
        first = kv_caches[0]
        if first.dtype != self.dtype and first.dtype not in FP8_DTYPES:
            return False
        for cache in kv_caches:
            if cache.dtype != first.dtype or cache.shape != first.shape \
                    or not self.backend.uses_native_layout(cache) or not cache.is_contiguous():
                return False
            self.backend._check_cache(cache, cache.shape[3])
        for layer, cache in zip(self._layers, kv_caches):
            layer.kv_cache = cache.data_ptr()
        self._model.num_blocks = first.shape[0]
        self._model.block_size = first.shape[3]
        self._model.kv_dtype = FP8_DTYPES.get(first.dtype, _DTYPE_CODES[self.dtype])
        self._model.k_scale, self._model.v_scale = self.backend.k_scale, self.backend.v_scale
        self._caches_key = key
        return True

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[torch.Tensor]) -> torch.Tensor | None:
        """Final hidden states [T, hidden] for the step's flat batch of tokens; None when
        these caches are not in the C kernel's layout (the runner then runs eagerly)."""
        if not self._bind_caches(kv_caches):
            if not self._warned_layout:
                logger.info("forward passes run eagerly: the KV cache is not in the C "
                            "attention kernel's layout")
                self._warned_layout = True
            return None
        t, n = meta.num_tokens, meta.num_seqs
        if meta.block_size != self._model.block_size:
            raise ValueError(f"metadata block size {meta.block_size}, cache block size "
                             f"{self._model.block_size}")
        ids = _checked(input_ids, torch.int64, t, "input_ids")
        positions = _checked(meta.positions, torch.int64, t, "positions")
        qsl = _checked(meta.query_start_loc, torch.int32, n + 1, "query_start_loc")
        seq_lens = _checked(meta.seq_lens, torch.int32, n, "seq_lens")
        slots = _checked(meta.slot_mapping, torch.int64, t, "slot_mapping")
        tables = meta.block_tables
        if tables.dtype != torch.int32 or tables.dim() != 2 or tables.shape[0] < n \
                or (tables.shape[1] > 1 and tables.stride(1) != 1):
            raise ValueError("block_tables must be int32 [num_seqs, max_blocks], rows contiguous")
        batch = _Batch(t, n, ids.data_ptr(), positions.data_ptr(), qsl.data_ptr(),
                       seq_lens.data_ptr(), tables.data_ptr(), tables.stride(0), tables.shape[1],
                       slots.data_ptr())
        need = self._lib.heron_decoder_scratch_bytes(ctypes.byref(self._model), t)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        out = torch.empty((t, self.model.config.hidden_size), dtype=self.dtype)
        rc = self._lib.heron_decoder_forward(ctypes.byref(self._kernels),
                                             ctypes.byref(self._model), ctypes.byref(batch),
                                             self._scratch.data_ptr(), out.data_ptr(),
                                             torch.get_num_threads(),
                                             _ptr(self.timings))
        if rc:
            from heron.kernels.cpu import _ERRORS as ATTENTION_ERRORS
            raise ValueError(f"cpu decoder: {_ERRORS.get(rc) or ATTENTION_ERRORS.get(rc, rc)}")
        return out


def _checked(t: torch.Tensor | None, dtype: torch.dtype, length: int, name: str) -> torch.Tensor:
    if t is None or t.dtype != dtype or t.device.type != "cpu" or t.dim() != 1 \
            or t.shape[0] < length:
        raise ValueError(f"{name} must be a 1-d {dtype} CPU tensor of at least {length} entries")
    return t if t.is_contiguous() else t.contiguous()
