"""Prompt-lookup (n-gram) proposals: pure Python over token ids, no model involved."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class NgramProposer:
    """Proposes the tokens that followed the latest earlier occurrence of the sequence's
    last n tokens, trying the longest n first (`max_n` down to `min_n`). A match close to
    the end repeats its pattern: after ...a b c a b, "a b" proposes c a b c ...

    Deterministic: the proposal's distribution q is one-hot, which is what the rejection
    sampler assumes for proposals without draft probabilities."""
    min_n: int
    max_n: int

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """At most `k` proposed next tokens (none when no suffix n-gram recurs)."""
        if k <= 0:
            return []
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = _latest_earlier_match(token_ids, n)
            if start is not None:
                return _copy_after(token_ids, start + n, k)
        return []


def _copy_after(token_ids: Sequence[int], follow: int, k: int) -> list[int]:
    """`k` tokens from `follow` on; a copy that reaches the end continues over the tokens
    it has just proposed (as an LZ77 copy does), so a repeating pattern keeps repeating."""
    extended = list(token_ids[follow:follow + k])
    period = len(token_ids) - follow
    while len(extended) < k:
        extended.append(extended[len(extended) - period])
    return extended


def _latest_earlier_match(token_ids: Sequence[int], n: int) -> int | None:
    """Start of the latest occurrence of the last `n` tokens that ends before the last
    token (so at least one token follows it), or None."""
    length = len(token_ids)
    suffix = list(token_ids[length - n:])
    first = suffix[0]
    # Candidates end at most at length - 2: the occurrence must be followed by a token.
    for start in range(length - n - 1, -1, -1):
        if token_ids[start] == first and list(token_ids[start:start + n]) == suffix:
            return start
    return None
