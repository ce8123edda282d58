"""Single-stream decode with and without n-gram speculative decoding, on a repetitive
workload: the embedded model is asked to repeat a code snippet with one edit (greedy).

    .venv/bin/python benchmarks/speculative.py [--model DIR] [--k 4] [--max-tokens 256]
        [--prompt-lookup-max 4] [--prompt-lookup-min 2] [--repeats 3] [--dtype auto]

One process, both engines loaded side by side; each configuration runs the same
request `--repeats` times after a warm-up (the median counts). Prints one JSON object:
ms per generated token and tokens/s for each, the speed-up, the acceptance rate and
the mean tokens emitted per verifying step, and whether the outputs were identical
(they must be: greedy output does not change with speculation).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

SNIPPET = '''def merge_sorted(left, right):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result


def merge_sort(items):
    """Sort a list with merge sort."""
    if len(items) <= 1:
        return items
    middle = len(items) // 2
    return merge_sorted(merge_sort(items[:middle]), merge_sort(items[middle:]))
'''

INSTRUCTION = ("Rewrite this Python code exactly as it is, but rename the variable `result` "
               "to `merged`. Output only the code.\n\n")


def build_prompt(llm) -> str:
    tokenizer = llm.get_tokenizer()
    return tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTION + SNIPPET}],
                                         tokenize=False, add_generation_prompt=True)


def time_runs(llm, prompt: str, params, repeats: int) -> tuple[float, list[int]]:
    """Median seconds of one request alone, and its tokens (a warm-up run first)."""
    llm.generate(prompt, params, use_tqdm=False)
    seconds, tokens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        seconds.append(time.perf_counter() - start)
        tokens = list(out.token_ids)
    return statistics.median(seconds), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from heron import LLM, SamplingParams

    common = dict(dtype=args.dtype, device=args.device, max_model_len=2048,
                  enable_prefix_caching=False)   # each repeat computes its prompt again
    spec_config = {"method": "ngram", "num_speculative_tokens": args.k,
                   "prompt_lookup_max": args.prompt_lookup_max,
                   "prompt_lookup_min": args.prompt_lookup_min}
    plain = LLM(args.model, **common)
    spec = LLM(args.model, speculative_config=spec_config, **common)
    prompt = build_prompt(plain)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    plain_s, plain_tokens = time_runs(plain, prompt, params, args.repeats)
    before = spec.llm_engine.spec_decoding_stats
    spec_s, spec_tokens = time_runs(spec, prompt, params, args.repeats)
    after = spec.llm_engine.spec_decoding_stats
    drafts = after.num_drafts - before.num_drafts
    proposed = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    n = len(plain_tokens)
    print(json.dumps({
        "model": plain.llm_engine.model_path, "platform": plain.llm_engine.platform.name,
        "prompt_tokens": len(plain.get_tokenizer().encode(prompt)), "generated_tokens": n,
        "speculative_config": spec_config,
        "plain": {"ms_per_token": 1000 * plain_s / n, "tokens_per_s": n / plain_s},
        "ngram": {"ms_per_token": 1000 * spec_s / len(spec_tokens),
                  "tokens_per_s": len(spec_tokens) / spec_s},
        "speedup": plain_s / spec_s,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_tokens_per_verifying_step": 1 + accepted / drafts if drafts else 0.0,
        "identical_output": plain_tokens == spec_tokens,
    }, indent=2))


if __name__ == "__main__":
    main()
