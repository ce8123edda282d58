"""Write the keys and values of a step's new tokens into their paged-cache slots."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    key_ptr, value_ptr,           # [T, Hkv, D], last dim contiguous
    k_cache_ptr, v_cache_ptr,     # [num_blocks, BLOCK_SIZE, Hkv, D] each, last dim contiguous
    slot_ptr,                     # int64 [T]: block_id * BLOCK_SIZE + offset; < 0 skips the token
    num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per token: all its kv heads at once (a few hundred bytes to move)."""
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:   # a padded row (e.g. a captured graph's spare batch entries)
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_PAD)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_SIZE)[None, :]
    src_k = key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
