"""Paged attention over the block table: prefill, chunked prefill and decode in one grid.

Grid: (query tiles, kv heads, splits).

* Query tiles. A program takes BLOCK_Q consecutive new tokens of one sequence and
  all GROUP query heads that share one kv head, packed as BLOCK_M = BLOCK_Q *
  GROUP_PAD rows of one matrix: the keys and values it loads serve every head of
  the group, and a decode (one token) still fills the 16 rows tl.dot needs when
  the group is large. Sequence i owns tiles `query_start_loc[i] // BLOCK_Q + i`
  onwards (at most cdiv(query_len, BLOCK_Q) of them fit before sequence i + 1's
  first tile), so the grid is `num_tokens // BLOCK_Q + num_seqs` tiles and a
  program finds its sequence by binary search over query_start_loc, without any
  index built on the host. Tiles past a sequence's query length exit at once.
* Keys and values are read in tiles of BLOCK_N positions independent of the
  cache's block size: each position looks its block up in the block table, so
  any power-of-two block size works and tl.dot always gets >= 16 keys.
* Causal mask: new token j of a sequence sits at position seq_len - query_len + j
  and sees positions 0..its own. A tile stops at the last position its last
  token sees.
* Splits (IS_SPLIT): for few, long sequences (decode), the key range of each
  tile is cut into `num_splits` contiguous pieces handled by separate programs,
  which write unnormalised partial results (accumulator, running max, running
  sum) for `split_reduce_kernel` to merge. Without splits a long decode runs on
  num_seqs * num_kv_heads programs, too few to keep a GPU's memory busy.

Softmax is online (flash-attention style) in float32, in base 2: scores are
multiplied by scale * log2(e) once so that exp2 serves.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence whose first tile (query_start_loc[i] // BLOCK_Q + i) is <= tile."""
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid)
    return lo


@triton.jit
def paged_attention_kernel(
    out_ptr,                      # [T, Hq, D] (not IS_SPLIT)
    part_acc_ptr,                 # fp32 [splits, T, Hq, HEAD_PAD] (IS_SPLIT)
    part_max_ptr, part_sum_ptr,   # fp32 [splits, T, Hq] (IS_SPLIT)
    q_ptr,                        # [T, Hq, D], last dim contiguous
    k_cache_ptr, v_cache_ptr,     # [num_blocks, BLOCK_SIZE, Hkv, D] each
    block_tables_ptr,             # int32 [num_seqs, max_blocks]
    seq_lens_ptr,                 # int32 [num_seqs]
    query_start_loc_ptr,          # int32 [num_seqs + 1]
    scale_log2,                   # softmax scale * log2(e)
    num_seqs, num_tokens, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IS_SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    q_index = q_tile * BLOCK_Q + rows // GROUP_PAD      # new token of the sequence
    group_head = rows % GROUP_PAD
    q_head = kv_head * GROUP + group_head
    row_ok = (q_index < query_len) & (group_head < GROUP)
    q_pos = context_len + q_index
    token = q_start + q_index
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE
    q = tl.load(q_ptr + token[:, None] * stride_qt + q_head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Keys this tile needs: up to the position of its last token (causal).
    kv_end = tl.minimum(seq_len, context_len + (q_tile + 1) * BLOCK_Q)
    kv_tiles = tl.cdiv(kv_end, BLOCK_N)
    if IS_SPLIT:
        per_split = tl.cdiv(kv_tiles, num_splits)
        first_tile = split * per_split
        last_tile = tl.minimum(first_tile + per_split, kv_tiles)
    else:
        first_tile = 0
        last_tile = kv_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    table_row = block_tables_ptr + seq * stride_bt
    head_offset = kv_head * stride_ch
    for kv_tile in range(first_tile, last_tile):
        pos = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_end
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        slot = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_offset
        # Masked loads read 0 for positions past kv_end: those slots may hold anything.
        k = tl.load(k_cache_ptr + slot[None, :] + dims[:, None],
                    mask=pos_ok[None, :] & dim_ok[:, None], other=0.0)   # [HEAD_PAD, BLOCK_N]
        if IEEE_DOT:
            scores = tl.dot(q, k, input_precision="ieee")
        else:
            scores = tl.dot(q, k)
        scores = scores * scale_log2
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen nothing yet keeps max -inf; subtract 0 instead (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :],
                    mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)   # [BLOCK_N, HEAD_PAD]
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if IS_SPLIT:
        num_q_heads = tl.num_programs(1) * GROUP
        part = (split * num_tokens + token) * num_q_heads + q_head
        tl.store(part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :], acc,
                 mask=row_ok[:, None])
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + q_head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def split_reduce_kernel(
    out_ptr,                      # [T, Hq, D]
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    num_tokens, num_splits, stride_ot, stride_oh,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Merge the splits of one (token, query head): rescale each to the common max.

    Split 0 always covers position 0, which every token sees, so the common max is
    finite; an empty split has max -inf and weighs exp2(-inf) = 0."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    num_q_heads = tl.num_programs(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    part = (splits * num_tokens + token) * num_q_heads + head
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    weight = tl.math.exp2(m - tl.max(m, 0))
    dims = tl.arange(0, HEAD_PAD)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :],
                  mask=split_ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l_s * weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_SIZE)
