"""Offline throughput with tensor parallelism, and the share of a decode step spent in
communication between the ranks.

    .venv/bin/python benchmarks/tensor_parallel.py --tp 1             # one rank, all cores
    .venv/bin/python benchmarks/tensor_parallel.py --tp 2             # two ranks, cores shared out
    .venv/bin/python benchmarks/tensor_parallel.py --tp 2 --gloo      # all-reduce over gloo only

Runs the shared workload (../shared/anchors/workloads.py, offline-64 by default) and
prints one JSON line: generated tokens/s, the mean decode step (every scheduled request
computing one token), and for several ranks the milliseconds per decode step each rank
spent in collectives (all-reduces and the logits gather, waiting for the slower rank
included), and the size of a decode step's message to the ranks and the time to encode,
pickle and write it.

The model: SmolLM2-135M's 9 attention heads do not split over 2 ranks, so by default
the benchmark builds (once, under HERON_CACHE_DIR) a random-weight model of SmolLM2's
shape, tokenizer and size with 8 query heads and 2 KV heads of 64 (`--model DIR` runs
another). Throughput does not depend on the weights' values: every request generates
exactly its max_tokens (ignore_eos).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def smollm2_shaped_model(heads: int, kv_heads: int) -> str:
    """A random-weight SmolLM2-shaped folder with `heads` query heads of 64 (built once)."""
    from pathlib import Path

    from heron import envs
    from heron.models.default_model import default_model_path

    folder = envs.cache_dir() / "models" / f"smollm2-shape-h{heads}-kv{kv_heads}-random"
    if (folder / "config.json").exists():
        return str(folder)
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(default_model_path())
    config = AutoConfig.from_pretrained(source)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv_heads, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for name in source.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(name, folder / name.name)
    return str(folder)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--model", default=None,
                    help="HF folder (default: a random SmolLM2-shaped model with 8 heads)")
    ap.add_argument("--workload", default="offline-64")
    ap.add_argument("--anchors", default=os.path.join(here, "..", "..", "shared", "anchors"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gloo", action="store_true",
                    help="all-reduce over gloo even on one host (no shared memory)")
    a = ap.parse_args()
    if a.gloo:
        os.environ["HERON_SHM_ALL_REDUCE"] = "0"
    sys.path.insert(0, os.path.abspath(a.anchors))
    import workloads

    from heron import LLM, SamplingParams

    reqs = workloads.get(a.workload)
    model = a.model or smollm2_shaped_model(heads=8, kv_heads=2)
    llm = LLM(model, dtype=a.dtype, max_model_len=2048, tensor_parallel_size=a.tp)
    engine, executor = llm.llm_engine, llm.llm_engine.executor
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
              for r in reqs]
    llm.generate([r.prompt for r in reqs[:2]], params[:2], use_tqdm=False)  # warm-up
    engine.scheduler.kv.reset_prefix_cache()

    decode_steps: list[float] = []
    comm_at_first_decode = sent_at_first_decode = None
    run_step = executor.execute_model

    def timed_step(sched):   # the executor's step, timed where every request decodes
        nonlocal comm_at_first_decode, sent_at_first_decode
        decoding = all(item.num_new_tokens == 1 for item in sched.scheduled)
        if decoding and comm_at_first_decode is None and a.tp > 1:
            comm_at_first_decode = executor.collective_stats()
            sent_at_first_decode = dataclasses.replace(executor.transfer)
        start = time.perf_counter()
        output = run_step(sched)
        if decoding:
            decode_steps.append(time.perf_counter() - start)
        return output

    executor.execute_model = timed_step
    for i, (r, p) in enumerate(zip(reqs, params)):
        engine.add_request(f"bench-{i}", r.prompt, p)
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
    seconds = time.perf_counter() - start
    result = {"tensor_parallel_size": a.tp, "model": os.path.basename(model.rstrip("/")),
              "workload": a.workload, "dtype": a.dtype,
              "generated_tok_per_s": round(generated / seconds, 1),
              "decode_steps": len(decode_steps),
              "decode_step_ms": round(1e3 * sum(decode_steps) / len(decode_steps), 2)}
    if a.tp > 1:
        end = executor.collective_stats()
        per_rank = [(e.seconds - s.seconds) / len(decode_steps) * 1e3
                    for s, e in zip(comm_at_first_decode, end)]
        calls = (end[0].calls - comm_at_first_decode[0].calls) / len(decode_steps)
        sent = executor.transfer
        steps = sent.steps - sent_at_first_decode.steps
        result |= {"step_message_bytes": round((sent.bytes - sent_at_first_decode.bytes) / steps),
                   "step_message_send_us": round(
                       (sent.seconds - sent_at_first_decode.seconds) / steps * 1e6, 1),
                   "comm_ms_per_decode_step_by_rank": [round(x, 2) for x in per_rank],
                   "collectives_per_decode_step": round(calls, 1),
                   "shared_memory_all_reduce": not a.gloo}
    print(json.dumps(result))
    llm.shutdown()


if __name__ == "__main__":
    main()
