"""SamplingParams: vLLM's names and defaults, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5

# Limits on one request (refused with a ValueError past them; the server answers 400).
MAX_N = 128                   # completions per request (OpenAI's limit)
MAX_TEMPERATURE = 100.0       # logits / 100 is already close to uniform
MAX_TOP_K = 2**31 - 1         # larger values mean "no top-k" in effect: refused as typos
MAX_LOGPROBS = 20             # vLLM's default max_logprobs
MAX_STOP_STRINGS = 256        # stop strings, and stop_token_ids, per request
MAX_STOP_LENGTH = 1024        # characters in one stop string


@dataclass
class SamplingParams:
    """How to generate one completion (or `n` of them) for a prompt.

    temperature 0 means greedy. top_k 0 or -1 and top_p 1 and min_p 0 disable those
    filters. Penalties at 0 (presence, frequency) or 1 (repetition) are off.
    `logprobs=k` returns the top-k log-probabilities of each generated position plus
    the sampled token's; `prompt_logprobs=k` does the same for the prompt.
    """
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Filled by the engine: the tokens that end a completion besides stop_token_ids.
    eos_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"invalid SamplingParams: {message}")

        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                     "temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            fail(f"n must be an integer from 1 to {MAX_N}, got {self.n!r}")
        if self.temperature > MAX_TEMPERATURE:
            fail(f"temperature must be at most {MAX_TEMPERATURE:g}, got {self.temperature}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not self.repetition_penalty > 0.0:
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not self.temperature >= 0.0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            fail(f"top_k must be 0 or -1 (disabled) or a positive integer up to {MAX_TOP_K}, "
                 f"got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail(f"max_tokens must be an integer >= 1 (or None for up to max_model_len), "
                 f"got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                fail(f"{name} must be None or an integer from 0 to {MAX_LOGPROBS}, got {value!r}")
        if self.seed is not None:
            # torch seeds generators with 64 bits; with n > 1, completion i uses seed + i.
            if not isinstance(self.seed, int) or not -2**63 <= self.seed <= 2**64 - self.n:
                fail(f"seed must be an integer from -2**63 to 2**64 - n, got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            fail(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            fail(f"stop must be a non-empty string of at most {MAX_STOP_LENGTH} characters, "
                 f"or a list of them")
        if len(self.stop_token_ids) > MAX_STOP_STRINGS:
            fail(f"at most {MAX_STOP_STRINGS} stop_token_ids, got {len(self.stop_token_ids)}")
        if any(not isinstance(t, int) or not 0 <= t < 2**31 for t in self.stop_token_ids):
            fail("stop_token_ids must be token ids (non-negative integers of the vocabulary)")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def stop_ids(self) -> set[int]:
        """Token ids that end the completion (EOS unless ignored, plus stop_token_ids)."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def clone(self, **changes: object) -> "SamplingParams":
        from dataclasses import replace
        return replace(self, **changes)
