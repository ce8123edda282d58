"""Triton kernels for the `triton` attention backend (cuda and rocm platforms).

Importing this package imports triton: only `heron.kernels.triton_attention` does,
and only when a backend instance runs its first forward pass. Set
TRITON_INTERPRET=1 before the first import to run the kernels on CPU tensors
(the tests do).

Cache layout (shared with the reference backend): one layer's cache is
`[2, num_blocks, block_size, num_kv_heads, head_size]`; index 0 keys, 1 values.
A kernel reads one kv head of a token as `head_size` contiguous elements
(128 bytes for head size 64 in 16 bits: one coalesced segment), and a tile of
tokens as rows `num_kv_heads * head_size` apart. The reference backend reads the
same tensor, which is what lets tests compare caches directly.

Modules:
  cache_write.py   write_kv_kernel: new keys/values into their slots
  attention.py     paged_attention_kernel: prefill, chunked prefill and decode over
                   the block table (one grid for a mixed batch, optional split along
                   the sequence), and split_reduce_kernel that merges the splits
"""
