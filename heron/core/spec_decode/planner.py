"""How many tentative tokens a decoding request takes in a step, and which (n-gram)."""
from __future__ import annotations

from dataclasses import dataclass, field

from heron.config import SpeculativeConfig
from heron.core.request import Request
from heron.core.spec_decode.ngram import NgramProposer


@dataclass
class Speculation:
    """Tentative tokens scheduled after a request's last token. `token_ids` is empty when
    the worker's draft model proposes them during the step (`num_tokens` of them)."""
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)

    def truncated(self, num_tokens: int) -> "Speculation":
        num_tokens = max(0, min(num_tokens, self.num_tokens))
        return Speculation(num_tokens, self.token_ids[:num_tokens])


NO_SPECULATION = Speculation()


class SpeculationPlanner:
    """The scheduler's side of speculative decoding: n-gram proposals are made here, in
    the engine's process; a draft model's are only counted here and made by the worker."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.ngram = (NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
                      if config.method == "ngram" else None)

    def max_tokens_for(self, request: Request) -> int:
        """Proposals worth verifying: each step emits accepted + 1 tokens, so never more than
        the request may still generate less one, nor past the model's context."""
        return max(0, min(self.config.num_speculative_tokens,
                          request.max_tokens - request.num_output_tokens - 1,
                          self.max_model_len - request.num_tokens - 1))

    def plan(self, request: Request) -> Speculation:
        """The speculation for a request whose next step computes only its last token."""
        k = self.max_tokens_for(request)
        if k == 0:
            return NO_SPECULATION
        if self.ngram is None:
            return Speculation(k)
        proposal = self.ngram.propose(request.all_token_ids, k)
        return Speculation(len(proposal), proposal)
