"""heron's batch-invariant linear kernel against torch's F.linear (BLAS / oneDNN), per row count.

    .venv/bin/python benchmarks/linear_micro.py --threads 2

Prints, for SmolLM2-135M's gate/up projection (576 -> 1536) and float32 and bfloat16,
the time and GFLOP/s of each at 1 to 512 rows, and whether torch's rows depend on how
many rows share the call (heron's never do: tests/test_cpu_gemm.py).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from heron.kernels.cpu_linear import InvariantLinear


def seconds_per_call(fn, x: torch.Tensor, budget: float = 0.5) -> float:
    for _ in range(3):
        fn(x)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        fn(x)
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-features", type=int, default=576)
    ap.add_argument("--out-features", type=int, default=1536)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, n = args.in_features, args.out_features
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(n, k).to(dtype)
        heron = InvariantLinear(w, None)
        x_all = torch.randn(512, k).to(dtype)
        torch_all = torch.nn.functional.linear(x_all, w)
        for rows in (1, 4, 16, 64, 256, 512):
            x = x_all[:rows]
            t_heron = seconds_per_call(heron, x)
            t_torch = seconds_per_call(lambda v: torch.nn.functional.linear(v, w), x)
            flops = 2 * rows * k * n
            print(json.dumps({
                "dtype": str(dtype).replace("torch.", ""), "rows": rows,
                "heron_ms": round(t_heron * 1e3, 3), "heron_gflops": round(flops / t_heron / 1e9, 1),
                "torch_ms": round(t_torch * 1e3, 3), "torch_gflops": round(flops / t_torch / 1e9, 1),
                "torch_rows_depend_on_row_count": not torch.equal(
                    torch.nn.functional.linear(x, w), torch_all[:rows])}))


if __name__ == "__main__":
    main()
