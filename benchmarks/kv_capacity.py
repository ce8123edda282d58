"""Tokens of KV cache a fixed budget holds, per kv_cache_dtype, for one model.

    HERON_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/kv_capacity.py [--model DIR]

Builds the engine once per dtype (auto = the model's bfloat16, fp8 = e4m3, fp8_e5m2)
on the cpu platform and prints one JSON line each: blocks, tokens, bytes per token.
"""
from __future__ import annotations

import argparse
import json

from heron import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "fp8", "fp8_e5m2"])
    args = ap.parse_args()
    for kv in args.kv_cache_dtypes:
        # A small profile batch: the budget is fixed, only the block size matters here.
        llm = LLM(args.model, dtype="bfloat16", device="cpu", max_model_len=2048,
                  max_num_batched_tokens=256, kv_cache_dtype=kv)
        engine, runner = llm.llm_engine, llm.llm_engine.executor.runner
        block_size = engine.config.cache.block_size
        print(json.dumps({
            "kv_cache_dtype": kv, "cache_dtype": str(runner.kv_caches[0].dtype).removeprefix("torch."),
            "blocks": engine.num_blocks, "tokens": engine.num_blocks * block_size,
            "bytes_per_token": runner.kv_block_bytes() // block_size}))
        llm.shutdown()
        del llm, engine, runner


if __name__ == "__main__":
    main()
