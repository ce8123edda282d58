"""Log-probabilities in the two shapes OpenAI uses (completions and chat)."""
from __future__ import annotations

import math
from typing import Any, Sequence

from heron.core.request import Logprob, PositionLogprobs

# JSON has no -Infinity; OpenAI clients expect a number.
_FLOOR = -9999.0


def _value(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return _FLOOR if math.isinf(logprob) or math.isnan(logprob) else max(logprob, _FLOOR)


def _token_text(position: PositionLogprobs, token_id: int, tokenizer: Any) -> str:
    entry = position.get(token_id)
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    ranked = [(t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= k]
    return sorted(ranked, key=lambda item: item[1].rank or 0)


def completion_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs | None],
                        k: int, tokenizer: Any, text_offset: int = 0) -> dict[str, list]:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} for /v1/completions.

    `positions[i]` belongs to `token_ids[i]`; None (the first prompt token) has no
    log-probability.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, position in zip(token_ids, positions):
        if position is None:
            text = tokenizer.decode([token_id])
            token_logprobs.append(None)
            tops.append(None)
        else:
            text = _token_text(position, token_id, tokenizer)
            entry = position.get(token_id)
            token_logprobs.append(_value(entry.logprob) if entry is not None else None)
            tops.append({_token_text(position, t, tokenizer): _value(lp.logprob)
                         for t, lp in _top(position, k)})
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_entry(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": _value(logprob),
            "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs],
                  k: int, tokenizer: Any) -> dict[str, list]:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]} for chat."""
    content = []
    for token_id, position in zip(token_ids, positions):
        entry = position.get(token_id)
        item = _chat_entry(_token_text(position, token_id, tokenizer),
                           entry.logprob if entry is not None else None)
        item["top_logprobs"] = [_chat_entry(_token_text(position, t, tokenizer), lp.logprob)
                                for t, lp in _top(position, k)]
        content.append(item)
    return {"content": content}
