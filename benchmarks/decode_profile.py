"""Where a single-stream decode step's time goes, against the weight-read floor.

    .venv/bin/python benchmarks/decode_profile.py [--model DIR|FILE.gguf] [--threads 2]
        [--context 128] [--quantization int8|int4] [--kv-cache-dtype fp8] [--enforce-eager]

Measures, in one process and one sitting (nothing else may run meanwhile):
  floor      bytes a decode step must read (every linear weight once, the lm_head
             included; the embedding table contributes one row) / this machine's
             read bandwidth, measured by summing a buffer larger than the caches
  step       ms per generated token of `LLM.generate` (256 greedy tokens, best of 3)
  forward    the forward pass alone at one token, compiled unless --enforce-eager
             (what the step pays on top
             is input preparation, logits, sampling and the engine's bookkeeping)
  linears    every linear layer of the model called once on one row, in model order
  attention  every layer's decode attention at the step's context length
  lm_head    the logits of one row
Prints one JSON object. "engine_ms" is step - forward - lm_head: input preparation,
sampling, detokenizing and the scheduler. With the compiled forward, the split of the
forward into linears, attention and element-wise ops is timed inside the C loop; eager,
linears and attention are timed alone and the rest (norms, rotary, silu-and-mul and the
Python per layer) is what remains of the forward.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from heron import LLM, SamplingParams
from heron.worker.step_inputs import build_metadata

PROMPT = "The history of the city of Rome begins"
TOKENS = 256


def best_ms(fn, repeats: int = 30) -> float:
    """Best-of-`repeats` milliseconds of `fn()` after two warm-up calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def read_bandwidth_gbs(size_mb: int = 1024) -> float:
    """GB/s of a streaming read (int64 sum) over a buffer far larger than the caches."""
    buf = torch.ones(size_mb * (1 << 20) // 8, dtype=torch.int64)
    ms = best_ms(lambda: buf.sum(), repeats=5)
    return buf.numel() * 8 / (ms / 1e3) / 1e9


def linear_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features")
            and not isinstance(m, torch.nn.Embedding)]


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)) + [
        t for t in vars(module).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_ms(llm: LLM) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        llm.generate([PROMPT], params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best * 1e3 / TOKENS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="auto (bfloat16 here), fp8, fp8_e4m3 or fp8_e5m2")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="the layers from Python, not the platform's compiled forward")
    ap.add_argument("--quantization", default=None, choices=["int8", "int4"],
                    help="weight-only quantization of the model's linear layers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype="bfloat16", max_model_len=2048, device="cpu",
              enforce_eager=args.enforce_eager, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    runner = llm.llm_engine.executor.runner
    model, backend = runner.model, runner.backend
    linears = linear_modules(model)
    weight_bytes = sum(module_bytes(m) for m in linears)
    norms = sum(module_bytes(m) for m in model.modules() if type(m).__name__ == "RMSNorm")
    bandwidth = read_bandwidth_gbs()
    floor_ms = (weight_bytes + norms) / (bandwidth * 1e9) * 1e3

    step = step_ms(llm)

    # One decode token at position `context`, in blocks 0.. of the runner's own cache.
    bs = runner.block_size
    blocks = list(range(-(-(args.context + 1) // bs)))
    meta = build_metadata([blocks], [args.context], [1], bs, torch.device("cpu"))
    ids = torch.tensor([1], dtype=torch.long)
    def forward():
        with torch.inference_mode():
            runner._forward(ids, meta, runner.kv_caches)

    rows = {m: torch.randn(1, m.in_features).to(runner.dtype) for m in linears}

    def all_linears():
        with torch.inference_mode():
            for m in linears:
                m(rows[m])

    h, kvh, d = runner.num_heads, runner.num_kv_heads, runner.head_size
    q, k, v = (torch.randn(1, n, d).to(runner.dtype) for n in (h, kvh, kvh))

    def all_attention():
        with torch.inference_mode():
            for cache in runner.kv_caches:
                backend.forward(q, k, v, cache, meta)

    hidden_row = torch.randn(1, model.config.hidden_size).to(runner.dtype)

    def logits():
        with torch.inference_mode():
            model.compute_logits(hidden_row)

    forward_ms, logits_ms = best_ms(forward), best_ms(logits)
    result = {
        "forward_path": "eager" if runner.compiled is None else type(runner.compiled).__name__,
        "kv_cache_dtype": str(runner.kv_caches[0].dtype).removeprefix("torch."),
        "threads": args.threads, "context": args.context, "read_gb_per_s": round(bandwidth, 1),
        "weights_mb_per_step": round((weight_bytes + norms) / 1e6, 1),
        "floor_ms": round(floor_ms, 2), "step_ms": round(step, 2),
        "step_over_floor": round(step / floor_ms, 2), "forward_ms": round(forward_ms, 2),
        "lm_head_ms": round(logits_ms, 2),
        "engine_ms": round(step - forward_ms - logits_ms, 2)}
    if runner.compiled is not None and hasattr(runner.compiled, "start_profile"):
        # The split measured inside the C loop, averaged over calls.
        calls = 50
        runner.compiled.start_profile()
        for _ in range(calls):
            forward()
        split = {f"{k}_ms": round(v * 1e3 / calls, 2) for k, v in runner.compiled.profile().items()}
        runner.compiled.timings = None
    else:
        linears_ms, attention_ms = best_ms(all_linears), best_ms(all_attention)
        split = {"linears_ms": round(linears_ms, 2), "attention_ms": round(attention_ms, 2),
                 "elementwise_and_python_ms": round(forward_ms - linears_ms - attention_ms, 2)}
    result.update(split)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
