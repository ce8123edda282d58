"""Incremental detokenization and stop strings.

Decoding token by token is not the same as decoding a whole sequence (byte-level
BPE splits characters, SentencePiece drops leading spaces), so each step decodes a
short window of recent tokens twice, with and without the new ones, and emits only
the difference once it no longer ends in a partial UTF-8 character.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_WINDOW = 6  # tokens of left context kept for decoding


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    text: str = ""
    _tokens: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def __post_init__(self) -> None:
        # Start from the end of the prompt, so the first output token decodes with its
        # leading space as it would inside the full text.
        tail = self.prompt_token_ids[-_WINDOW:]
        self._tokens = list(tail)
        self._prefix_offset = 0
        self._read_offset = len(tail)
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def update(self, new_token_ids: list[int], num_output_tokens: int) -> str | None:
        """Add tokens; returns the stop string that matched, if any (text is then cut)."""
        start = len(self.text)
        for token in new_token_ids:
            self._tokens.append(token)
            prefix = self._decode(self._tokens[self._prefix_offset:self._read_offset])
            full = self._decode(self._tokens[self._prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix):]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._tokens)
            if len(self._tokens) > 4 * _WINDOW:  # keep the window short
                drop = self._prefix_offset
                self._tokens = self._tokens[drop:]
                self._prefix_offset -= drop
                self._read_offset -= drop
        if not self.stop or num_output_tokens <= self.min_tokens:
            return None
        return self._check_stop_strings(start)

    def _check_stop_strings(self, new_text_start: int) -> str | None:
        search_from = max(0, new_text_start - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[:index + len(stop)] if self.include_stop_str_in_output else self.text[:index]
        return stop
