"""KV-cache manager: which blocks each request holds, prefix-cache lookups, and slots
for the tokens the scheduler is about to compute."""
from __future__ import annotations

from dataclasses import dataclass

from heron.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from heron.core.request import Request


@dataclass
class PrefixCacheStats:
    """Counters for the prefix-cache hit rate (tokens, not requests)."""
    queries: int = 0
    hits: int = 0
    requests: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def _update_block_hashes(self, request: Request) -> None:
        """Extend the request's chained hashes to every full block of its known tokens."""
        hashes, bs = request.block_hashes, self.block_size
        while (len(hashes) + 1) * bs <= request.num_tokens:
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, request.all_token_ids[start:start + bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of a new request: its blocks and token count.

        The hit never covers the last token, which must be computed to get logits.
        Requests asking for prompt logprobs skip the cache (they need every position)."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.stats.requests += 1
        self.stats.queries += request.num_tokens
        self.stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> list[KVCacheBlock] | None:
        """Reserve blocks so the request can hold `num_new_tokens` more tokens.

        `new_computed_blocks` are prefix-cache hits found for a request being scheduled
        for the first time. Returns the newly allocated blocks, or None (and changes
        nothing) when too few blocks are free."""
        computed = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_tokens_after = (request.num_computed_tokens + len(computed) * self.block_size
                            + num_new_tokens)
        num_needed = -(-num_tokens_after // self.block_size) - len(blocks) - len(computed)
        # Cached hits that sit in the free queue are not available for new allocations.
        num_evictable_hits = sum(1 for b in computed if b.ref_cnt == 0)
        if max(num_needed, 0) > self.pool.num_free_blocks - num_evictable_hits:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(computed)
        blocks.extend(computed)
        new_blocks = self.pool.allocate(max(num_needed, 0))
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, blocks, num_tokens_after)
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Register every block that will be full of known tokens after this step."""
        if not self.enable_caching:
            return
        self._update_block_hashes(request)
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(num_full):
            if blocks[i].block_hash is None:
                self.pool.cache_block(blocks[i], request.block_hashes[i])

    def free_blocks_beyond(self, request: Request, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens' (those that only held
        rejected speculative tokens), tail first. They were never hashed: hashes cover
        known tokens only."""
        blocks = self.req_blocks.get(request.request_id, [])
        keep = -(-num_tokens // self.block_size)
        if len(blocks) > keep:
            excess = blocks[keep:]
            del blocks[keep:]
            self.pool.free(reversed(excess))

    def free(self, request: Request) -> None:
        """Give back every block of a finished or preempted request, tail first."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
