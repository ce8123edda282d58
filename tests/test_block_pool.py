"""Block pool and KV-cache manager, without a model: exact ids, ref counts, eviction order."""
import pytest

from heron.core.block_pool import BlockPool, hash_block_tokens
from heron.core.kv_cache_manager import KVCacheManager
from heron.core.request import Request
from heron.core.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params))


def test_allocate_takes_blocks_from_the_front_in_id_order():
    pool = BlockPool(6)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.free_queue.block_ids() == [3, 4, 5]
    assert pool.num_free_blocks == 3


def test_free_appends_to_the_back_and_touch_removes_from_the_middle():
    pool = BlockPool(5)
    a = pool.allocate(2)
    pool.free(reversed(a))                   # freed tail first
    assert pool.free_queue.block_ids() == [2, 3, 4, 1, 0]
    pool.touch([a[1]])                        # reuse block 1 from the middle of the queue
    assert a[1].ref_cnt == 1
    assert pool.free_queue.block_ids() == [2, 3, 4, 0]
    pool.touch([a[1]])
    assert a[1].ref_cnt == 2
    pool.free([a[1]])
    assert a[1].ref_cnt == 1 and 1 not in pool.free_queue.block_ids()


def test_over_allocation_and_double_free_are_errors():
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError):
        pool.free(blocks)


def test_cached_block_stays_findable_until_reallocated():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_block(block, h)
    pool.free([block])
    assert pool.get_cached_block(h) is block      # free but still cached
    pool.allocate(1)                              # takes block 1 (front), block 0 survives
    assert pool.get_cached_block(h) is block
    pool.allocate(1)                              # now block 0 is reused: evicted
    assert pool.get_cached_block(h) is None and block.block_hash is None


def test_chained_hash_depends_on_the_whole_prefix():
    a = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(a, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 2]), [3, 4])
    assert hash_block_tokens(a, [3, 4]) == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])


def test_manager_allocates_exact_blocks_for_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = make_request("a", list(range(10)))
    new = kv.allocate_slots(r, 10)
    assert [b.block_id for b in new] == [0, 1, 2]
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2) == []            # positions 10, 11 fit in block 2
    r.num_computed_tokens = 12
    assert [b.block_id for b in kv.allocate_slots(r, 1)] == [3]
    assert kv.block_ids("a") == [0, 1, 2, 3]
    kv.free(r)
    assert kv.pool.free_queue.block_ids() == [4, 5, 6, 7, 3, 2, 1, 0]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = make_request("a", list(range(12)))
    assert kv.allocate_slots(r, 12) is None
    assert kv.num_free_blocks == 2 and kv.block_ids("a") == []


def test_prefix_hit_shares_blocks_and_never_covers_the_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(12)))
    kv.allocate_slots(a, 12)
    # Same 12 tokens: a hit on at most 11 tokens -> 2 full blocks.
    b = make_request("b", list(range(12)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == [0, 1]
    new = kv.allocate_slots(b, 12 - n, hits)
    assert [x.block_id for x in new] == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert kv.stats.queries == 12 and kv.stats.hits == 8


def test_prefix_hit_on_freed_blocks_and_lru_eviction():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)                 # blocks 0,1 full and cached, 2 partial
    kv.free(a)
    assert kv.pool.free_queue.block_ids() == [3, 2, 1, 0]
    b = make_request("b", [1, 2, 3, 4, 9])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 4
    new = kv.allocate_slots(b, 1, hits)     # takes block 3 from the front
    assert [x.block_id for x in new] == [3]
    assert kv.pool.free_queue.block_ids() == [2]
    c = make_request("c", [7, 8, 7, 8, 7])  # no hit; needs 3 blocks, only 1 free
    assert kv.get_computed_blocks(c) == ([], 0)
    assert kv.allocate_slots(c, 5) is None


def test_freed_hits_count_against_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    kv.free(a)                                   # all 3 free, blocks 0,1 cached
    b = make_request("b", [1, 2, 3, 4, 6, 7, 8, 9])
    hits, n = kv.get_computed_blocks(b)
    assert n == 4
    # needs 2 more blocks but only block 2 is free besides the hits themselves
    assert kv.allocate_slots(b, 4, hits) is None
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [0, 0, 0]


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    a = make_request("a", list(range(12)))
    kv.allocate_slots(a, 12)
    b = make_request("b", list(range(12)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert not kv.pool.cached


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(make_request("a", list(range(12))), 12)
    b = make_request("b", list(range(12)), prompt_logprobs=1)
    assert kv.get_computed_blocks(b) == ([], 0)
