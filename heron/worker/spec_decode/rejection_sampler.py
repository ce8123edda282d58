"""Rejection sampling of proposals: the emitted tokens follow the target distribution
exactly, whatever the proposals were (Leviathan et al. 2023; Chen et al. 2023).

For each proposal x_i, drawn from the draft distribution q_i: accept it with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a token drawn from
normalize(max(p_i - q_i, 0)) and stop; when every proposal is accepted, emit a bonus
token drawn from p at the row after the last one. A proposal without draft
probabilities (n-gram lookup) has a one-hot q. Greedy requests accept while the
proposal is the target's argmax and then emit the argmax: the same tokens as without
speculation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verification:
    """How many proposals were accepted, and the token emitted after them."""
    num_accepted: int
    token_id: int


def verify_greedy(target_argmax: list[int], proposals: list[int]) -> Verification:
    """Accept while each proposal equals the target's argmax at its row; `target_argmax`
    has one more row than there are proposals."""
    accepted = 0
    while accepted < len(proposals) and proposals[accepted] == target_argmax[accepted]:
        accepted += 1
    return Verification(accepted, target_argmax[accepted])


def rejection_sample(target_probs: torch.Tensor, proposals: list[int],
                     draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> Verification:
    """Standard speculative rejection sampling for one request.

    `target_probs` is [k + 1, vocab]: row i is the target's distribution for the token
    after the i-th proposal's prefix. `draft_probs` is [k, vocab] (None: one-hot on the
    proposals)."""
    k = len(proposals)
    uniforms = torch.rand(k, generator=generator, device=target_probs.device).tolist()
    for i, token in enumerate(proposals):
        p = float(target_probs[i, token])
        q = float(draft_probs[i, token]) if draft_probs is not None else 1.0
        # Accept with probability min(1, p / q), i.e. when u * q < p (q > 0: x was drawn from q).
        if uniforms[i] * q < p:
            continue
        return Verification(i, _sample_residual(target_probs[i], token, draft_probs, i, generator))
    return Verification(k, sample_from(target_probs[k], generator))


def _sample_residual(p: torch.Tensor, token: int, draft_probs: torch.Tensor | None, row: int,
                     generator: torch.Generator | None) -> int:
    """A token from normalize(max(p - q, 0)), the distribution that corrects for rejection."""
    if draft_probs is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - draft_probs[row]).clamp_min_(0.0)
    if float(residual.sum()) <= 0.0:
        # Only rounding gets here (p == q would have accepted): fall back to p itself.
        residual = p
    return sample_from(residual, generator)


def sample_from(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to `weights` (exponential-race form
    of the Gumbel-max trick, as the sampler draws)."""
    noise = torch.empty_like(weights, dtype=torch.float32).exponential_(generator=generator)
    return int((weights.float() / noise).argmax())
