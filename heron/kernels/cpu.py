"""Paged attention on the host CPU through a small C kernel (csrc/cpu_attention.c).

The kernel is compiled with gcc on first use into `envs.cache_dir() / "kernels"`
and loaded with ctypes; tensors are passed as raw pointers, so this module checks
every dtype, shape and stride the C code relies on before calling it. When gcc is
missing, the build fails or HERON_CPU_ATTENTION=reference, the backend delegates
to `ReferenceAttention` (with one warning saying why).

Cache layout of one layer: `[num_blocks, 2, num_kv_heads, block_size, head_size]`
(2: keys, values). Block-major, so that a block of every head is one contiguous
run of memory: on the 2-core EPYC this was tuned on, one thread reads random
2 KiB pieces (one head's block) at about 5 GB/s, 12 KiB ones at 10 and long
runs at 20, and decode attention is bound by these reads. Inside each (block, kv head)
slab of block_size * head_size elements, a 32-bit word holds P = 4 // element_size
elements (2 for bfloat16, 1 for float32) along the dimension its product sums
over, so bfloat16 pairs feed vdpbf16ps directly:
  keys    [head_size / P, block_size, P]   (16 tokens' words for the same dims
                                            are one vector: no transpose in Q @ K^T)
  values  [block_size / P, head_size, P]   (two tokens' values of one dim per word)
bfloat16 caches therefore need an even block size. fp8 caches (float8_e4m3fn,
float8_e5m2: `kv_cache_dtype="fp8"`) hold one byte per element in the float32
layout (P = 1) while queries and outputs stay in the model's dtype; the kernel
rounds new keys/values to fp8 as torch does and decodes them exactly on reading.
`CpuAttention.gather_context` reads a sequence back in position order.

Fresh prefills run through the kernel too: it measured about 3x faster than torch's
scaled_dot_product_attention per sequence (benchmarks/attention_micro.py).

Caches the kernel does not take (float16, a head size that is not a multiple of
16, an odd block size with bfloat16) go to `ReferenceAttention` on a view of the
same memory in its own layout; the choice depends only on the cache's dtype and
shape, so one cache is always read and written in one layout.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from heron import envs
from heron.kernels import cbuild
from heron.kernels.interface import AttentionBackend, AttentionMetadata
from heron.kernels.reference import ReferenceAttention
from heron.kernels.reference import gather_context as reference_gather_context
from heron.kernels.reference import write_kv as reference_write_kv
from heron.logger import get_logger

logger = get_logger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.c"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Cache dtypes: the model's, or an fp8 format whatever the model's dtype.
FP8_DTYPES = {torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
_CACHE_CODES = {**_DTYPE_CODES, **FP8_DTYPES}
_F_WRITE_KV, _F_ATTEND = 1, 2
_ERRORS = {
    -1: "unsupported head_size, block_size, head counts or dtype",
    -2: "query_start_loc must start at 0, never decrease and end at the number of tokens",
    -3: "every seq_lens[i] must be >= its query length and fit in its block table row",
    -4: "a block table entry used by a sequence is outside the cache's blocks",
    -5: "a slot_mapping entry is past the end of the cache",
    -6: "out of memory for the kernel's scratch buffers",
}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.heron_attention
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    f32 = ctypes.c_float
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, ptr,
                   i32, i32, i32, i32, i32, i32, i32, i32, f32, f32, f32, i32, i32]
    fn.restype = i32
    for name in ("heron_fp8_encode", "heron_fp8_decode"):
        getattr(lib, name).argtypes = [ptr, ptr, i64, i32]
        getattr(lib, name).restype = None
    lib.heron_attention_isa.restype = i32


# Tried in order by _load_kernel (tests narrow it to the portable build).
_FLAG_SETS = cbuild.FLAG_SETS


@functools.lru_cache(maxsize=None)
def _load_kernel() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not). Compiles on the first call of the process."""
    return cbuild.load_library(_SOURCE, _declare, _FLAG_SETS)


def native_kernel_available() -> bool:
    """Whether the C kernel compiles and loads here (builds it on the first call)."""
    return _load_kernel()[0] is not None


def fp8_encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values -> `dtype` (an fp8 dtype) by the kernel's own conversion (for tests:
    it must equal `x.to(dtype)` bit for bit)."""
    lib = _load_kernel()[0]
    if lib is None:
        raise RuntimeError(f"the C attention kernel is unavailable: {_load_kernel()[1]}")
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    lib.heron_fp8_encode(x.data_ptr(), out.data_ptr(), x.numel(), FP8_DTYPES[dtype])
    return out.view(dtype)


def fp8_decode(x: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor -> float32 by the kernel's own conversion (for tests)."""
    lib = _load_kernel()[0]
    if lib is None:
        raise RuntimeError(f"the C attention kernel is unavailable: {_load_kernel()[1]}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.heron_fp8_decode(x.data_ptr(), out.data_ptr(), x.numel(), FP8_DTYPES[x.dtype])
    return out


class CpuAttention(AttentionBackend):
    """Attention backend of the cpu platform: the C kernel, or the reference as fallback.

    forward() takes query [T, num_heads, head_size] and key/value
    [T, num_kv_heads, head_size] whose last two dims are contiguous (the token
    stride is free, so views of a fused qkv tensor need no copy; otherwise they
    are copied). Query, key and value in the cache's dtype (bfloat16 or float32)
    avoid conversions; with an fp8 cache they stay in the model's dtype (float32 or
    bfloat16) and the kernel converts keys and values as it stores them, as
    x / k_scale and x / v_scale (both 1.0 unless set: `AttentionBackend.k_scale`).
    Metadata tensors live on the CPU:
    query_start_loc, seq_lens, block_tables int32 with a contiguous last dim,
    slot_mapping int64 (a negative slot skips the token's write).
    """
    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_size, scale)
        self._reference = ReferenceAttention(num_heads, num_kv_heads, head_size, scale)
        mode = (envs.get("HERON_CPU_ATTENTION") or "auto").strip().lower()
        if mode not in ("auto", "native", "reference"):
            raise ValueError(f"HERON_CPU_ATTENTION must be auto, native or reference, got {mode!r}")
        self._lib: ctypes.CDLL | None = None
        if mode == "reference":
            _warn_once("HERON_CPU_ATTENTION=reference: cpu attention runs the slow plain-torch "
                       "reference instead of the C kernel")
            return
        self._lib, why = _load_kernel()
        if self._lib is None:
            if mode == "native":
                raise RuntimeError(f"HERON_CPU_ATTENTION=native but the C kernel is "
                                   f"unavailable: {why}")
            _warn_once(f"cpu attention falls back to the slow plain-torch reference: {why}")

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (num_blocks, 2, num_kv_heads, block_size, head_size)

    # ------------------------------------------------------------------ layout

    def uses_native_layout(self, kv_cache: torch.Tensor) -> bool:
        """Whether this cache is in the kernel's layout (else the reference's, on a view)."""
        if self._lib is None:
            return False
        if kv_cache.dtype not in _CACHE_CODES:
            _warn_once(f"cpu attention: the C kernel takes bfloat16, float32 or fp8 caches, "
                       f"not {kv_cache.dtype}; using the slow reference")
            return False
        if kv_cache.dtype == torch.bfloat16 and kv_cache.dim() == 5 and kv_cache.shape[3] % 2:
            _warn_once("cpu attention: the C kernel needs an even block size for bfloat16 "
                       "caches; using the slow reference")
            return False
        if self.head_size % 16:
            _warn_once(f"cpu attention: the C kernel needs head_size % 16 == 0, got "
                       f"{self.head_size}; using the slow reference")
            return False
        return True

    @staticmethod
    def _reference_view(kv_cache: torch.Tensor) -> torch.Tensor:
        """The same memory seen in the reference layout [2, blocks, block_size, heads, dim]."""
        blocks, two, heads, block_size, dim = kv_cache.shape
        return kv_cache.view(-1).view(two, blocks, block_size, heads, dim)

    def gather_context(self, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                       block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [seq_len, num_kv_heads, head_size] of one sequence, in position order."""
        if not self.uses_native_layout(kv_cache):
            return reference_gather_context(self._reference_view(kv_cache), block_table, seq_len,
                                            block_size)
        _, _, heads, bs, dim = kv_cache.shape
        blocks = kv_cache[block_table[:(seq_len + bs - 1) // bs].long()]   # [n, 2, H, bs, D]
        # elements per 32-bit word; fp8 caches use the float32 layout (values as stored)
        p = 1 if kv_cache.dtype in FP8_DTYPES else 4 // kv_cache.element_size()
        keys = (blocks[:, 0].reshape(-1, heads, dim // p, bs, p)
                .permute(0, 3, 1, 2, 4).reshape(-1, heads, dim)[:seq_len])
        values = (blocks[:, 1].reshape(-1, heads, bs // p, dim, p)
                  .permute(0, 2, 4, 1, 3).reshape(-1, heads, dim)[:seq_len])
        return keys, values

    # ------------------------------------------------------------------ compute

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store keys/values [T, num_kv_heads, head_size] at their flat slots."""
        if not self.uses_native_layout(kv_cache):
            reference_write_kv(self._reference_view(kv_cache), key, value, slot_mapping,
                               self.k_scale, self.v_scale)
            return
        self._check_cache(kv_cache, kv_cache.shape[3])
        key, value = self._kv_rows(key, value, self._row_dtype(kv_cache, key.dtype))
        slots = _index(slot_mapping, torch.int64, "slot_mapping", key.shape[0])
        self._call(None, key, value, None, kv_cache, None, None, None, slots, 0, key.shape[0],
                   _F_WRITE_KV)

    @staticmethod
    def _row_dtype(kv_cache: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
        """The dtype the kernel takes queries and new keys/values in: the cache's own, or
        for an fp8 cache the given one when it is float32 or bfloat16 (else float32)."""
        if kv_cache.dtype not in FP8_DTYPES:
            return kv_cache.dtype
        return dtype if dtype in _DTYPE_CODES else torch.float32

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """As AttentionBackend.forward; `out`, if given, is a contiguous tensor shaped and
        typed like query that receives the result (and is returned)."""
        if not self.uses_native_layout(kv_cache):
            result = self._reference.forward(query, key, value,
                                             self._reference_view(kv_cache), meta)
            return out.copy_(result) if out is not None else result
        row_dtype = self._row_dtype(kv_cache, query.dtype)
        if query.dtype != row_dtype:
            # Compute in the cache's dtype rather than switch this cache to the
            # reference's layout; bf16 -> f32 is exact, f32 -> bf16 rounds q.
            result = self.forward(query.to(row_dtype), key, value, kv_cache, meta)
            return out.copy_(result) if out is not None else result.to(query.dtype)
        self._check_cache(kv_cache, meta.block_size)
        query = _rows(query, self.num_heads, self.head_size, "query")
        key, value = self._kv_rows(key, value, row_dtype)
        num_tokens, n = query.shape[0], meta.num_seqs
        if key.shape[0] != num_tokens:
            raise ValueError(f"key has {key.shape[0]} tokens, query {num_tokens}")
        qsl = _index(meta.query_start_loc, torch.int32, "query_start_loc", n + 1)
        seq_lens = _index(meta.seq_lens, torch.int32, "seq_lens", n)
        slots = _index(meta.slot_mapping, torch.int64, "slot_mapping", num_tokens)
        tables = meta.block_tables
        if (tables.dtype != torch.int32 or tables.device.type != "cpu" or tables.dim() != 2
                or tables.shape[0] < n or (tables.shape[1] > 1 and tables.stride(1) != 1)):
            raise ValueError("block_tables must be an int32 CPU tensor [num_seqs, max_blocks] "
                             "with a contiguous last dim")
        if out is None:
            out = torch.empty((num_tokens, self.num_heads, self.head_size), dtype=query.dtype)
        elif (out.shape != query.shape or out.dtype != query.dtype or not out.is_contiguous()
              or out.device.type != "cpu"):
            raise ValueError(f"out must be a contiguous CPU {query.dtype} tensor of shape "
                             f"{tuple(query.shape)}")
        if num_tokens:
            self._call(query, key, value, out, kv_cache, qsl, seq_lens, tables, slots, n,
                       num_tokens, _F_WRITE_KV | _F_ATTEND)
        return out

    def _call(self, query: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor,
              out: torch.Tensor | None, kv_cache: torch.Tensor, qsl: torch.Tensor | None,
              seq_lens: torch.Tensor | None, tables: torch.Tensor | None, slots: torch.Tensor,
              num_seqs: int, num_tokens: int, flags: int) -> None:
        """The one place that hands pointers to C: every tensor was checked by the caller."""
        assert self._lib is not None
        row_dtype = key.dtype   # the model's: queries, outputs and new keys/values share it
        rc = self._lib.heron_attention(
            query.data_ptr() if query is not None else None,
            query.stride(0) if query is not None else 0,
            key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
            out.data_ptr() if out is not None else None,
            kv_cache.data_ptr(), kv_cache.shape[0],
            qsl.data_ptr() if qsl is not None else None,
            seq_lens.data_ptr() if seq_lens is not None else None,
            tables.data_ptr() if tables is not None else None,
            tables.stride(0) if tables is not None else 0,
            tables.shape[1] if tables is not None else 0,
            slots.data_ptr(), num_seqs, num_tokens, self.num_heads, self.num_kv_heads,
            self.head_size, kv_cache.shape[3], _DTYPE_CODES[row_dtype],
            _CACHE_CODES[kv_cache.dtype], self.scale, self.k_scale, self.v_scale,
            torch.get_num_threads(), flags)
        if rc:
            raise ValueError(f"cpu attention: {_ERRORS.get(rc, f'kernel error {rc}')}")

    # ------------------------------------------------------------------ checks

    def _kv_rows(self, key: torch.Tensor, value: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked key and value in `dtype`: the cache's (as the reference writes them), or
        the model's for an fp8 cache, which the kernel rounds to fp8 itself."""
        if key.dtype != dtype:
            key = key.to(dtype)
        if value.dtype != dtype:
            value = value.to(dtype)
        key = _rows(key, self.num_kv_heads, self.head_size, "key")
        value = _rows(value, self.num_kv_heads, self.head_size, "value")
        if value.shape[0] != key.shape[0]:
            raise ValueError(f"key has {key.shape[0]} tokens, value {value.shape[0]}")
        return key, value

    def _check_cache(self, kv_cache: torch.Tensor, block_size: int) -> None:
        shape = kv_cache.shape
        if (len(shape) != 5 or shape[1] != 2 or shape[2] != self.num_kv_heads
                or shape[3] != block_size or shape[4] != self.head_size):
            want = self.kv_cache_shape(-1, block_size, self.num_kv_heads, self.head_size)
            raise ValueError(f"kv_cache must be {want} (-1: any number of blocks), "
                             f"got {tuple(shape)}")
        if not kv_cache.is_contiguous() or kv_cache.device.type != "cpu":
            raise ValueError("kv_cache must be a contiguous CPU tensor")


def _rows(x: torch.Tensor, heads: int, dim: int, name: str) -> torch.Tensor:
    """x [T, heads, dim] with contiguous [heads, dim] rows (any token stride), else an error."""
    if x.dim() != 3 or x.shape[1] != heads or x.shape[2] != dim or x.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor [T, {heads}, {dim}], got "
                         f"{tuple(x.shape)} on {x.device}")
    if x.stride(2) != 1 or x.stride(1) != dim or x.stride(0) < 0:
        x = x.contiguous()
    return x


def _index(t: torch.Tensor, dtype: torch.dtype, name: str, min_len: int) -> torch.Tensor:
    """A checked 1-d index tensor of the dtype the kernel reads."""
    if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 1 or t.shape[0] < min_len:
        raise ValueError(f"{name} must be a 1-d {dtype} CPU tensor of at least {min_len} "
                         f"entries, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t if t.is_contiguous() else t.contiguous()
