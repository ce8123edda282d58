"""Offline throughput of heron on a shared workload, and the KV-cache utilization it reached.

    .venv/bin/python benchmarks/offline_throughput.py --workload offline-64
    .venv/bin/python benchmarks/offline_throughput.py --model DIR --threads 2 --dtype bfloat16

Prints one JSON line: generated and total tokens/s, and KV-cache utilization, the
share of allocated KV slots (blocks in use x block size) that hold a token, averaged
over the steps of the run (vLLM's PagedAttention paper reports under 4% waste).
The workloads are those of ../shared/anchors/workloads.py (`--anchors` to point
elsewhere), so the figures compare with the peers measured by its bench_offline.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def load_workload(anchors: str, name: str):
    sys.path.insert(0, os.path.abspath(anchors))
    import workloads
    return workloads.get(name)


class UtilizationProbe:
    """Samples, after each engine step, how full the blocks held by requests are."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.samples: list[float] = []

    def sample(self) -> None:
        scheduler = self.engine.scheduler
        kv = scheduler.kv
        slots = sum(len(blocks) for blocks in kv.req_blocks.values()) * kv.block_size
        if slots:
            tokens = sum(r.num_computed_tokens for r in scheduler.running)
            self.samples.append(tokens / slots)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None,
                    help="HF folder or .gguf file (default: embedded SmolLM2, bf16 folder)")
    ap.add_argument("--workload", default="offline-64")
    ap.add_argument("--anchors", default=os.path.join(here, "..", "..", "shared", "anchors"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help='vLLM\'s JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    ap.add_argument("--enforce-eager", action="store_true",
                    help="the layers from Python, not the platform's compiled forward")
    ap.add_argument("--quantization", default=None, choices=["int8", "int4"])
    ap.add_argument("--kv-cache-dtype", default="auto")
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from heron import LLM, SamplingParams

    reqs = load_workload(a.anchors, a.workload)
    llm = LLM(a.model, dtype=a.dtype, max_model_len=a.max_model_len,
              max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
              enable_prefix_caching=not a.no_prefix_caching, enforce_eager=a.enforce_eager,
              speculative_config=a.speculative_config, quantization=a.quantization,
              kv_cache_dtype=a.kv_cache_dtype)
    engine = llm.llm_engine
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    llm.generate([r.prompt for r in reqs[:2]], params[:2], use_tqdm=False)  # warm-up
    engine.scheduler.kv.reset_prefix_cache()
    probe = UtilizationProbe(engine)
    for i, (r, p) in enumerate(zip(reqs, params)):
        engine.add_request(f"bench-{i}", r.prompt, p)
    outputs = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        probe.sample()
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    prompt = sum(len(o.prompt_token_ids) for o in outputs.values())
    print(json.dumps({
        "engine": "heron" + (" eager" if a.enforce_eager else "")
                  + (" speculative" if a.speculative_config else "")
                  + (f" {a.quantization}" if a.quantization else "")
                  + (" gguf" if str(a.model).endswith(".gguf") else ""), "workload": a.workload, "requests": len(reqs), "threads": torch.get_num_threads(),
        "prompt_tokens": prompt, "generated_tokens": generated, "seconds": round(seconds, 3),
        "generated_tok_per_s": round(generated / seconds, 1),
        "total_tok_per_s": round((generated + prompt) / seconds, 1),
        "kv_cache_utilization": round(probe.mean, 4), "preemptions": engine.scheduler.num_preemptions}))


if __name__ == "__main__":
    main()
