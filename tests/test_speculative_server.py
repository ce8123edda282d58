"""`heron serve --speculative-config` (vLLM's flag): answers equal the offline API without
speculation, and /metrics carries vLLM's spec_decode counters."""
from __future__ import annotations

import json

import httpx
import pytest

from heron import LLM, SamplingParams
from server_utils import RemoteServer

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
         "prompt_lookup_min": 1}
PROMPT = [5, 6, 7, 8, 9, 10] * 5


@pytest.fixture(scope="module")
def server(tiny_llama):
    with RemoteServer(tiny_llama, ["--served-model-name", "tiny", "--device", "cpu",
                                   "--speculative-config", json.dumps(NGRAM)]) as s:
        yield s


def test_completions_equal_offline_and_counters_are_exported(server, tiny_llama):
    plain = LLM(tiny_llama, device="cpu")
    want = plain.generate({"prompt_token_ids": PROMPT},
                          SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].text
    result = server.openai().completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                                temperature=0, extra_body={"ignore_eos": True})
    assert result.choices[0].text == want
    text = httpx.get(server.url + "/metrics").text
    for name in ("heron:spec_decode_num_drafts_total", "heron:spec_decode_num_draft_tokens_total",
                 "heron:spec_decode_num_accepted_tokens_total",
                 "heron:spec_decode_num_accepted_tokens_per_pos_total"):
        assert name in text, name
    m = server.metrics()
    drafts = m["heron:spec_decode_num_drafts_total"]
    proposed = m["heron:spec_decode_num_draft_tokens_total"]
    accepted = m["heron:spec_decode_num_accepted_tokens_total"]
    assert 0 < drafts <= proposed <= 3 * drafts
    assert 0 < accepted < proposed
    per_pos = [m[f'heron:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",'
                 f'position="{i}"}}'] for i in range(3)]
    assert sum(per_pos) == accepted and per_pos[0] >= per_pos[1] >= per_pos[2]
